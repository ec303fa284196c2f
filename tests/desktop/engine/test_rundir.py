"""The run directory: a fresh run, resume, blocks kept until merged, metrics written once."""
from __future__ import annotations

import numpy as np
import pytest

from desktop.engine.rundir import DeviceRecord, RunDir, RunSettings
from shared.errors import InputError
from shared.events import Round, Step, read_events

SETTINGS = RunSettings(job="tiny/rt/1-1@abc", rounds=3, local_steps=2, lr=0.1, eps=0.01, seed=0, policy="planned")


def step(device: str, round_: int, n: int) -> Step:
    return Step(step=n, loss=0.5, g_abs_mean=0.1, seconds=0.2, seq_len=32, rss_mb=100.0, lr=0.1,
                device=device, round=round_)


def test_a_fresh_run_refuses_a_directory_that_holds_one(tmp_path) -> None:
    RunDir(tmp_path / "r").create(SETTINGS)
    with pytest.raises(InputError, match="already holds a run"):
        RunDir(tmp_path / "r").create(SETTINGS)


def test_resume_reads_back_the_merged_b_and_the_devices(tmp_path) -> None:
    run = RunDir(tmp_path / "r")
    record = run.create(SETTINGS)
    record = record.with_device(DeviceRecord("d1", "pi", "127.0.0.1:1", acked_seq=7, shard="d1.npz"))
    b = np.arange(6, dtype=np.float32)
    record = run.save_b(record, b, completed_round=2)
    again, b_back = RunDir(tmp_path / "r").load()
    assert again == record
    assert np.array_equal(b_back, b)
    assert again.device("d1").acked_seq == 7


def test_resume_refuses_a_b_that_state_does_not_name(tmp_path) -> None:
    run = RunDir(tmp_path / "r")
    run.save_b(run.create(SETTINGS), np.zeros(4, np.float32), 1)
    np.save(tmp_path / "r" / "b.npy", np.ones(4, np.float32))
    with pytest.raises(InputError, match="does not match state.json"):
        RunDir(tmp_path / "r").load()


def test_resume_with_other_settings_names_the_setting(tmp_path) -> None:
    run = RunDir(tmp_path / "r")
    record = run.create(SETTINGS)
    from dataclasses import replace

    run.check_settings(record, replace(SETTINGS, rounds=5))  # more rounds: fine
    with pytest.raises(InputError, match="local_steps 2"):
        run.check_settings(record, replace(SETTINGS, local_steps=3))


def test_metrics_written_twice_are_kept_once_even_across_a_restart(tmp_path) -> None:
    run = RunDir(tmp_path / "r")
    run.create(SETTINGS)
    assert run.write_events([step("d1", 1, 1), step("d1", 1, 2), step("d2", 1, 1)]) == 3
    assert run.write_events([step("d1", 1, 2)]) == 0  # a replay
    run.write_events([Round(1, 0.6, 10, 1.0)])
    run.close()
    with open(run.metrics_path, "a") as f:
        f.write('{"kind": "step", "step": 3, "lo')  # a line cut short by a kill
    resumed = RunDir(tmp_path / "r")
    resumed.load()
    assert resumed.write_events([step("d1", 1, 2), Round(1, 0.6, 10, 1.0), step("d1", 2, 1)]) == 1
    resumed.close()
    events = read_events(resumed.metrics_path)
    assert [(e.kind, getattr(e, "device", None), e.round, getattr(e, "step", None)) for e in events] == [
        ("step", "d1", 1, 1), ("step", "d1", 1, 2), ("step", "d2", 1, 1), ("round", None, 1, None),
        ("step", "d1", 2, 1)]


def test_blocks_are_kept_until_their_round_is_merged(tmp_path) -> None:
    run = RunDir(tmp_path / "r")
    run.create(SETTINGS)
    run.save_block(3, "dev:1", 10, np.array([1.0, 2.0], np.float32))
    offset, values = run.load_block(3, "dev:1")
    assert offset == 10 and values.tolist() == [1.0, 2.0]
    run.drop_blocks(3)
    assert run.load_block(3, "dev:1") is None
