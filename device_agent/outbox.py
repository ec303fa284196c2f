"""The agent's numbered, persistent outbox: step metrics and round results until acknowledged.

Every metric and every round result gets the next sequence number and is
appended, as its wire message, to ``outbox.jsonl`` before anything is sent, so
an agent killed at any point and restarted still holds everything the desktop
has not acknowledged (``Ack(seq)`` covers every number up to ``seq``). After a
(re)connection the agent sends everything past what the desktop says it holds.

Lines are flushed as they are written (they survive the process being killed);
a round result is also fsynced (it survives a power cut). A line cut off by a
kill mid-write is dropped when the file is read back. Acknowledged lines are
removed by rewriting the file every ``OUTBOX_COMPACT_EVERY`` acknowledgements.
A round result carries the rate it is sent at (``RoundDone.paced_bytes_per_s``),
so its replay after a restart is paced as its first sending was.
"""
from __future__ import annotations

import bisect
import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple, Union

from shared.events import Step
from shared.files import write_bytes_atomic
from shared.protocol import Metric, ProtocolError, RoundDone, StepMetrics, decode, encode
from shared.protocol_limits import METRICS_PER_FRAME, OUTBOX_COMPACT_EVERY

log = logging.getLogger("deftly.agent.outbox")
Entry = Union[Metric, RoundDone]


class OutFrame(NamedTuple):
    """One frame to send: what it carries up to, its text, and the rate it goes no faster than."""

    last_seq: int  # the last seq in the frame
    text: str  # the encoded message
    paced_bytes_per_s: float | None = None  # a round result's RoundDone.paced_bytes_per_s; None: unpaced


class Outbox:
    """Metrics and round results, numbered from 1, kept until acknowledged."""

    def __init__(self, directory: Path, simulated: str | None = None) -> None:
        self.path = Path(directory) / "outbox.jsonl"
        self.acked_path = Path(directory) / "outbox.acked"
        self.simulated = simulated
        self.acked_seq = int(self.acked_path.read_text()) if self.acked_path.exists() else 0
        self.entries: list[Entry] = []  # unacknowledged, ascending seq
        self.last_seq = self.acked_seq
        self.last_step: tuple[int, int] | None = None  # (round, step) of the last metric written, acked or not
        self._dropped_since_compact = 0
        self._listeners: list[Callable[[], None]] = []
        if self.path.exists():
            self._read()
        self._file = open(self.path, "a")

    def _read(self) -> None:
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                message = decode(line)
            except ProtocolError as exc:
                log.warning("%s:%d: dropped (%s): a line cut off when the agent was killed", self.path, number, exc)
                continue
            for entry in (message.metrics if isinstance(message, StepMetrics) else (message,)):
                self.last_seq = max(self.last_seq, entry.seq)
                if isinstance(entry, Metric):
                    self.last_step = (entry.step.round, entry.step.step)
                if entry.seq > self.acked_seq:
                    self.entries.append(entry)
        self.entries.sort(key=lambda e: e.seq)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after each new entry; returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _append(self, entry: Entry, message, sync: bool) -> Entry:
        self._file.write(encode(message) + "\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
        self.entries.append(entry)
        self.last_seq = entry.seq
        for listener in list(self._listeners):
            listener()
        return entry

    def add_step(self, step: Step) -> Metric:
        metric = Metric(seq=self.last_seq + 1, step=step)
        self.last_step = (step.round, step.step)
        return self._append(metric, StepMetrics(metrics=(metric,), simulated=self.simulated), sync=False)

    def add_round(self, make: Callable[[int], RoundDone]) -> RoundDone:
        """Append the round result ``make(seq)`` builds."""
        done = make(self.last_seq + 1)
        return self._append(done, done, sync=True)

    def ack(self, seq: int) -> None:
        """Everything up to ``seq`` is safe on the desktop (a number past the last one counts as the last)."""
        seq = min(seq, self.last_seq)
        if seq <= self.acked_seq:
            return
        kept = [e for e in self.entries if e.seq > seq]
        self._dropped_since_compact += len(self.entries) - len(kept)
        self.entries = kept
        self.acked_seq = seq
        write_bytes_atomic(self.acked_path, str(seq).encode(), sync=False)
        if self._dropped_since_compact >= OUTBOX_COMPACT_EVERY:
            self._compact()

    def _compact(self) -> None:
        self._file.close()
        kept = self.entries or self._last_metric_line()
        lines = "".join(encode(self._message(e)) + "\n" for e in kept)
        write_bytes_atomic(self.path, lines.encode())
        self._file = open(self.path, "a")
        self._dropped_since_compact = 0

    def _last_metric_line(self) -> list[Entry]:
        """With nothing left to keep, the last metric still stays in the file (acknowledged, so never
        replayed): a restarted agent reads from it which step's metric it wrote last."""
        for line in reversed(self.path.read_text().splitlines()):
            try:
                message = decode(line)
            except ProtocolError:
                continue
            if isinstance(message, StepMetrics):
                return [message.metrics[-1]]
        return []

    def _message(self, entry: Entry):
        return StepMetrics(metrics=(entry,), simulated=self.simulated) if isinstance(entry, Metric) else entry

    def frames_after(self, seq: int) -> list[OutFrame]:
        """The entries past ``seq`` as wire frames, consecutive metrics coalesced (up to METRICS_PER_FRAME).

        Returns:
            the frames, in order; a round result's with the rate it goes out at (read back with it
            from the file after a restart).
        """
        frames: list[OutFrame] = []
        run: list[Metric] = []

        def flush() -> None:
            if run:
                frames.append(OutFrame(run[-1].seq, encode(StepMetrics(metrics=tuple(run), simulated=self.simulated))))
                run.clear()

        for entry in self.entries[bisect.bisect_right(self.entries, seq, key=lambda e: e.seq):]:
            if isinstance(entry, Metric):
                run.append(entry)
                if len(run) == METRICS_PER_FRAME:
                    flush()
            else:
                flush()
                frames.append(OutFrame(entry.seq, encode(entry), entry.paced_bytes_per_s))
        flush()
        return frames

    def close(self) -> None:
        self._file.close()
