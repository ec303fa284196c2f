"""`deftly demo` end to end on the real SmolLM2 (slow: the first export lowers for minutes)."""
from __future__ import annotations

import json

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
    first = (run / "metrics.jsonl").read_text()
    events = read_events(run / "metrics.jsonl")
    assert [e.step for e in events if isinstance(e, Step)] == [1, 2, 3]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "curves.png").stat().st_size > 10_000
    # A second run with more steps resumes the finished run instead of refusing the directory:
    # it continues from the checkpoint's step 3, its metrics continue the first run's, and no
    # step is run again.
    assert main(["demo", "--steps", "5", "--eval-every", "3", "--eval-limit", "16", "--out", str(out)]) == 0
    second = (run / "metrics.jsonl").read_text()
    assert second.startswith(first)  # the first run's lines untouched, in order
    added = [json.loads(line) for line in second[len(first):].splitlines()]
    assert [e["step"] for e in added if e["kind"] == "step"] == [4, 5]
    assert [(e["kind"], e["step"]) for e in added if e["kind"] != "step"] == [("eval", 5), ("test", 5)]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 5
