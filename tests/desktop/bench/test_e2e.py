"""deftly bench e2e on the tiny model: three real simulated agents, a planned run and the baseline run."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from desktop.bench import e2e

pytestmark = pytest.mark.slow  # two whole runs on three agents: minutes on two cores

def test_the_bench_writes_every_figure_from_the_runs_it_made(tiny_model_dir, tiny_task, export_cache,
                                                             tmp_path) -> None:
    # prepare: the bench's own options, on the tiny job
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model_dir), "--task", str(tiny_task), "--layers", "0-1",
                              "--seq", "32", "--rounds", "2", "--random-rounds", "1", "--local-steps", "2",
                              "--eval-limit", "16", "--test-limit", "16", "--cache-dir", str(export_cache),
                              "--work-dir", str(tmp_path / "work")])
    args.out_dir = tmp_path / "results"
    # execute
    e2e.run(args)
    results = json.loads((tmp_path / "results" / "e2e.json").read_text())
    # assert: the figures agree with the tables they come from
    assert (tmp_path / "results" / "e2e.png").stat().st_size > 0
    assert results["rounds"] == 2 and results["random_rounds"] == 1 and results["simulated"] is True
    assert {row["device"] for row in results["plan"]} == {name for name, _ in e2e.LAB}
    devices = {row["device"] for row in results["plan"] if row["block"]}  # the tiny job has 2 layers: 2 blocks
    assert len(results["prediction"]) == 2 * len(devices)
    assert results["worst_prediction_error"] == max(row["error"] for row in results["prediction"])
    # each row holds the round's parts beside the plan's (both runs paced at their plan's shares)
    for row in results["prediction"] + results["random_prediction"]:
        assert row["measured_comm_s"] == pytest.approx(row["measured_download_s"] + row["measured_upload_s"])
        assert row["measured_comm_s"] + row["measured_compute_s"] == pytest.approx(row["measured_s"])
        assert row["predicted_comm_s"] + row["predicted_compute_s"] == pytest.approx(row["planned_s"])
        assert 0 < row["share"] <= 1
    assert len(results["random_prediction"]) == len({row["device"] for row in results["random_plan"] if row["block"]})
    assert math.isfinite(results["worst_comm_error"]) and math.isfinite(results["random_worst_comm_error"])
    assert math.isclose(results["gain_vs_equal_random"], 1 - results["plan_round_s"] / results["random_round_s"])
    assert len(results["accuracy_per_round"]) == 2
    compute = results["measured_compute"]
    assert {(row["round"], row["device"]) for row in compute} <= {(r, d) for r in (1, 2) for d in devices}
    assert all(row["steps"] == 2 == sum(row["steps_by_seq_len"].values()) for row in compute)
    assert all(row["predicted_compute_at_round_mix_s"] > 0 for row in results["prediction"])
    assert results["worst_error_vs_plan"] == max(row["error_vs_plan"] for row in results["prediction"])
    # round 1 is predicted before any step was seen (no calibration): the plan's comm plus the cost model's
    # compute at the lengths the round then ran, which the bench prices from the steps' own records
    for row in results["prediction"]:
        if row["round"] == 1:
            assert row["predicted_s"] == pytest.approx(row["predicted_comm_s"] + row["predicted_compute_at_round_mix_s"])
    served = results["served_test_accuracy"]
    assert served["examples"] > 0 and 0 <= served["with_bias"] <= 1 and 0 <= served["without_bias"] <= 1
