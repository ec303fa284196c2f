"""What the engine tells its views: typed event records and the bus that delivers them.

Every event is a frozen record (``shared.records``: JSON-shaped fields, one codec),
so the dashboard, ``deftly run``'s progress display and a test all read the same
fields, never a dict keyed by strings. A view subscribes with a plain callback
(:meth:`EventBus.subscribe`) or takes an asyncio queue (:meth:`EventBus.queue`);
the engine's :class:`desktop.engine.state.EngineState` applies every event
before any subscriber sees it, so a view that reads the state inside its
callback reads the state *after* that event.

Device statuses (:data:`STATUSES`), in the order a device usually passes them:
``seen`` (found by mDNS or named by address) → ``pairing`` → ``paired`` →
``profiling`` → ``profiled`` → ``receiving`` (files on their way, with a
fraction) → ``ready`` → ``training`` (a round, with its step) → ``ready`` ...;
off the path: ``idle`` (paired but given no block), ``lost`` (its connection
dropped and did not come back within the patience window), ``error`` (it
reported an error it cannot recover from, with the message), ``stopped``.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Union

from export.progress import ExportProgress
from shared.events import Round, Step
from shared.profiles import DeviceProfile
from shared.records import to_plain

STATUSES = ("seen", "pairing", "paired", "profiling", "profiled", "receiving", "ready", "training", "idle",
            "lost", "error", "stopped")
PHASES = ("starting", "discovering", "pairing", "profiling", "planning", "exporting", "shipping", "training",
          "finishing", "done", "stopped", "failed")


@dataclass(frozen=True)
class PhaseChanged:
    """The run moved on: discovering, pairing, ... training, finishing, done (or stopped / failed)."""

    phase: str
    detail: str = ""
    kind = "phase"


@dataclass(frozen=True)
class DeviceSeen:
    """A device was found: by mDNS (``via`` "mdns") or named by address (``via`` "address")."""

    device: str  # the agent's stable id when known, else "host:port" until it says its id
    name: str
    address: str  # host:port
    via: str
    simulated: str | None = None  # the device class it simulates, if its advert says so
    arch: str | None = None  # what the agent says of itself (advert or hello), for its card before any profile
    cores: int | None = None
    memory_mb: float | None = None  # physical memory, or the simulated device's limit
    runtime: str | None = None  # e.g. "executorch 1.5.1"
    was: str | None = None  # the key it was known by until its hello said its id (an address typed in)
    kind = "device_seen"


@dataclass(frozen=True)
class DeviceGone:
    """mDNS says the device left (not the same as lost: its connection may still be up)."""

    device: str
    kind = "device_gone"


@dataclass(frozen=True)
class DeviceStatus:
    """A device's status changed (see :data:`STATUSES`), with a fraction while receiving."""

    device: str
    status: str
    detail: str = ""
    fraction: float | None = None  # receiving: bytes held / bytes needed
    round: int | None = None
    kind = "device_status"


@dataclass(frozen=True)
class DeviceProfiled:
    """A device's profile is known: measured now, or reused from the cache (``cached``)."""

    device: str
    profile: DeviceProfile
    cached: bool
    simulated: str | None = None
    kind = "device_profiled"


@dataclass(frozen=True)
class Assignment:
    """One device's part of a plan: its block and share, and what the plan predicts for it."""

    device: str  # agent id
    name: str  # the name the planner knows it by (its profile's name)
    block: str | None  # e.g. "L22-25"; None: idle in this plan
    first_layer: int | None
    last_layer: int | None
    offset: int | None  # the block's slice of the global b
    size: int | None
    share: float  # fraction of the link
    compute_s: float  # predicted: K local steps
    comm_s: float  # predicted: the round's bytes at this share
    round_s: float  # predicted compute + comm
    memory_bytes: float
    memory_limit_bytes: float
    profile: str  # "measured YYYY-MM-DD" or "estimated"


@dataclass(frozen=True)
class PlanView:
    """A plan as the engine runs it: who trains which block from which round on, and why."""

    first_round: int
    reason: str  # "start", "pi4 lost in round 3", ...
    policy: str  # "planned" (CRUNCH + bandwidth) or "equal_random"
    round_s: float  # predicted round latency
    assignments: tuple[Assignment, ...]
    baselines: dict[str, float | None]  # baseline -> predicted round latency; None: infeasible
    planner_s: float  # wall time of the planner call
    job: str
    layers: int = 0  # the model's decoder layers (a view draws the frozen ones too); 0: not known

    def active(self) -> tuple[Assignment, ...]:
        """The assignments that train a block, shallowest block first."""
        return tuple(sorted((a for a in self.assignments if a.block is not None), key=lambda a: a.first_layer))

    def of(self, device: str) -> Assignment | None:
        return next((a for a in self.assignments if a.device == device), None)


@dataclass(frozen=True)
class PlanMade:
    """The engine planned (at the start, or again after a device was lost or came back)."""

    plan: PlanView
    kind = "plan"


