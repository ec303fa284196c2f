"""`python -m device_agent.selfcheck`: it imports the agent, runs a real program once, and names what is missing."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device_agent import selfcheck
from device_agent.program import Program


def test_it_runs_the_program_and_reports_the_step_the_program_computes(tiny_program, capsys) -> None:
    assert selfcheck.main([str(tiny_program.pte)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"]["device_agent.program"] == "ok"
    assert set(report["modules"].values()) == {"ok"}
    assert report["versions"]["executorch"] == "1.5.1"
    assert report["rss_mb_after_import_program"] > 0

    # The same inputs the check documents: the first training rows, b = 0, z from PCG64 seed 0.
    program = Program(tiny_program.pte)
    assert run_files(report) == sorted({p.name for p in tiny_program.export.method_files.values()})
    train = program.load_data()["train"]
    bs = program.batch_size
    z = np.random.default_rng(0).standard_normal((program.q, program.b_size), dtype=np.float32)
    b = np.zeros(program.b_size, np.float32)
    b_new, loss, g = program.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs], b, z,
                                  program.manifest.lr, program.manifest.eps)
    run = report["run"]
    assert run["loss"] == pytest.approx(loss, abs=1e-6)
    np.testing.assert_allclose(run["g"], g, atol=1e-6)
    assert run["b_step_norm"] == pytest.approx(float(np.linalg.norm(b_new)), abs=1e-6) and run["b_step_norm"] > 0
    logits = np.asarray(run["logits"])
    assert logits.shape == (program.eval_batch_size, len(program.manifest.labels)) and np.isfinite(logits).all()


def run_files(report: dict) -> list[str]:
    return report["run"]["files"]


def test_a_block_program_runs_its_step_on_its_slice_and_has_no_eval(tiny_plan, capsys) -> None:
    # What a device receives: the step methods of one block, z and the new b on its slice only.
    result = tiny_plan.plan.blocks["L2"]
    assert selfcheck.main([str(result.manifest_path)]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["methods"] == ["step"] and "logits" not in run

    program = Program(result.manifest_path)
    train = program.load_data()["train"]
    bs, block = program.batch_size, program.block
    assert program.block_size < program.b_size
    z = np.random.default_rng(0).standard_normal((program.q, program.block_size), dtype=np.float32)
    b_new, loss, g = program.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs],
                                  np.zeros(program.b_size, np.float32), z, program.manifest.lr, program.manifest.eps)
    assert run["loss"] == pytest.approx(loss, abs=1e-6)
    np.testing.assert_allclose(run["g"], g, atol=1e-6)
    assert run["b_step_norm"] == pytest.approx(float(np.linalg.norm(b_new)), abs=1e-6) and b_new.shape == (block.size,)


def test_the_eval_program_runs_its_eval_only(tiny_plan, capsys) -> None:
    assert selfcheck.main([str(tiny_plan.plan.eval.manifest_path)]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["methods"] == ["eval"] and "loss" not in run
    logits = np.asarray(run["logits"])
    assert logits.shape == (tiny_plan.config.eval_batch_size, len(tiny_plan.plan.eval.manifest.labels))
    assert np.isfinite(logits).all()


def test_a_missing_distribution_is_named_and_fails_the_check(monkeypatch, capsys) -> None:
    # As if torch were not installed: a fresh import of device_agent.program must fail on it.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "device_agent.program")
    assert selfcheck.main([]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["modules"]["device_agent.program"].startswith("missing module 'torch'")
    assert "selfcheck: device_agent.program: missing module 'torch'" in captured.err


def test_a_program_that_is_not_there_fails_the_check_with_its_path(tmp_path, capsys) -> None:
    missing = tmp_path / "nothing.pte"
    assert selfcheck.main([str(missing)]) == 1
    captured = capsys.readouterr()
    assert "InputError" in json.loads(captured.out)["run"]["error"]
    assert f"{missing}: no such program" in captured.err


def test_it_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "device_agent.selfcheck"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert "run" not in report and report["modules"]["device_agent.trainer"] == "ok"
