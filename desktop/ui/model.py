"""What the window shows, fed by the engine's events: a mirror of the engine's state, plus view bookkeeping.

:class:`DashboardModel` applies each event batch to its own
:class:`desktop.engine.state.EngineState` (the engine's reducer, so the mirror
is exactly what the events said) and tells the views what changed
(:class:`Changes`), so a view redraws only what it must. It also keeps what
only a view needs: each device's colour, and the rate of each transfer so a
progress bar can say how long is left. No Qt here: the replay, the benchmark
and the tests feed it the same way the engine does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from desktop.engine.events import (
    DeviceBack, DeviceError, DeviceGone, DeviceLost, DeviceProfiled, DeviceRoundDone, DeviceSeen, DeviceStatus,
    ExportUpdate, Notice, PhaseChanged, PlanMade, RoundMerged, RoundStarted, RunFinished, StepReceived,
    TransferProgress,
)
from desktop.engine.state import EngineState
from desktop.ui.colours import DeviceColours

_DEVICE_EVENTS = (DeviceSeen, DeviceGone, DeviceStatus, DeviceProfiled, DeviceRoundDone, DeviceLost, DeviceBack,
                  TransferProgress)


@dataclass
class Changes:
    """What one batch of events changed, for the views to redraw."""

    devices: set[str] = field(default_factory=set)  # cards to refresh
    series: set[str] = field(default_factory=set)  # devices with new step points
    plan: bool = False  # a new plan, or measured round times to put beside the predicted ones
    rounds: bool = False  # a round merged (accuracy, round times)
    phase: bool = False
    export: bool = False
    finished: bool = False
    errors: list[DeviceError] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    lost: list[DeviceLost] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.series or self.plan or self.rounds or self.phase or self.export
                    or self.finished or self.errors or self.notices)


@dataclass
class TransferClock:
    """Bytes held over time for one device's transfer, to say how long is left."""

    started: float
    first_held: int
    held: int = 0
    total: int = 0
    at: float = 0.0

    def left_s(self) -> float | None:
        """Seconds left at the average rate since this transfer started; None until there is a rate."""
        moved, elapsed = self.held - self.first_held, self.at - self.started
        if moved <= 0 or elapsed <= 0 or self.total <= self.held:
            return None
        return (self.total - self.held) / (moved / elapsed)


class DashboardModel:
    """The views' shared model: the state mirror, the device colours, transfer clocks.

    Args:
        clock: seconds, monotonic (a test or the replay passes its own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = EngineState()
        self.colours = DeviceColours()
        self.transfers: dict[str, TransferClock] = {}
        self.export_at: float | None = None  # when the exporter last said something (clock seconds)
        self.events_applied = 0
        self._clock = clock

    def colour(self, device: str) -> str:
        return self.colours(device)

    def exporting(self, quiet_s: float) -> bool:
        """Whether an export is under way: the phase says so, or the exporter spoke within ``quiet_s``
        (the job's eval program and probe export while devices are still being found)."""
        export = self.state.export
        if export is None or self.state.phase in ("done", "stopped", "failed"):
            return False
        if export.stage == "done" and export.state == "end":
            return False
        recent = self.export_at is not None and self._clock() - self.export_at < quiet_s
        return self.state.phase == "exporting" or recent

    def transfer_left_s(self, device: str) -> float | None:
        clock = self.transfers.get(device)
        return clock.left_s() if clock is not None else None

    def apply(self, events: Iterable) -> Changes:
        """Apply a batch of engine events, in order; returns what they changed."""
        changes = Changes()
        for event in events:
            self.state.apply(event)
            self.events_applied += 1
            self._note(event, changes)
        return changes

    def _note(self, event, changes: Changes) -> None:
        if isinstance(event, StepReceived):
            view = self.state.device_named(event.step.device or "")
            if view is not None:
                changes.series.add(view.id)
                changes.devices.add(view.id)
            return
        if isinstance(event, DeviceSeen) and event.was:
            self.colours.rename(event.was, event.device)
            changes.devices.add(event.was)
        if isinstance(event, _DEVICE_EVENTS):
            changes.devices.add(event.device)
            self.colour(event.device)  # colours follow the order devices were first seen
        if isinstance(event, TransferProgress):
            self._transfer(event)
        elif isinstance(event, DeviceRoundDone):
            changes.plan = True
        elif isinstance(event, DeviceLost):
            changes.lost.append(event)
        elif isinstance(event, PlanMade):
            changes.plan = True
            changes.devices.update(self.state.devices)
            for assignment in event.plan.active():
                self.colour(assignment.device)
        elif isinstance(event, (RoundMerged, RoundStarted)):
            changes.rounds = True
            changes.plan = True
            if isinstance(event, RoundStarted):
                changes.devices.update(event.devices)
        elif isinstance(event, PhaseChanged):
            changes.phase = True
        elif isinstance(event, ExportUpdate):
            changes.export = True
            self.export_at = self._clock()
        elif isinstance(event, DeviceError):
            changes.errors.append(event)
            if event.device:
                changes.devices.add(event.device)
        elif isinstance(event, Notice):
            changes.notices.append(event.message)
        elif isinstance(event, RunFinished):
            changes.finished = True
            changes.phase = True

    def _transfer(self, event: TransferProgress) -> None:
        now = self._clock()
        clock = self.transfers.get(event.device)
        if clock is None or event.held < clock.held or event.total != clock.total:
            clock = self.transfers[event.device] = TransferClock(started=now, first_held=event.held)
        clock.held, clock.total, clock.at = event.held, event.total, now
