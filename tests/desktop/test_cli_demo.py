"""`deftly demo --headless` end to end on the real SmolLM2 (slow: the first export lowers for minutes)."""
from __future__ import annotations

import pytest

from desktop.cli import main
from shared.events import Round, Step, read_events


@pytest.mark.slow
def test_the_demo_trains_smollm2_on_three_simulated_devices(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--rounds", "1", "--local-steps", "2", "--eval-limit", "16",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "starting 3 simulated agents" in printed and "stopped the 3 agents" in printed
    events = read_events(out / "metrics.jsonl")
    assert len({e.device for e in events if isinstance(e, Step)}) >= 2
    assert [e.round for e in events if isinstance(e, Round)] == [1]
    assert (out / "dashboard.png").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
