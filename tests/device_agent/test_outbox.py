"""Tests for device_agent/outbox.py: numbered, persistent until acknowledged, replayed coalesced."""
from __future__ import annotations

import json

import numpy as np

from device_agent.outbox import Outbox
from shared.events import Step
from shared.protocol import RoundDone, StepMetrics, decode, encode, encode_f32


def _step(n: int, round_number: int = 0) -> Step:
    return Step(step=n, loss=0.7, g_abs_mean=0.1, seconds=0.01, seq_len=16, rss_mb=50.0, lr=0.1, device="d",
                round=round_number)


def _done(seq: int, paced_bytes_per_s: float | None = None) -> RoundDone:
    return RoundDone(seq=seq, round=0, program="0" * 64, device="d", steps=3, stopped=False, block_offset=0,
                     block_size=2, b_block=encode_f32(np.ones(2, np.float32)), seconds=0.03,
                     paced_bytes_per_s=paced_bytes_per_s)


def test_entries_survive_a_restart_until_acknowledged(tmp_path) -> None:
    outbox = Outbox(tmp_path)
    for n in (1, 2, 3):
        outbox.add_step(_step(n))
    outbox.add_round(_done)
    outbox.ack(2)
    outbox.close()
    again = Outbox(tmp_path)
    assert again.acked_seq == 2 and again.last_seq == 4
    assert [e.seq for e in again.entries] == [3, 4]
    assert again.last_step == (0, 3)
    assert again.add_step(_step(4)).seq == 5  # numbering goes on


def test_replay_coalesces_runs_of_metrics_and_keeps_round_results_apart(tmp_path) -> None:
    outbox = Outbox(tmp_path, simulated="pi4-4gb")
    for n in (1, 2):
        outbox.add_step(_step(n))
    outbox.add_round(_done)
    outbox.add_step(_step(1, round_number=1))
    frames = [(frame.last_seq, decode(frame.text)) for frame in outbox.frames_after(0)]
    assert [last for last, _ in frames] == [2, 3, 4]
    first = frames[0][1]
    assert isinstance(first, StepMetrics) and [m.seq for m in first.metrics] == [1, 2]
    assert first.simulated == "pi4-4gb"
    assert isinstance(frames[1][1], RoundDone)
    assert [frame.last_seq for frame in outbox.frames_after(3)] == [4]


def test_a_round_result_keeps_its_pace_across_a_restart_and_one_written_without_it_replays_unpaced(
        tmp_path) -> None:
    outbox = Outbox(tmp_path)
    outbox.add_step(_step(1))
    outbox.add_round(lambda seq: _done(seq, paced_bytes_per_s=2500.0))
    outbox.close()
    # a result an agent from before the field wrote: the same line without it
    old = json.loads(encode(_done(3, paced_bytes_per_s=1.0)))
    del old["paced_bytes_per_s"]
    with open(tmp_path / "outbox.jsonl", "a") as f:
        f.write(json.dumps(old) + "\n")
    again = Outbox(tmp_path)
    assert [(frame.last_seq, frame.paced_bytes_per_s) for frame in again.frames_after(0)] == [
        (1, None), (2, 2500.0), (3, None)]  # metrics go unpaced; each result at what its line says


def test_a_line_cut_off_by_a_kill_is_dropped_and_the_rest_kept(tmp_path) -> None:
    outbox = Outbox(tmp_path)
    outbox.add_step(_step(1))
    outbox.close()
    with open(tmp_path / "outbox.jsonl", "a") as f:
        f.write('{"type":"step_metrics","v":1,"metr')
    again = Outbox(tmp_path)
    assert [e.seq for e in again.entries] == [1]


def test_compaction_drops_acknowledged_lines_but_remembers_the_last_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("device_agent.outbox.OUTBOX_COMPACT_EVERY", 3)
    outbox = Outbox(tmp_path)
    for n in range(1, 5):
        outbox.add_step(_step(n))
    outbox.ack(4)
    assert len((tmp_path / "outbox.jsonl").read_text().splitlines()) == 1
    outbox.close()
    again = Outbox(tmp_path)
    assert again.entries == [] and again.last_seq == 4 and again.last_step == (0, 4)
