"""The engine's state as a view sees it: devices, plan, round, per-device series, errors.

:class:`EngineState` is changed by one function only, :meth:`EngineState.apply`,
which the engine calls with every event before a subscriber sees it; so the
state is always exactly what the events so far say, and a view may either keep
its own copy of what it draws (from the events) or read this one. Nothing here
does I/O or knows about sockets; it is plain data and a reducer.

Per-device series (loss, step seconds, RSS) arrive into preallocated ring
buffers (:class:`Series`), so a long run neither grows memory nor slows the
plots; a view reads ``series.view()`` (x = the device's global step count).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from desktop.engine.events import (
    DeviceBack, DeviceError, DeviceGone, DeviceLost, DeviceProfiled, DeviceRoundDone, DeviceSeen, DeviceStatus,
    EngineEvent, ExportUpdate, Notice, PhaseChanged, PlanMade, PlanView, RoundMerged, RoundStarted, RunFinished,
    StepReceived, TransferProgress,
)
from export.progress import ExportProgress
from shared.profiles import DeviceProfile

SERIES_CAPACITY = 8192  # points kept per device series; older ones roll off
CLEARS_ERROR = ("paired", "profiled", "ready", "training")  # statuses after which a device's last error is stale


class Series:
    """A ring buffer of (x, value) pairs, allocated whole at its first point.

    Not at its device's first sight: a hundred devices found at once would zero 300 buffers in
    one event batch (a frame of ~20 ms on the dashboard), and a device that never trains (one
    seen and left alone) needs none.
    """

    def __init__(self, capacity: int = SERIES_CAPACITY) -> None:
        self.capacity = capacity
        self._x = self._y = np.zeros(0, dtype=np.float64)
        self._count = 0  # points ever appended

    def append(self, x: float, y: float) -> None:
        if not self._count:
            self._x = np.zeros(self.capacity, dtype=np.float64)
            self._y = np.zeros(self.capacity, dtype=np.float64)
        i = self._count % self.capacity
        self._x[i], self._y[i] = x, y
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """(x [n], y [n]) oldest first; copies, safe to keep."""
        n = len(self)
        if self._count <= self.capacity:
            return self._x[:n].copy(), self._y[:n].copy()
        start = self._count % self.capacity
        order = np.r_[start:self.capacity, 0:start]
        return self._x[order], self._y[order]

    def last(self) -> float | None:
        if not self._count:
            return None
        return float(self._y[(self._count - 1) % self.capacity])


@dataclass
class DeviceView:
    """One device as the operator sees it."""

    id: str
    name: str
    address: str
    via: str  # "mdns" or "address"
    status: str = "seen"
    detail: str = ""
    fraction: float | None = None  # while receiving
    simulated: str | None = None
    arch: str | None = None
    cores: int | None = None
    memory_mb: float | None = None
    runtime: str | None = None
    profile: DeviceProfile | None = None
    profile_cached: bool = False
    block: str | None = None  # in the current plan
    share: float | None = None
    predicted_round_s: float | None = None
    round: int | None = None  # the round it is training, or last trained
    step: int = 0  # steps done in that round
    steps_total: int = 0  # steps done over the run
    loss: Series = field(default_factory=Series)
    step_s: Series = field(default_factory=Series)
    rss_mb: Series = field(default_factory=Series)
    measured_round_s: dict[int, float] = field(default_factory=dict)  # round -> seconds
    # round -> seconds, as the engine predicted the round when it started (desktop.engine.predict)
    round_predicted_s: dict[int, float] = field(default_factory=dict)
    error: str | None = None  # the last error, in plain words
    advice: str = ""
    seen_by_mdns: bool = False

    @property
    def step_rate(self) -> float | None:
        """Steps per second on the device's clock, from its last step."""
        last = self.step_s.last()
        return None if not last else 1.0 / last


@dataclass(frozen=True)
class ErrorNote:
    """An error as shown: when, which device (None: the run), what, what to do."""

    at: float  # time.time()
    device: str | None
    message: str
    advice: str
    fatal: bool


@dataclass
class EngineState:
    """Everything the engine knows that a view may show."""

    phase: str = "starting"
    phase_detail: str = ""
    devices: dict[str, DeviceView] = field(default_factory=dict)
    plan: PlanView | None = None
    plans: list[PlanView] = field(default_factory=list)  # every plan of the run, in order
    labels: dict[str, str] = field(default_factory=dict)  # the plan's name of a device -> its id (metrics use names)
    round: int = 0  # the round running or last merged
    rounds: int = 0  # rounds asked for
    local_steps: int = 0
    accuracy: list[tuple[int, float]] = field(default_factory=list)  # (round, global validation accuracy)
    round_seconds: list[tuple[int, float]] = field(default_factory=list)  # (round, wall seconds)
    lost: list[tuple[int | None, str]] = field(default_factory=list)  # (round, device) for every loss
    errors: list[ErrorNote] = field(default_factory=list)
    export: ExportProgress | None = None  # the exporter's latest progress record
    notices: list[str] = field(default_factory=list)
    finished: RunFinished | None = None

    def device(self, device_id: str) -> DeviceView | None:
        return self.devices.get(device_id)

    def device_named(self, device: str) -> DeviceView | None:
        """A device by its id, or by the name the plan and the metrics know it by (a Step's ``device``)."""
        return self.devices.get(device) or self.devices.get(self.labels.get(device, ""))

    def active_devices(self) -> list[DeviceView]:
        """Devices given a block by the current plan."""
        if self.plan is None:
            return []
        return [self.devices[a.device] for a in self.plan.active() if a.device in self.devices]

    def apply(self, event: EngineEvent) -> None:
        """Change the state as ``event`` says (the one place the state changes)."""
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)


