"""Replay: a run directory written by the engine's own RunDir plays through the window as the run did."""
from __future__ import annotations

from pathlib import Path

import pytest

from desktop.engine.events import DeviceLost, PlanMade, RoundMerged, StepReceived
from desktop.engine.rundir import DeviceRecord, RunDir, RunSettings
from desktop.ui.replay import ReplayPlayer, load_replay
from shared.errors import InputError
from shared.events import Eval, Round, Step, Test
from tests.desktop.ui.conftest import LAB, lab_plan

K = 4


def recorded_run(folder: Path) -> dict[str, list[float]]:
    """Two rounds of lab3, the phone lost in round 2 and re-planned; returns each device's losses."""
    run = RunDir(folder)
    record = run.create(RunSettings(job="smollm2/rotten_tomatoes/top:8", rounds=3, local_steps=K, lr=0.1, eps=0.01,
                                    seed=0, policy="planned"))
    for i, (device, (name, _cls)) in enumerate(LAB.items()):
        record = record.with_device(DeviceRecord(device, name, f"127.0.0.1:{9100 + i}"))
    run.save(record)
    first, second = lab_plan(), lab_plan({"id-pi4": "pi4", "id-laptop": "laptop"}, 3, "phone lost in round 2")
    run.write_plans([first, second])
    losses: dict[str, list[float]] = {d: [] for d in LAB}
    events = [Eval(step=0, split="validation", accuracy=0.77, examples=200, seconds=3.0, round=0)]
    for r in (1, 2, 3):
        for device, (name, _cls) in LAB.items():
            if name == "phone" and r == 3:
                continue
            for k in range(1, (2 if name == "phone" and r == 2 else K) + 1):
                loss = 0.7 - 0.01 * r - 0.001 * k + 0.0001 * len(losses[device])
                losses[device].append(loss)
                events.append(Step(k, loss, 0.01, 0.5, 32, 300.0, 0.1, device=name, round=r))
        events.append(Round(r, 0.77 + 0.01 * r, 200, 4.0, {"pi4": 3.9}, {"pi4": 3.5},
                            ["phone"] if r == 2 else []))
    events.append(Test(step=12, split="test", accuracy=0.79, examples=500, seconds=0.0))
    run.write_events(events)
    run.close()
    return losses


def test_a_recorded_run_becomes_the_events_it_emitted_in_order(tmp_path) -> None:
    recorded_run(tmp_path / "run")
    replay = load_replay(tmp_path / "run")
    kinds = [type(e).__name__ for _t, e in replay.events]
    times = [t for t, _e in replay.events]
    assert times == sorted(times)
    plans = [e for _t, e in replay.events if isinstance(e, PlanMade)]
    assert [p.plan.first_round for p in plans] == [1, 3]
    merged = [e.round.round for _t, e in replay.events if isinstance(e, RoundMerged)]
    assert merged == [0, 1, 2, 3]  # round 0: the untrained adapter
    lost = [e for _t, e in replay.events if isinstance(e, DeviceLost)]
    assert [(e.device, e.round) for e in lost] == [("id-phone", 2)]
    assert kinds[-2:] == ["RunFinished", "PhaseChanged"]
    assert (replay.rounds, replay.local_steps) == (3, K)
    # A round's steps follow each other by their seconds; the next round starts after the Round line.
    first_steps = [t for t, e in replay.events if isinstance(e, StepReceived) and e.step.device == "pi4"][:K + 1]
    assert first_steps[:K] == pytest.approx([0.5 * k for k in range(1, K + 1)])
    assert first_steps[K] == pytest.approx(4.0 + 0.5)


def test_the_replay_plays_through_the_window_and_ends_where_the_run_did(tmp_path, window, qtbot) -> None:
    losses = recorded_run(tmp_path / "run")
    player = ReplayPlayer(load_replay(tmp_path / "run"), speed=200.0)
    window.attach_replay(player)
    with qtbot.waitSignal(player.finished, timeout=20_000):
        player.play()
    for device in LAB:
        qtbot.waitUntil(lambda d=device: len(window.live.plotted(d)[1]) == len(losses[d]))
        assert window.live.plotted(device)[1].tolist() == pytest.approx(losses[device])
    qtbot.waitUntil(lambda: window.live.plotted_accuracy()[0].tolist() == [0, 1, 2, 3])
    assert "Re-planned from round 3" in window.plan.reason.text()
    qtbot.waitUntil(lambda: "LOST" in window.devices.cards["id-phone"].status.text()
                    if "id-phone" in window.devices.cards else False)
    assert "zero-shot 0.770" in window.results.accuracy.text() and "test 0.790" in window.results.accuracy.text()


def test_a_local_runs_metrics_play_as_one_device(tmp_path, window, qtbot) -> None:
    metrics = tmp_path / "metrics.jsonl"
    run = RunDir(tmp_path)
    run.write_events([Step(n, 0.7 - 0.01 * n, 0.01, 0.3, 32, 200.0, 0.1) for n in range(1, 6)]
                     + [Eval(step=5, split="validation", accuracy=0.8, examples=50, seconds=1.0)])
    run.close()
    player = ReplayPlayer(load_replay(metrics), speed=100.0)
    window.attach_replay(player)
    player.advance_to(player.replay.duration_s)
    qtbot.waitUntil(lambda: len(window.live.plotted("local")[1]) == 5)
    qtbot.waitUntil(lambda: window.live.plotted_accuracy()[1].tolist() == [0.8])


def test_a_folder_without_metrics_is_named(tmp_path) -> None:
    with pytest.raises(InputError, match="no metrics.jsonl"):
        load_replay(tmp_path)
