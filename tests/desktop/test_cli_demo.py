"""`deftly demo` end to end on the real SmolLM2 (slow: the first export lowers for minutes)."""
from __future__ import annotations

import pytest

from desktop.cli import main
from shared.events import Step, read_events


@pytest.mark.slow
def test_demo_plans_exports_trains_and_draws(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--eval-every", "3", "--eval-limit", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1/4 plan" in printed and "round latency" in printed and "4/4 report" in printed
    run = out / "train"
    events = read_events(run / "metrics.jsonl")
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2, 3]
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "curves.png").stat().st_size > 10_000
    # A second run resumes the finished run instead of refusing the directory.
    assert main(["demo", "--steps", "3", "--eval-every", "3", "--eval-limit", "16", "--out", str(out)]) == 0
