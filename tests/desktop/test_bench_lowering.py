"""Smoke run of `deftly bench lowering` on a tiny model: every key, the files, values that add up."""
from __future__ import annotations

import json

import pytest

from desktop.cli import main


@pytest.mark.slow
def test_bench_lowering_times_a_cold_and_a_warm_plan(tmp_path, smollm2_conversion) -> None:
    out = tmp_path / "results"
    code = main(["bench", "lowering", "--model", "tiny", "--cache-dir", str(smollm2_conversion.cache_dir),
                 "--layers", "1-3", "--blocks", "1-1,2-3", "--workers", "2", "--out-dir", str(out),
                 "--work-dir", str(tmp_path / "work")])
    assert code == 0
    results = json.loads((out / "lowering.json").read_text())
    # two block programs of step + step_t16, one eval program of eval + eval_t16
    assert results["methods_lowered"] == 6 and results["methods_cached_on_warm"] == 6
    assert set(results["breakdown"]) == {"L1/step", "L1/step_t16", "L2-3/step", "L2-3/step_t16", "eval/eval",
                                         "eval/eval_t16"}
    assert all(set(stages) == {"export", "lower", "emit", "store"} for stages in results["breakdown"].values())
    assert results["serial_s"] == pytest.approx(sum(results["stage_seconds"].values()), abs=0.2)
    assert sum(results["stage_share"].values()) == pytest.approx(1.0, abs=0.01)
    assert 0 < results["plan_programs_warm_s"] < results["plan_programs_cold_s"]
    assert (out / "lowering.png").stat().st_size > 10_000
