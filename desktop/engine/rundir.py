"""A fleet run's directory: what it writes as it goes, and what ``--resume`` reads back.

``runs/NAME/``::

    plan.json          every plan of the run (the first, and each re-plan with its reason)
    profiles.json      the profile each device was planned with (measured, or cached)
    metrics.jsonl      every device's steps (tagged with device and round) and one Round per round
    state.json         where the run stands: the last merged round, what each device acknowledged
    b.npy              the global b after the last merged round
    blocks/            blocks received for a round not merged yet (so a restart does not lose them)
    shards/            the data shard cut for each device
    programs/          the exported programs of the plans (copies from the export cache)
    adapter/           the standard PEFT adapter written from the last merged b (+ deftly_calibration.json)
    report.md, *.png   the report

Everything is written atomically (a temporary file, then a rename), and a
metric is acknowledged to its agent only after its line is on disk, so a
desktop killed at any moment resumes with everything it acknowledged. Metric
lines that arrive twice (written, then killed before the acknowledgement left)
are recognised by (device, round, step) and written once.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from desktop.engine.events import PlanView
from shared.errors import InputError
from shared.events import Event, Round, Step, event_from_line, event_to_line, iter_events
from shared.files import write_bytes_atomic
from shared.profiles import DeviceProfile
from shared.records import RecordError, from_plain, to_plain

RUN_FORMAT = 1


@dataclass(frozen=True)
class DeviceRecord:
    """What the run keeps about one device between restarts."""

    id: str
    name: str
    address: str
    acked_seq: int = 0  # the highest metric / round sequence number acknowledged to it
    shard: str | None = None  # its shard's file name under shards/, if it trains on one
    shard_sha256: str | None = None
    data: str = "shard"  # "shard" or "private" (its own --data)


@dataclass(frozen=True)
class LossRecord:
    """A device lost (or left out for an error) in a round."""

    round: int | None
    device: str
    name: str
    reason: str


@dataclass(frozen=True)
class RunSettings:
    """The settings a resumed run must keep (changing them mid-run would mix two runs)."""

    job: str  # the job's identity: its name and the eval program's cache key
    rounds: int
    local_steps: int
    lr: float | None  # None until the program's suggestion is read (when the run gives none)
    eps: float | None
    seed: int
    policy: str


@dataclass(frozen=True)
class RunRecord:
    """``state.json``."""

    format: int
    settings: RunSettings
    completed_round: int = 0  # the last round merged into b.npy (0: none yet)
    b_sha256: str = ""  # of b.npy, to refuse a b that is not the one this state names
    devices: tuple[DeviceRecord, ...] = ()
    losses: tuple[LossRecord, ...] = ()
    finished: bool = False
    # Names the run to its devices (StartRound.run), so that a device continues its trainer's
    # sequence only within this run; "" in a state written before run ids (devices then go on
    # with whatever sequence they hold).
    run_id: str = ""

    def device(self, device_id: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.id == device_id), None)

    def with_device(self, record: DeviceRecord) -> "RunRecord":
        others = tuple(d for d in self.devices if d.id != record.id)
        return replace(self, devices=others + (record,))


@dataclass
class RunDir:
    """The files of one run; see the module docstring."""

    path: Path
    _metrics: io.TextIOWrapper | None = field(default=None, repr=False)
    _seen_steps: set[tuple[str, int, int]] = field(default_factory=set, repr=False)
    _merged_rounds: set[int] = field(default_factory=set, repr=False)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def programs_dir(self) -> Path:
        return self.path / "programs"

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    # -- starting and resuming -------------------------------------------------------

    def create(self, settings: RunSettings) -> RunRecord:
        """Start a fresh run here.

        Raises:
            InputError: the directory already holds a run (resume it, or choose another --out).
        """
        if self.state_path.exists():
            raise InputError(f"{self.path} already holds a run (state.json); pass --resume to continue it "
                             f"or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in ("metrics.jsonl", "plan.json", "profiles.json", "b.npy"):
            (self.path / stale).unlink(missing_ok=True)  # left by a run killed before its first state
        record = RunRecord(RUN_FORMAT, settings, run_id=uuid.uuid4().hex)
        self.save(record)
        return record

    def load(self) -> tuple[RunRecord, np.ndarray | None]:
        """The saved state and the last merged b (None before the first merge).

        Raises:
            InputError: nothing to resume, or a state this deftly cannot read.
        """
        if not self.state_path.exists():
            raise InputError(f"--resume: {self.state_path} does not exist (nothing to resume; drop --resume "
                             f"to start a run)")
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{self.state_path}: not a readable run state ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
            raise InputError(f"{self.state_path}: run state format {data.get('format') if isinstance(data, dict) else None!r}, "
                             f"this deftly reads {RUN_FORMAT}")
        try:
            record = from_plain(RunRecord, data, str(self.state_path))
        except RecordError as exc:
            raise InputError(str(exc)) from None
        b = None
        if record.completed_round:
            b_path = self.path / "b.npy"
            try:
                raw = b_path.read_bytes()
            except OSError:
                raise InputError(f"{b_path}: missing; the state says round {record.completed_round} was merged") from None
            if hashlib.sha256(raw).hexdigest() != record.b_sha256:
                raise InputError(f"{b_path}: does not match state.json (another run's b, or corrupt)")
            b = np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32)
        self._index_metrics()
        return record, b

    def check_settings(self, record: RunRecord, settings: RunSettings) -> None:
        """A resumed run keeps its job and training settings; only ``rounds`` may grow.

        Raises:
            InputError: naming the setting that differs.
        """
        saved = record.settings
        for name in ("job", "local_steps", "lr", "eps", "seed", "policy"):
            if name in ("lr", "eps") and getattr(settings, name) is None:
                continue  # not given: the run's own value goes on
            if getattr(saved, name) != getattr(settings, name):
                raise InputError(f"--resume: this run was started with {name} {getattr(saved, name)!r}, not "
                                 f"{getattr(settings, name)!r}; resume it with the same settings")

    def save(self, record: RunRecord) -> None:
        write_bytes_atomic(self.state_path, json.dumps(to_plain(record), indent=2).encode())

    def save_b(self, record: RunRecord, b: np.ndarray, completed_round: int) -> RunRecord:
        """Write the merged b of ``completed_round`` and the state that names it; returns the new state."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(b, dtype=np.float32))
        raw = buffer.getvalue()
        write_bytes_atomic(self.path / "b.npy", raw)
        record = replace(record, completed_round=completed_round, b_sha256=hashlib.sha256(raw).hexdigest())
        self.save(record)
        return record

    # -- a round's blocks, kept until merged -------------------------------------------

    def block_path(self, round_: int, device: str) -> Path:
        return self.path / "blocks" / f"round-{round_}" / f"{_safe(device)}.npy"

    def save_block(self, round_: int, device: str, offset: int, values: np.ndarray) -> None:
        path = self.block_path(round_, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, offset=np.array(offset), values=np.asarray(values, dtype=np.float32))
        write_bytes_atomic(path, buffer.getvalue())

    def load_block(self, round_: int, device: str) -> tuple[int, np.ndarray] | None:
        path = self.block_path(round_, device)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return int(data["offset"]), data["values"].astype(np.float32)

    def drop_blocks(self, before_or_at: int) -> None:
        """Remove kept blocks of merged rounds."""
        folder = self.path / "blocks"
        if not folder.exists():
            return
        for sub in folder.iterdir():
            try:
                number = int(sub.name.split("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if number <= before_or_at:
                for f in sub.iterdir():
                    f.unlink()
                sub.rmdir()

    # -- metrics ----------------------------------------------------------------------

    def _index_metrics(self) -> None:
        if not self.metrics_path.exists():
            return
        try:
            for event in iter_events(self.metrics_path):
                self._remember(event)
        except InputError:
            # A line cut short by a kill is the only damage an append can do: keep what parses.
            self._truncate_to_valid()

    def _truncate_to_valid(self) -> None:
        kept: list[str] = []
        self._seen_steps.clear()
        self._merged_rounds.clear()
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                event = event_from_line(line)
            except InputError:
                continue
            kept.append(line)
            self._remember(event)
        write_bytes_atomic(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    def _remember(self, event: Event) -> None:
        if isinstance(event, Step) and event.device is not None and event.round is not None:
            self._seen_steps.add((event.device, event.round, event.step))
        elif isinstance(event, Round):
            self._merged_rounds.add(event.round)

    def write_events(self, events: Iterable[Event]) -> int:
        """Append events not written before; returns how many lines were written (not yet synced)."""
        if self._metrics is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.metrics_path, "a")
        written = 0
        for event in events:
            if isinstance(event, Step) and event.device is not None and event.round is not None:
                key = (event.device, event.round, event.step)
                if key in self._seen_steps:
                    continue
            elif isinstance(event, Round) and event.round in self._merged_rounds:
                continue
            self._metrics.write(event_to_line(event) + "\n")
            self._remember(event)
            written += 1
        return written

    def flush_metrics(self) -> None:
        """Hand written lines to the OS (they survive this process being killed)."""
        if self._metrics is not None:
            self._metrics.flush()

    def sync_metrics(self) -> None:
        """Make every written line durable (called before metrics are acknowledged)."""
        if self._metrics is not None:
            self._metrics.flush()
            os.fsync(self._metrics.fileno())

    def close(self) -> None:
        if self._metrics is not None:
            self.sync_metrics()
            self._metrics.close()
            self._metrics = None

    # -- plan and profiles --------------------------------------------------------------

    def write_plans(self, plans: list[PlanView], detail: list[dict] | None = None) -> None:
        """plan.json: every plan, in order (the last is the one in force)."""
        body = {"plans": [to_plain(p) for p in plans], "current": to_plain(plans[-1]) if plans else None}
        if detail is not None:
            body["planner"] = detail
        write_bytes_atomic(self.path / "plan.json", json.dumps(_finite(body), indent=2).encode())

    def read_plans(self) -> list[PlanView]:
        path = self.path / "plan.json"
        if not path.exists():
            return []
        data = json.loads(path.read_text())
        try:
            return [from_plain(PlanView, p, f"{path} plan {i}") for i, p in enumerate(data.get("plans", []))]
        except RecordError as exc:
            raise InputError(str(exc)) from None

    def write_profiles(self, profiles: dict[str, tuple[str, DeviceProfile, bool]]) -> None:
        """profiles.json: device id -> its name, its profile and whether it came from the cache."""
        body = {device: {"name": name, "cached": cached, "profile": to_plain(profile)}
                for device, (name, profile, cached) in profiles.items()}
        write_bytes_atomic(self.path / "profiles.json", json.dumps(_finite(body), indent=2).encode())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _finite(value):
    """JSON has no inf or nan: None in their place."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
