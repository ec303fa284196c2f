"""`deftly bench prge` on a tiny model: every key and file, and every ratio is the one its timed
or measured values in the same result give."""
from __future__ import annotations

import json

import pytest

from desktop.cli import main

KEYS = ("speedup_vs_mezo", "et_over_eager", "prefix_speedup", "batch_speedup", "rss_train_over_infer",
        "rss_train_over_fo", "accuracy", "zero_shot_accuracy", "steps", "train_seconds", "program_bytes")


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_bench_prge_writes_every_key_and_a_picture(tmp_path, smollm2_conversion, weights: str) -> None:
    out = tmp_path / "results"
    name = "prge" if weights == "fp32" else "prge_int8"
    code = main(["bench", "prge", "--model", "tiny", "--cache-dir", str(smollm2_conversion.cache_dir),
                 "--layers", "top:1", "--steps", "6", "--eval-every", "3", "--eval-limit", "16", "--fo-steps", "4",
                 "--timing-rounds", "2", "--rss-steps", "2", "--out-dir", str(out), "--weights", weights,
                 "--runs-dir", str(tmp_path / "runs"), "--accuracy-seeds", "2"])
    assert code == 0
    results = json.loads((out / f"{name}.json").read_text())
    assert results["base_weights"] == weights
    for key in KEYS:
        assert key in results, key
    # Every ratio is the quotient of the values it was computed from, in this same result.
    seconds, rss, gflop, rates = (results[k] for k in ("seconds_per_step", "rss_bytes", "gflop_per_step",
                                                        "gflops_per_second"))
    assert all(value > 0 for value in [*seconds.values(), *rss.values(), *gflop.values(), *rates.values()])
    ratios = {
        "speedup_vs_mezo": seconds["eager_mezo_step"] / seconds["et_step"],
        "et_over_eager": seconds["eager_prge_step"] / seconds["et_step"],
        "prefix_speedup": seconds["et_step_all_layers"] / seconds["et_step"],
        "batch_speedup": seconds["et_sequential_2q"] / seconds["et_step"],
        "rss_train_over_infer": rss["et_train"] / rss["et_infer"],
        "rss_train_over_fo": rss["et_train"] / rss["first_order_eager"],
        "flop_ratio_mezo_over_prge": gflop["mezo_step"] / gflop["prge_step"],
        "int8_gemm_over_fp32": rates["et_gemm_int8"] / rates["et_gemm_fp32"],
    }
    assert rates["et_step"] == pytest.approx(gflop["prge_step"] / seconds["et_step"])
    assert rates["eager_prge_step"] == pytest.approx(gflop["prge_step"] / seconds["eager_prge_step"])
    assert rates["eager_mezo_step"] == pytest.approx(gflop["mezo_step"] / seconds["eager_mezo_step"])
    if weights == "int8":
        ratios["int8_speedup_over_fp32"] = seconds["et_step_fp32"] / seconds["et_step"]
        ratios["rss_train_over_fo_fp32"] = rss["et_train_fp32"] / rss["first_order_eager"]
        assert 0.0 <= results["zero_shot_accuracy_fp32"] <= 1.0
        assert len(results["accuracy_on_fp32_base_by_seed"]) == 2
        assert results["accuracy_on_fp32_base"] == pytest.approx(sum(results["accuracy_on_fp32_base_by_seed"]) / 2)
        assert len(results["accuracy_on_fp32_base_without_bias_by_seed"]) == 2
        assert results["accuracy_on_fp32_base_without_bias"] == pytest.approx(
            sum(results["accuracy_on_fp32_base_without_bias_by_seed"]) / 2)
        assert set(results["int8_g_correlation"]) == {"0.01", "0.3"}
        assert all(-1.0 <= c <= 1.0 for c in results["int8_g_correlation"].values())
    else:
        assert "et_step_fp32" not in seconds and "int8_speedup_over_fp32" not in results
    for key, expected in ratios.items():
        assert results[key] == pytest.approx(expected), key
    # The sizes are the files the bench exported.
    runs = tmp_path / "runs"
    assert results["program_bytes"] == (runs / "top" / "step.pte").stat().st_size
    assert results["weights_bytes"] == next((runs / "top").glob("weights-*.ptd")).stat().st_size
    assert results["steps"] == 6 and results["train_seconds"] > 0
    assert 0.0 <= results["accuracy"] <= 1.0 and 0.0 <= results["zero_shot_accuracy"] <= 1.0
    # Beside each accuracy, the same b without the class bias (what PEFT alone serves).
    assert len(results["accuracy_without_bias_by_seed"]) == 2
    assert results["accuracy_without_bias"] == pytest.approx(sum(results["accuracy_without_bias_by_seed"]) / 2)
    # The headline is the mean over the seeds, never one seed's run.
    assert len(results["accuracy_by_seed"]) == 2
    assert results["accuracy"] == pytest.approx(sum(results["accuracy_by_seed"]) / 2)
    first, second = results["accuracy_by_seed"]
    assert results["accuracy_seed_stderr"] == pytest.approx(abs(first - second) / 2)
    assert 0.0 < results["accuracy_test_stderr"] < 0.5
    assert (tmp_path / "runs" / "train_seed1" / "adapter").is_dir()
    assert results["program_bytes"] < results["weights_bytes"]
    assert (out / f"{name}.png").stat().st_size > 10_000
    # MeZO's 2q one-copy forwards through every layer do more matmul work than one shared-prefix step.
    assert results["gflop_per_step"]["mezo_step"] > results["gflop_per_step"]["prge_step"] > 0
    assert all(rate > 0 for rate in results["gflops_per_second"].values())


