"""`deftly bench coop` on the tiny plan: rounds merge each block's own slice, and the result says what it measured."""
from __future__ import annotations

import json

import numpy as np
import pytest

from desktop.bench.coop import CoopSettings, compare, device_seed, measure, planned_blocks, train_in_rounds
from desktop.cli import main
from desktop.engine.shards import shard_indices, shard_split
from device_agent.program import Program
from device_agent.trainer import Trainer
from shared.blocks import spans_for
from shared.errors import InputError


@pytest.fixture(scope="module")
def programs(tiny_plan):
    """The tiny plan's three one-layer block programs, its eval program and the whole-job program."""
    blocks = [Program(result.manifest_path) for result in tiny_plan.plan.blocks.values()]
    return blocks, Program(tiny_plan.plan.eval.manifest_path), Program(tiny_plan.whole.manifest_path)


def test_each_round_merges_the_slice_each_blocks_trainer_returned(programs) -> None:
    blocks, eval_program, _ = programs
    layout = eval_program.manifest.b_layout
    train = eval_program.load_data()["train"]
    shards = [shard_split(train, rows) for rows in shard_indices(train.labels, len(blocks))]
    trainers = [Trainer.fresh(p, shard, seed=device_seed(0, j)) for j, (p, shard) in enumerate(zip(blocks, shards))]
    seen: list[tuple[int, np.ndarray, dict, np.ndarray]] = []
    starts: list[list[np.ndarray]] = []  # per round, the b each trainer held when its round began

    def on_merge(r, start, slices, merged) -> None:
        seen.append((r, start.copy(), {span: s.copy() for span, s in slices.items()}, merged.copy()))
        starts.append([t.b for t in trainers])  # after the round: the start b outside its block, its own inside

    evaluated: list[tuple[int, np.ndarray]] = []
    final, records = train_in_rounds(trainers, layout, rounds=2, local_steps=2, lr=0.05, eps=1e-2,
                                     evaluate=lambda r, b: (evaluated.append((r, b.copy())), (0.5, None))[1],
                                     on_merge=on_merge)

    assert [r for r, *_ in seen] == [1, 2] and [r.round for r in records] == [0, 1, 2]
    assert [r.steps_per_device for r in records] == [0, 2, 4]
    assert not np.any(seen[0][1])  # round 1 starts from b = 0
    for (r, start, slices, merged), held in zip(seen, starts):
        assert [span.name for span in slices] == ["L1", "L2", "L3"]
        for trainer, b_after in zip(trainers, held):
            span = trainer.span
            ours = slice(span.offset, span.stop)
            # The merged b's slice of block j is exactly what block j's trainer returned ...
            np.testing.assert_array_equal(merged[ours], slices[span])
            np.testing.assert_array_equal(slices[span], b_after[ours])
            assert not np.array_equal(slices[span], start[ours])  # ... and its steps moved it
            # ... and the trainer trained only its own block, from the round's start b.
            outside = np.ones(len(start), dtype=bool)
            outside[ours] = False
            np.testing.assert_array_equal(b_after[outside], start[outside])
    np.testing.assert_array_equal(seen[1][1], seen[0][3])  # round 2 starts from round 1's merge
    np.testing.assert_array_equal(final, seen[1][3])
    assert [r for r, _ in evaluated] == [0, 1, 2]
    np.testing.assert_array_equal(evaluated[2][1], final)  # the merged b is what is evaluated
    assert all(t.state.step == 4 for t in trainers)  # K steps per round each, R rounds
    assert set(records[1].loss) == {"L1", "L2", "L3"} and all(np.isfinite(v) for v in records[1].loss.values())


