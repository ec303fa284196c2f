"""Tests for desktop/bench/agent.py's pure part, the codec fuzzer (the rest drives agent processes: `deftly bench agent`)."""
from __future__ import annotations

from desktop.bench.agent import _seed_frames, fuzz_codec


def test_the_fuzzer_mutates_real_frames_and_the_codec_refuses_them_without_crashing(tmp_path) -> None:
    seeds = _seed_frames(tmp_path / "no-outbox.jsonl")
    result = fuzz_codec(seeds, 2000, seed=5)
    assert result["frames"] == 2000 and result["crashes"] == 0, result["examples"]
    assert 0.5 * 2000 < result["refused"] < 2000  # most mutations break a frame, a few leave it valid