@dataclass(frozen=True)
class ExportUpdate:
    """Programs being exported for a plan: the exporter's own progress record, passed through."""

    progress: ExportProgress  # stage, state, fraction of the whole export, elapsed, estimate of what is left
    kind = "export"


@dataclass(frozen=True)
class TransferProgress:
    """Files going to a device: bytes it holds of the bytes this step needs (skipped ones count as held)."""

    device: str
    file: str
    held: int
    total: int
    skipped: bool = False  # the device already had this file: nothing was sent
    kind = "transfer"


@dataclass(frozen=True)
class RoundStarted:
    """A round began: these devices received the global b."""

    round: int
    devices: list[str]
    kind = "round_started"


@dataclass(frozen=True)
class StepReceived:
    """One training step of one device (its Step carries device and round)."""

    step: Step
    kind = "step_received"


@dataclass(frozen=True)
class DeviceRoundDone:
    """A device returned its block for a round."""

    device: str
    round: int
    steps: int
    seconds: float  # compute on the device's clock
    measured_round_s: float  # compute + the round's transfers, as the round time the plan predicts
    mean_loss: float | None = None
    download_s: float | None = None  # of measured_round_s: sending StartRound until the agent took it
    upload_s: float | None = None  # of measured_round_s: the last metric until the block arrived
    predicted_s: float | None = None  # the round as predicted when it started (desktop.engine.predict)
    kind = "device_round_done"


@dataclass(frozen=True)
class RoundMerged:
    """A round ended: the blocks were merged and the merged adapter evaluated (a ``shared.events.Round``)."""

    round: Round
    kind = "round_merged"


@dataclass(frozen=True)
class DeviceLost:
    """A device's connection dropped and did not come back within the patience window."""

    device: str
    round: int | None  # the round it was in (its result for that round is lost), None between rounds
    reason: str
    kind = "device_lost"


@dataclass(frozen=True)
class DeviceBack:
    """A lost device is connected again; it rejoins at the start of ``round``."""

    device: str
    round: int
    kind = "device_back"


@dataclass(frozen=True)
class DeviceError:
    """Something went wrong, in plain words: which device (None: the run), what, and what to do."""

    device: str | None
    message: str
    advice: str = ""
    fatal: bool = False  # the run cannot go on
    kind = "error"


@dataclass(frozen=True)
class Notice:
    """A line worth showing that changes no state (a cache hit, a resumed round)."""

    message: str
    kind = "notice"


@dataclass(frozen=True)
class RunFinished:
    """The run is over: its directory, the adapter written from the last merged b, and why it ended."""

    out: str
    adapter: str | None
    rounds_done: int
    stopped: bool  # ended early (Ctrl-C, stop(), no device left)
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    reason: str = ""
    kind = "finished"


EngineEvent = Union[PhaseChanged, DeviceSeen, DeviceGone, DeviceStatus, DeviceProfiled, PlanMade, ExportUpdate,
                    TransferProgress, RoundStarted, StepReceived, DeviceRoundDone, RoundMerged, DeviceLost,
                    DeviceBack, DeviceError, Notice, RunFinished]
ENGINE_EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (
    PhaseChanged, DeviceSeen, DeviceGone, DeviceStatus, DeviceProfiled, PlanMade, ExportUpdate, TransferProgress,
    RoundStarted, StepReceived, DeviceRoundDone, RoundMerged, DeviceLost, DeviceBack, DeviceError, Notice,
    RunFinished)}


def engine_event_to_plain(event: EngineEvent) -> dict:
    """The event as JSON values with its ``kind`` first (for logs and ``deftly run --events``)."""
    return {"kind": event.kind, **to_plain(event)}


Callback = Callable[[EngineEvent], None]


@dataclass
class EventBus:
    """Delivers each event to a reducer first, then to every callback and queue, in order.

    A callback that raises is dropped from the bus after its error is reported to
    the others as a :class:`Notice`: a broken view must not stop a training run.
    """

    reducer: Callable[[EngineEvent], None] | None = None
    _callbacks: list[Callback] = field(default_factory=list)
    _queues: list[asyncio.Queue] = field(default_factory=list)

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event)`` for every event from now on; returns the function that unsubscribes."""
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def queue(self, maxsize: int = 0) -> asyncio.Queue:
        """A queue that receives every event from now on (unbounded by default; a full one drops the oldest)."""
        q: asyncio.Queue = asyncio.Queue(maxsize)
        self._queues.append(q)
        return q

    def emit(self, event: EngineEvent) -> None:
        if self.reducer is not None:
            self.reducer(event)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 — a view's bug, reported and isolated
                self._callbacks.remove(callback)
                self.emit(Notice(f"a view's event callback failed and was unsubscribed: {type(exc).__name__}: {exc}"))
        for q in self._queues:
            if q.maxsize and q.full():
                q.get_nowait()
            q.put_nowait(event)