def test_compare_reports_both_runs_round_by_round(programs) -> None:
    blocks, eval_program, whole = programs
    splits = eval_program.load_data()
    settings = CoopSettings(rounds=2, local_steps=2, eval_limit=40, test_every=0, seeds=2)
    results = compare(blocks, whole, eval_program, splits, settings, say=lambda _line: None)

    assert (results["rounds"], results["local_steps"], results["steps_per_device"]) == (2, 2, 4)
    assert [b["name"] for b in results["blocks"]] == ["L1", "L2", "L3"]
    assert sum(b["size"] for b in results["blocks"]) == results["b_size"] == eval_program.b_size
    # Each device holds a disjoint third of the training split; the single device holds all of it.
    assert sum(b["train_examples"] for b in results["blocks"]) == results["single_train_examples"] == len(splits["train"])
    assert results["lr"] == whole.manifest.lr and results["eps"] == whole.manifest.eps
    assert results["rates_from"] == "the programs' manifests"
    assert results["device_seeds"] == [[0, 1, 2], [1000, 1001, 1002]] and results["seeds"] == [0, 1]
    assert results["validation_examples"] == 40
    for key, loss_names in (("cooperative_rounds", {"L1", "L2", "L3"}), ("single_rounds", {"single"})):
        rounds = results[key]
        assert [r["round"] for r in rounds] == [0, 1, 2] and [r["steps_per_device"] for r in rounds] == [0, 2, 4]
        assert rounds[0]["val_accuracy"] == results["zero_shot_accuracy"]["validation"]
        assert rounds[0]["test_accuracy"] == results["zero_shot_accuracy"]["test"]
        assert rounds[1]["test_accuracy"] is None  # --test-every 0: the test at the start and the end only
        assert set(rounds[2]["loss"]) == loss_names
        assert all(0.0 <= r["val_accuracy"] <= 1.0 for r in rounds)
    by_seed = results["cooperative_accuracy_by_seed"]
    assert len(by_seed) == 2 and results["cooperative_accuracy"] == pytest.approx(np.mean(by_seed))
    assert results["cooperative_rounds"][-1]["test_accuracy"] == pytest.approx(results["cooperative_accuracy"])
    assert results["single_rounds"][-1]["test_accuracy"] == pytest.approx(results["single_accuracy"])
    assert results["test_difference"] == pytest.approx(results["cooperative_accuracy"] - results["single_accuracy"])
    assert results["test_difference_stderr"] >= 0
    # Seeds draw other directions: the two cooperative runs end at other b's, other validation figures
    # are likely but not certain on 40 rows, so compare the losses, which are continuous.
    first, second = (run[-1]["loss"] for run in results["by_seed"]["cooperative"])
    assert first != second
    json.dumps(results)  # plain data


def test_measure_writes_figures_that_agree_with_each_other(programs, tmp_path) -> None:
    blocks, eval_program, whole = programs
    R, K = 3, 2
    settings = CoopSettings(rounds=R, local_steps=K, eval_limit=24, test_every=2)
    returned = measure(blocks, whole, eval_program, settings, tmp_path, blocks_from={"how": "test"},
                       export_seconds=1.5, say=lambda _line: None)
    results = json.loads((tmp_path / "coop.json").read_text())
    assert results == json.loads(json.dumps(returned))  # what was written is what was returned

    for key in ("cooperative_accuracy", "single_accuracy", "steps_per_device", "rounds", "local_steps", "blocks",
                "accuracy_per_round", "test_accuracy", "date", "machine", "settings", "wall_seconds"):
        assert key in results, key
    assert results["rounds"] * results["local_steps"] == results["steps_per_device"] == R * K
    assert results["settings"]["rounds"] == R and results["settings"]["local_steps"] == K
    assert results["settings"]["lr"] == results["lr"] == whole.manifest.lr
    assert results["machine"]["cores"] >= 1 and len(results["machine"]["load_average"]["before"]) == 3
    assert results["date"].endswith("+00:00")
    assert results["wall_seconds"] >= results["train_and_eval_seconds"] > 0 and results["export_seconds"] == 1.5
    # Validation per round: R + 1 entries (round 0 the zero-shot b = 0), the records' figures.
    for name in ("cooperative", "single"):
        per_round = results["accuracy_per_round"][name]
        records = results[f"{name}_rounds"]
        assert len(per_round) == len(records) == R + 1
        assert per_round == [r["val_accuracy"] for r in records]
        assert [r["steps_per_device"] for r in records] == [r * K for r in range(R + 1)]
        # Test at round 0, every 2nd round and the end; the end's is the headline figure.
        assert [r["round"] for r in records if r["test_accuracy"] is not None] == [0, 2, 3]
        assert records[-1]["test_accuracy"] == results[f"{name}_accuracy"] == results["test_accuracy"][name]
        # Accuracies of a fixed number of examples: multiples of 1/n.
        assert all(abs(v * 24 - round(v * 24)) < 1e-9 for v in per_round)
        assert abs(results[f"{name}_accuracy"] * results["test_examples"]
                   - round(results[f"{name}_accuracy"] * results["test_examples"])) < 1e-9
    # Both runs start from the same b = 0, so their round 0 is one measurement.
    assert results["accuracy_per_round"]["cooperative"][0] == results["accuracy_per_round"]["single"][0]
    assert results["test_accuracy"]["zero_shot"] == results["cooperative_rounds"][0]["test_accuracy"]
    assert set(results["median_step_seconds"]) == {"L1", "L2", "L3", "single"}
    assert all(v > 0 for v in results["median_step_seconds"].values())
    assert (tmp_path / "coop.png").stat().st_size > 10_000