def test_bench_prge_refuses_fewer_than_one_accuracy_seed(tmp_path, capsys) -> None:
    code = main(["bench", "prge", "--model", "tiny", "--accuracy-seeds", "0", "--out-dir", str(tmp_path)])
    assert code != 0
    assert "--accuracy-seeds 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was built or written


def test_matmul_gflop_counts_two_flops_per_multiply_add() -> None:
    import torch

    from desktop.bench.prge import matmul_gflop

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    x, y = torch.randn(3, 8, 4), torch.randn(3, 4, 5)
    gflop = matmul_gflop(lambda: (torch.nn.functional.linear(a, b.T), torch.bmm(x, y)))
    assert gflop * 1e9 == 2 * 64 * 32 * 16 + 2 * 3 * 8 * 4 * 5


@pytest.mark.parametrize("weights, tolerance", [("fp32", 1e-5), ("int8", 0.05)])
def test_lowered_gemm_chain_computes_the_eager_chain(tmp_path, weights: str, tolerance: float) -> None:
    import torch

    from desktop.bench.prge import MlpGemms
    from device_agent.program import open_et_program

    gemms = MlpGemms(hidden=32, intermediate=48, layers=2)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    (y,) = open_et_program(gemms.lower(weights, tmp_path / f"{weights}.pte", rows=16), None).load_method("forward")([x])
    with torch.no_grad():
        expected = gemms.module("fp32")(x)
    # int8: per-channel weights and per-token activations each round to 1/254 of their range.
    assert torch.allclose(y, expected, atol=tolerance * expected.abs().max())
    if weights == "int8":
        assert not torch.allclose(y, expected, atol=1e-6)  # it really is the quantised kernel
    assert gemms.gflop(16) * 1e9 == 2 * 2 * (2 * 16 * 32 * 48)


def test_gemm_rates_are_the_chains_flops_over_its_timed_seconds(tmp_path, monkeypatch) -> None:
    from desktop.bench import prge

    # Keep what the timing returned, to hold each rate against it.
    timed: dict[str, float] = {}

    def recording(contenders, rounds):
        timed.update(interleaved_medians(contenders, rounds))
        return dict(timed)

    interleaved_medians = prge.interleaved_medians
    monkeypatch.setattr(prge, "interleaved_medians", recording)
    rates = prge.gemm_gflops(rows=16, hidden=32, intermediate=48, rounds=3, workdir=tmp_path)
    assert set(rates) == set(timed) == {"eager_gemm_fp32", "et_gemm_fp32", "et_gemm_int8"}
    flops = prge.MlpGemms(hidden=32, intermediate=48).gflop(16)  # the default 4-pair chain gemm_gflops times
    assert flops * 1e9 == 4 * 2 * (2 * 16 * 32 * 48)
    for name, seconds in timed.items():
        assert seconds > 0 and rates[name] == pytest.approx(flops / seconds), name


def test_gemm_chain_refuses_unknown_weights() -> None:
    from desktop.bench.prge import MlpGemms

    with pytest.raises(ValueError, match="expected fp32 or int8"):
        MlpGemms(hidden=4, intermediate=8, layers=1).module("int4")


def test_g_correlation_pairs_the_same_batches_and_directions(tiny_program) -> None:
    from desktop.bench.prge import g_correlation
    from device_agent.program import Program

    program = Program(tiny_program.export.manifest_path)
    train = program.load_data()["train"]
    # The same program at the same eps: the same estimates, batch for batch.
    assert g_correlation(program, program, train, 1e-2, reference_eps=1e-2, batches=3) == pytest.approx(1.0)
    # fp32 is smooth: a 3x larger eps estimates nearly the same directional derivatives.
    assert g_correlation(program, program, train, 3e-2, reference_eps=1e-2, batches=3) > 0.99
