"""`deftly bench profile` on the tiny model: every block start predicted beside measured, the agreed keys."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest


def test_an_int8_run_alone_is_written_beside_the_fp32_run_not_over_it() -> None:
    from desktop.bench.profile import results_name

    assert results_name(["fp32", "int8"], False) == results_name(["fp32"], False) == "profile"
    assert results_name(["int8"], False) == "profile_int8"
    assert results_name(["int8"], True) == "profile_int8_one_thread"
    assert results_name(["fp32"], True) == "profile_one_thread"


def test_the_comparison_reads_the_probe_as_format_3_did() -> None:
    # format 3: one call's cost = 2 x layer_bs - the layer twice (layer_bs_x2), off every single call
    from desktop.bench.profile import pair_layer_times, pair_step_s
    from shared.probe import ProbeManifest

    ms = 1e-3
    probe = ProbeManifest(model_id="m", model_fingerprint="f" * 64, base_weights="fp32", num_layers=4, hidden_size=8,
                          job_layers=(2, 3), target_modules=("q_proj",), rank=2, q=2, batch_size=2, seq_len=64,
                          layer_b_size=16, b_size=32, classes=2, methods=())
    times = {"layer_bs": 20 * ms, "layer_bs_x2": 36 * ms, "layer_bs_x4": 70 * ms, "layer_wide": 100 * ms,
             "layer_wide_x2": 190 * ms, "frozen_bs": 19 * ms, "frozen_bs_x4": 68 * ms, "frozen_bs_x8": 130 * ms,
             "last_wide": 18 * ms, "head": 2 * ms}
    bs, wide = pair_layer_times(probe, times)  # 4 ms a call
    assert bs == pytest.approx([15 * ms, 15 * ms, 16 * ms, 14 * ms])
    assert wide == pytest.approx([96 * ms, 96 * ms, 96 * ms, 14 * ms])
    assert pair_step_s(probe, times, 3) == pytest.approx(15 * ms + 15 * ms + 16 * ms + 14 * ms + 2 * ms)
    # the pair dearer than two single calls: nothing taken off
    assert pair_layer_times(probe, {**times, "layer_bs_x2": 45 * ms})[0][0] == pytest.approx(19 * ms)


@pytest.mark.slow
def test_bench_profile_writes_the_table_and_the_agreed_keys(tmp_path: Path) -> None:
    # ~5 min on 2 cores: a probe, three block programs and a two-block plan lowered cold and warm.
    from desktop.bench import profile as bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path)
    bench.add_arguments(parser)
    args = parser.parse_args(["--out-dir", str(tmp_path), "--model", "tiny", "--layers", "1-3", "--weights", "fp32",
                              "--plan-blocks", "1-1,2-3", "--steps", "2", "--repeats", "3",
                              "--work-dir", str(tmp_path / "work")])
    results = bench.run(args)
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert {"worst_step_prediction_error", "worst_memory_prediction_error", "plan_programs_cold_s",
            "plan_programs_warm_s", "probe_lower_s", "table"} <= set(saved)
    assert [(r["first_layer"], r["last_layer"]) for r in saved["table"]] == [(1, 3), (2, 3), (3, 3)]
    for row in saved["table"]:
        assert row["measured_step_s"] > 0 and row["predicted_step_s"] > 0
        assert row["measured_peak_bytes"] > 0 and row["predicted_peak_bytes"] > 0
        assert row["step_error"] == pytest.approx(abs(row["measured_step_s"] - row["predicted_step_s"])
                                                  / row["measured_step_s"])
        # beside it, the agent's case: the probe measured once, at the start, against the program alone
        assert row["predicted_step_s_probe_at_start"] > 0 and row["measured_step_s_alone"] > 0
        assert row["step_error_probe_at_start"] == pytest.approx(
            abs(row["measured_step_s_alone"] - row["predicted_step_s_probe_at_start"]) / row["measured_step_s_alone"])
    assert saved["worst_memory_prediction_error"] == max(r["memory_error"] for r in saved["table"])
    assert saved["worst_step_prediction_error"] == max(r["step_error"] for r in saved["table"])
    assert saved["worst_step_prediction_error_pair"] == max(r["step_error_pair"] for r in saved["table"]) > 0
    assert set(saved["layer_cost_s"]["fp32"]) == set(saved["call_cost_s"]["fp32"]) == {"layer_bs", "frozen_bs",
                                                                                       "layer_wide"}
    assert saved["worst_step_prediction_error_probe_at_start"] == max(r["step_error_probe_at_start"]
                                                                      for r in saved["table"])
    assert saved["plan_programs_warm_s"] < saved["plan_programs_cold_s"] and saved["probe_lower_s"]["fp32"] > 0
    # beside the probe as a user gets it (in units side by side), the same probe lowered in one process
    assert saved["probe_lower_one_process_s"]["fp32"] > 0 and saved["probe_units"]["fp32"] >= 1
    assert saved["machine"]["cores"] >= 1 and saved["machine"]["system"]
    assert results["table"] == saved["table"] and (tmp_path / "profile.png").stat().st_size > 10_000