def test_compare_refuses_blocks_that_do_not_cover_the_job(programs) -> None:
    blocks, eval_program, whole = programs
    with pytest.raises(InputError, match="no block holds trainable layers 2"):
        compare([blocks[0], blocks[2]], whole, eval_program, eval_program.load_data(), CoopSettings(rounds=1))


def test_bad_settings_are_refused_before_anything_is_built(tmp_path, capsys) -> None:
    code = main(["bench", "coop", "--model", "tiny", "--rounds", "0", "--out-dir", str(tmp_path / "out"),
                 "--runs-dir", str(tmp_path / "runs")])
    assert code != 0
    assert "--rounds 0: expected 1 or more" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_planner_cuts_the_top_eight_layers_for_the_lab3_fleet() -> None:
    from shared.manifest import BSlot

    # SmolLM2's top 8 layers: q_proj [576, 8] and v_proj [192, 8] in each.
    layout, offset = [], 0
    for layer in range(22, 30):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            layout.append(BSlot(layer=layer, module=module, path=f"model.layers.{layer}.self_attn.{module}",
                                shape=(out, 8), offset=offset))
            offset += out * 8
    blocks, where = planned_blocks(layout, num_layers=30, local_steps=25)
    spans_for(layout, blocks)  # a cover of the job's layers, each once
    assert len(blocks) == 3
    assert set(where["devices"].values()) == {"pi4", "phone", "laptop"}
    assert "lab3.toml" in where["how"] and where["round_s"] > 0


@pytest.mark.slow
def test_bench_coop_exports_trains_and_writes_the_picture(tmp_path, smollm2_conversion) -> None:
    out = tmp_path / "results"
    code = main(["bench", "coop", "--model", "tiny", "--cache-dir", str(smollm2_conversion.cache_dir),
                 "--rounds", "2", "--local-steps", "2", "--eval-limit", "32", "--test-every", "1",
                 "--out-dir", str(out), "--runs-dir", str(tmp_path / "runs")])
    assert code == 0
    results = json.loads((out / "coop.json").read_text())
    assert results["weights"] == "int8" and [b["name"] for b in results["blocks"]] == ["L1", "L2", "L3"]
    assert results["blocks_from"]["how"] == "--blocks 1-1,2-2,3-3"
    assert all(r["test_accuracy"] is not None for r in results["cooperative_rounds"])  # --test-every 1
    assert set(results["median_step_seconds"]) == {"L1", "L2", "L3", "single"}
    assert results["wall_seconds"] >= results["export_seconds"] > 0
    assert (out / "coop.png").stat().st_size > 10_000
