"""Training events: one typed schema for `metrics.jsonl`, the agent's stream, the engine and the report.

Every event is a frozen record (``shared.records``) with a ``kind`` that names it
on the wire and in files. A local run (`deftly train`) emits, in order::

    Start → (Step | Eval | Checkpoint)* → Test → Done

and writes its Step, Eval and Test events as the lines of ``<out>/metrics.jsonl``.
In a fleet run, every event a device emits carries ``device`` and ``round``, and
the engine adds one Round event per round (the merged adapter's global accuracy
and the round's measured and predicted times), so one ``metrics.jsonl`` holds
every device's stream and the global curve.

One encoder, one decoder: :func:`event_to_plain` / :func:`event_from_plain` for
dicts, :func:`event_to_line` / :func:`event_from_line` for JSON lines. The decoder
is strict (an unknown kind or field, a missing field or a wrong type is an
``InputError`` naming it), so a consumer never meets a ``KeyError``.

Fields (seconds are wall seconds of the device's clock; a simulated device's
clock is its simulated one, see the agent's ``--simulate``):

* Start: first ``step`` of this run, total ``steps``, ``resumed``, the settings
  ``lr`` / ``eps`` / ``schedule`` / ``batches`` / ``average_from``, and ``train_examples``.
* Step: ``step`` (1-based, after the step), ``loss`` (mean over the 2q copies),
  ``g_abs_mean`` (mean |g|), ``seconds``, ``seq_len`` (the length bucket it ran
  at), ``rss_mb`` and ``peak_rss_mb`` (resident memory now and at its peak), ``lr``;
  from an agent also ``ended_at``, the Unix time the step ended on the device's
  wall clock (a simulated device's ``seconds`` are simulated, this is not).
* Eval: ``split``, ``accuracy``, ``examples``, ``seconds``; with tail averaging
  also ``averaged_steps`` and ``last_iterate_accuracy``.
* Checkpoint: ``step`` and the checkpoint's ``path``.
* Test: as Eval, on the test split.
* Done: ``step`` and the ``adapter`` directory.
* Round (engine): ``round``, the merged adapter's validation ``accuracy`` on
  ``examples`` examples, ``seconds`` of wall time, per device the measured and
  predicted round seconds, and the devices ``lost`` in this round.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Union

from shared.records import RecordError, from_plain, to_plain

EVENTS_VERSION = 1  # bump when a field changes meaning; added optional fields do not need it


@dataclass(frozen=True)
class Start:
    step: int
    steps: int
    resumed: bool
    lr: float
    eps: float
    schedule: str
    batches: str
    average_from: int | None
    train_examples: int
    device: str | None = None
    round: int | None = None
    kind = "start"


@dataclass(frozen=True)
class Step:
    step: int
    loss: float
    g_abs_mean: float
    seconds: float
    seq_len: int
    rss_mb: float
    lr: float
    peak_rss_mb: float | None = None
    device: str | None = None
    round: int | None = None
    ended_at: float | None = None  # Unix time at the step's end on the device's wall clock (agents set it)
    kind = "step"


@dataclass(frozen=True)
class Eval:
    step: int
    split: str
    accuracy: float
    examples: int
    seconds: float
    averaged_steps: int | None = None
    last_iterate_accuracy: float | None = None
    device: str | None = None
    round: int | None = None
    kind = "eval"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: str
    device: str | None = None
    round: int | None = None
    kind = "checkpoint"


@dataclass(frozen=True)
class Test:
    step: int
    split: str
    accuracy: float
    examples: int
    seconds: float
    averaged_steps: int | None = None
    last_iterate_accuracy: float | None = None
    device: str | None = None
    round: int | None = None
    kind = "test"
    __test__ = False  # not a pytest test class, despite its name


@dataclass(frozen=True)
class Done:
    step: int
    adapter: str
    device: str | None = None
    round: int | None = None
    kind = "done"


@dataclass(frozen=True)
class Round:
    round: int
    accuracy: float
    examples: int
    seconds: float
    measured_round_s: dict[str, float] = field(default_factory=dict)  # device -> its round, seconds
    # device -> its round as predicted when the round started: at the lengths its steps would run,
    # calibrated by its earlier steps (desktop.engine.predict); a run before that wrote the plan's.
    predicted_round_s: dict[str, float] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)  # devices whose round was lost
    planned_round_s: dict[str, float] = field(default_factory=dict)  # device -> the plan's (every round alike)
    kind = "round"


Event = Union[Start, Step, Eval, Checkpoint, Test, Done, Round]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in (Start, Step, Eval, Checkpoint, Test, Done, Round)}
METRIC_KINDS = ("step", "eval", "test")  # the kinds a local run writes to metrics.jsonl


def event_to_plain(event: Event) -> dict:
    """The event as a dict of JSON values, ``kind`` first; optional fields left at None are omitted."""
    optional = _optional_fields(type(event))
    plain = {key: value for key, value in to_plain(event).items() if value is not None or key not in optional}
    return {"kind": event.kind, **plain}


@functools.cache
def _optional_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.default is None)


def event_from_plain(data: object, where: str = "event") -> Event:
    """Decode an event dict.

    Raises:
        InputError (RecordError): an unknown kind, or a field missing, unknown or of the wrong type.
    """
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RecordError(f"{where}: unknown event kind {kind!r} (expected one of {', '.join(EVENT_TYPES)})")
    return from_plain(cls, data, f"{where} ({kind})", ignore=frozenset({"kind"}))


def event_to_line(event: Event) -> str:
    """One JSON line (no newline); non-finite numbers as JSON's NaN / Infinity, which Python reads back."""
    return json.dumps(event_to_plain(event), allow_nan=True)


def event_from_line(line: str, where: str = "event") -> Event:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    return event_from_plain(data, where)


def append_events(path: Path, events: Iterable[Event]) -> None:
    """Append events to a JSON-lines file, one per line."""
    with open(path, "a") as f:
        for event in events:
            f.write(event_to_line(event) + "\n")


def read_events(path: Path) -> list[Event]:
    """Every event of a JSON-lines file, in order.

    Raises:
        InputError: naming the file and line of the first line that is not an event.
    """
    return list(iter_events(path))


def iter_events(path: Path) -> Iterator[Event]:
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield event_from_line(line, where=f"{path}:{number}")


def finite_or_none(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (for plots and summaries)."""
    return value if value is not None and math.isfinite(value) else None