def _phase(state: EngineState, event: PhaseChanged) -> None:
    state.phase, state.phase_detail = event.phase, event.detail


def _seen(state: EngineState, event: DeviceSeen) -> None:
    if event.was and event.was != event.device:  # one device, now known by its id: one card, not two
        old = state.devices.pop(event.was, None)
        if old is not None and event.device not in state.devices:
            old.id = event.device
            state.devices[event.device] = old
    view = state.devices.get(event.device)
    if view is None:
        view = state.devices[event.device] = DeviceView(event.device, event.name, event.address, event.via)
    view.name, view.address = event.name, event.address
    view.simulated = event.simulated or view.simulated
    for name in ("arch", "cores", "memory_mb", "runtime"):
        if getattr(event, name) is not None:
            setattr(view, name, getattr(event, name))
    # mDNS only says "seen": a lost device stays lost until its connection is back.
    view.seen_by_mdns = view.seen_by_mdns or event.via == "mdns"


def _gone(state: EngineState, event: DeviceGone) -> None:
    view = state.devices.get(event.device)
    if view is not None:
        view.seen_by_mdns = False


def _status(state: EngineState, event: DeviceStatus) -> None:
    view = state.devices.get(event.device)
    if view is None:
        return
    view.status, view.detail = event.status, event.detail
    view.fraction = event.fraction
    if event.status in CLEARS_ERROR:  # the device got past what went wrong: its card stops saying so
        view.error, view.advice = None, ""
    if event.round is not None:
        view.round = event.round
    if event.status == "training" and event.round is not None and view.round != event.round:
        view.step = 0


def _profiled(state: EngineState, event: DeviceProfiled) -> None:
    view = state.devices.get(event.device)
    if view is not None:
        view.profile, view.profile_cached = event.profile, event.cached
        view.simulated = event.simulated or view.simulated


def _plan(state: EngineState, event: PlanMade) -> None:
    state.plan = event.plan
    state.plans.append(event.plan)
    state.labels.update({a.name: a.device for a in event.plan.assignments})
    for view in state.devices.values():
        part = event.plan.of(view.id)
        view.block = part.block if part else None
        view.share = part.share if part and part.block else None
        view.predicted_round_s = part.round_s if part and part.block else None


def _export(state: EngineState, event: ExportUpdate) -> None:
    state.export = event.progress


def _transfer(state: EngineState, event: TransferProgress) -> None:
    view = state.devices.get(event.device)
    if view is not None and event.total:
        view.fraction = event.held / event.total


def _round_started(state: EngineState, event: RoundStarted) -> None:
    state.round = event.round
    for device in event.devices:
        view = state.devices.get(device)
        if view is not None:
            view.round, view.step = event.round, 0


def _step(state: EngineState, event: StepReceived) -> None:
    step = event.step
    view = state.device_named(step.device or "")
    if view is None:
        return
    view.step = step.step
    view.steps_total += 1
    x = float(view.steps_total)
    view.loss.append(x, step.loss if math.isfinite(step.loss) else math.nan)
    view.step_s.append(x, step.seconds)
    view.rss_mb.append(x, step.rss_mb)


def _device_round(state: EngineState, event: DeviceRoundDone) -> None:
    view = state.devices.get(event.device)
    if view is not None:
        view.measured_round_s[event.round] = event.measured_round_s
        if event.predicted_s is not None:
            view.round_predicted_s[event.round] = event.predicted_s


def _merged(state: EngineState, event: RoundMerged) -> None:
    state.round = max(state.round, event.round.round)  # round 0 (the untrained adapter) lands during round 1
    state.accuracy.append((event.round.round, event.round.accuracy))
    state.round_seconds.append((event.round.round, event.round.seconds))
    # The round's line holds every device's measured and predicted time: a replay has no other source.
    for name, seconds in event.round.measured_round_s.items():
        view = state.device_named(name)
        if view is not None:
            view.measured_round_s[event.round.round] = seconds
            predicted = event.round.predicted_round_s.get(name)
            if predicted is not None:
                view.round_predicted_s[event.round.round] = predicted


def _lost(state: EngineState, event: DeviceLost) -> None:
    state.lost.append((event.round, event.device))
    view = state.devices.get(event.device)
    if view is not None:
        view.status, view.detail = "lost", event.reason


def _back(state: EngineState, event: DeviceBack) -> None:
    view = state.devices.get(event.device)
    if view is not None:
        view.status, view.detail = "paired", f"back; rejoins at round {event.round}"


def _error(state: EngineState, event: DeviceError) -> None:
    state.errors.append(ErrorNote(time.time(), event.device, event.message, event.advice, event.fatal))
    view = state.devices.get(event.device or "")
    if view is not None:
        view.error, view.advice = event.message, event.advice


def _notice(state: EngineState, event: Notice) -> None:
    state.notices.append(event.message)
    del state.notices[:-200]  # the last ones are what a view shows


def _finished(state: EngineState, event: RunFinished) -> None:
    state.finished = event


_HANDLERS = {
    PhaseChanged: _phase, DeviceSeen: _seen, DeviceGone: _gone, DeviceStatus: _status, DeviceProfiled: _profiled,
    PlanMade: _plan, ExportUpdate: _export, TransferProgress: _transfer, RoundStarted: _round_started,
    StepReceived: _step, DeviceRoundDone: _device_round, RoundMerged: _merged, DeviceLost: _lost,
    DeviceBack: _back, DeviceError: _error, Notice: _notice, RunFinished: _finished,
}
