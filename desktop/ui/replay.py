"""Replay: a recorded run played through the same views, at a chosen speed (for a venue whose network fails).

:func:`load_replay` turns a run directory's files into the engine events the
run emitted, each at the time it happened on the devices' clocks:
``metrics.jsonl`` (``shared.events`` lines: every device's steps tagged with
device and round, one Round per merged round, the untrained adapter's Eval as
round 0, the final Test), and beside it,
when present, ``plan.json`` (every plan, so the re-plans show), ``state.json``
(the devices' names and addresses, the run's settings) and ``profiles.json``.
A round starts when the one before it ended; a device's steps follow each
other by their own ``seconds``; the Round line comes ``seconds`` after its
round began. A local run's file (``deftly train``: no devices, no rounds) plays
as one device, its evaluations as the accuracy points.

:class:`ReplayPlayer` feeds those events to the window on a timer, so the
window cannot tell a replay from a run, except that it says "replay".
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal

from desktop.engine.events import (
    DeviceLost, DeviceProfiled, DeviceSeen, DeviceStatus, PhaseChanged, PlanMade, PlanView, RoundMerged,
    RoundStarted, RunFinished, StepReceived,
)
from shared.errors import InputError
from shared.events import Eval, Round, Step, Test, read_events
from shared.profiles import DeviceProfile
from shared.records import RecordError, from_plain

LOCAL_DEVICE = "local"  # the device name a local run's steps play under
TICK_MS = 33  # the player's timer: 30 updates a second


@dataclass(frozen=True)
class Replay:
    """A recorded run as timed engine events."""

    source: Path
    events: tuple[tuple[float, object], ...]  # (seconds from the start, event), in order
    rounds: int
    local_steps: int

    @property
    def duration_s(self) -> float:
        return self.events[-1][0] if self.events else 0.0


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def load_replay(path: Path) -> Replay:
    """Read a run (its directory, or its ``metrics.jsonl``) as timed events.

    Raises:
        InputError: no metrics file there, or a line that is not a training event (named by the reader).
    """
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.exists():
        raise InputError(f"--replay {path}: no metrics.jsonl there (give a run directory or its metrics.jsonl)")
    folder = metrics.parent
    recorded = read_events(metrics)
    state = _read_json(folder / "state.json")
    try:
        plans = [from_plain(PlanView, p, f"{folder / 'plan.json'} plan {i}")
                 for i, p in enumerate(_read_json(folder / "plan.json").get("plans", []))]
    except RecordError as exc:
        raise InputError(str(exc)) from None
    steps = [e for e in recorded if isinstance(e, Step)]
    fleet = any(s.round is not None for s in steps) or any(isinstance(e, Round) for e in recorded)
    if not fleet:
        return _local_replay(metrics, recorded)

    # Who is who: the plans and the state know a device's id, name and address; metrics name it by its label.
    ids: dict[str, str] = {}  # label -> id
    names: dict[str, str] = {}  # id -> name
    addresses: dict[str, str] = {}
    for plan in plans:
        for a in plan.assignments:
            ids[a.name], names[a.device] = a.device, a.name
    for d in state.get("devices", []):
        if isinstance(d, dict) and "id" in d:
            ids.setdefault(d.get("name", d["id"]), d["id"])
            names.setdefault(d["id"], d.get("name", d["id"]))
            addresses[d["id"]] = d.get("address", "")
    for s in steps:
        label = s.device or LOCAL_DEVICE
        ids.setdefault(label, label)
        names.setdefault(ids[label], label)
    settings = state.get("settings", {}) if isinstance(state.get("settings"), dict) else {}
    rounds = [e for e in recorded if isinstance(e, Round)]
    local_steps = int(settings.get("local_steps") or max((s.step for s in steps), default=0))
    total_rounds = int(settings.get("rounds") or max([r.round for r in rounds] + [s.round or 0 for s in steps] + [0]))

    timeline: list[tuple[float, object]] = [(0.0, PhaseChanged("discovering", "replay"))]
    for device, name in names.items():
        timeline.append((0.0, DeviceSeen(device, name, addresses.get(device, "recorded"), "address")))
        timeline.append((0.0, DeviceStatus(device, "paired", "replay")))
    profiles = _read_json(folder / "profiles.json")
    for device, entry in profiles.items():
        if device in names and isinstance(entry, dict) and isinstance(entry.get("profile"), dict):
            try:
                profile = from_plain(DeviceProfile, entry["profile"], f"{folder / 'profiles.json'} {device}")
            except RecordError:
                continue  # a profile this deftly cannot read is not worth failing a replay for
            timeline.append((0.0, DeviceProfiled(device, profile, bool(entry.get("cached")))))
    zero_shot = next((e for e in recorded if isinstance(e, Eval) and e.round == 0), None)
    if zero_shot is not None:  # the untrained adapter, evaluated while round 1 trained
        timeline.append((0.0, RoundMerged(Round(0, zero_shot.accuracy, zero_shot.examples, zero_shot.seconds))))
    plans_by_round = {p.first_round: p for p in plans}
    steps_by_round: dict[int, list[Step]] = {}
    for s in steps:
        steps_by_round.setdefault(s.round or 0, []).append(s)
    round_events = {r.round: r for r in rounds}
    clock = 0.0
    for number in sorted(set(steps_by_round) | set(round_events)):
        if number in plans_by_round:
            timeline.append((clock, PhaseChanged("planning", plans_by_round[number].reason)))
            timeline.append((clock, PlanMade(plans_by_round[number])))
        timeline.append((clock, PhaseChanged("training")))
        round_steps = steps_by_round.get(number, [])
        devices = list(dict.fromkeys(ids.get(s.device or LOCAL_DEVICE, s.device) for s in round_steps))
        timeline.append((clock, RoundStarted(number, devices)))
        ends: dict[str, float] = {}
        for device in devices:
            timeline.append((clock, DeviceStatus(device, "training", "replay", round=number)))
            ends[device] = clock
        for s in round_steps:
            device = ids.get(s.device or LOCAL_DEVICE, s.device)
            ends[device] += s.seconds if math.isfinite(s.seconds) and s.seconds > 0 else 0.0
            timeline.append((ends[device], StepReceived(s)))
        merged = round_events.get(number)
        end = clock + merged.seconds if merged is not None else max(ends.values(), default=clock)
        end = max(end, max(ends.values(), default=clock))
        if merged is not None:
            for label in merged.lost:
                device = ids.get(label, label)
                timeline.append((ends.get(device, end), DeviceLost(device, number, f"lost in round {number} "
                                                                                  "(recorded)")))
            timeline.append((end, RoundMerged(merged)))
        clock = end
    tests = [e for e in recorded if isinstance(e, Test)]
    adapter = folder / "adapter"
    timeline.append((clock, RunFinished(str(folder), str(adapter) if adapter.exists() else None, len(rounds),
                                        False, rounds[-1].accuracy if rounds else None,
                                        tests[-1].accuracy if tests else None, "replay")))
    timeline.append((clock, PhaseChanged("done", "replay")))
    timeline.sort(key=lambda item: item[0])  # stable: events at one time keep their order
    return Replay(metrics, tuple(timeline), total_rounds, local_steps)


def _local_replay(metrics: Path, recorded: list) -> Replay:
    """A ``deftly train`` run: one device, its evaluations as the accuracy points (numbered in order)."""
    device = LOCAL_DEVICE
    timeline: list[tuple[float, object]] = [(0.0, DeviceSeen(device, "this machine", "local", "address")),
                                            (0.0, PhaseChanged("training", "replay of a local run")),
                                            (0.0, DeviceStatus(device, "training", "replay", round=1))]
    clock = 0.0
    evaluations = 0
    last_step = 0
    for event in recorded:
        if isinstance(event, Step):
            clock += event.seconds if math.isfinite(event.seconds) and event.seconds > 0 else 0.0
            last_step = event.step
            timeline.append((clock, StepReceived(replace(event, device=device, round=1))))
        elif isinstance(event, Eval):
            evaluations += 1
            timeline.append((clock, RoundMerged(Round(evaluations, event.accuracy, event.examples, clock))))
    tests = [e for e in recorded if isinstance(e, Test)]
    timeline.append((clock, RunFinished(str(metrics.parent), None, evaluations, False, None,
                                        tests[-1].accuracy if tests else None, "replay")))
    timeline.append((clock, PhaseChanged("done", "replay")))
    return Replay(metrics, tuple(timeline), evaluations, last_step)


class ReplayPlayer(QObject):
    """Plays a :class:`Replay` into a callback at ``speed`` times the recorded pace."""

    batch = Signal(list)  # the events now due
    progressed = Signal(float, float)  # position, duration (seconds of the recording)
    finished = Signal()

    def __init__(self, replay: Replay, speed: float = 1.0, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.replay = replay
        self.set_speed(speed)
        self.position = 0.0
        self._next = 0
        self._last_wall: float | None = None
        self.timer = QTimer(self)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)

    @property
    def playing(self) -> bool:
        return self.timer.isActive()

    @property
    def done(self) -> bool:
        return self._next >= len(self.replay.events)

    def play(self) -> None:
        if not self.done:
            self._last_wall = time.monotonic()
            self.timer.start()

    def pause(self) -> None:
        self.timer.stop()
        self._last_wall = None

    def set_speed(self, speed: float) -> None:
        if not speed > 0:
            raise InputError(f"replay speed {speed}: must be more than 0")
        self.speed = speed

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last_wall is not None:
            self.position += (now - self._last_wall) * self.speed
        self._last_wall = now
        self.advance_to(self.position)

    def advance_to(self, position: float) -> None:
        """Emit every event up to ``position`` seconds of the recording."""
        self.position = position
        events = self.replay.events
        start = self._next
        while self._next < len(events) and events[self._next][0] <= position:
            self._next += 1
        if self._next > start:
            self.batch.emit([event for _t, event in events[start:self._next]])
        self.progressed.emit(min(position, self.replay.duration_s), self.replay.duration_s)
        if self.done:
            self.timer.stop()
            self.finished.emit()
