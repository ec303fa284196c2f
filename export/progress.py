"""Export progress as typed events: what runs, how much of the export is done, what is left.

An export reports :class:`ExportProgress` records to one ``on_progress`` callback,
called on the caller's thread: a GUI draws a bar from ``fraction`` and
``remaining_s``, the CLI a progress line (``desktop.cli.export``), a benchmark
reads the stage durations (``seconds`` on finished stages).

:class:`ProgressTracker` turns what the exporter does into those records. The work
is weighted: each method to lower counts :data:`METHOD_WEIGHT` units split over its
stages in the proportions measured on SmolLM2 (``bench/results/lowering.json``:
torch.export ~5 %, to_edge and XNNPACK partitioning ~90 %, emitting and storing
~5 %), and each preparation stage the fraction of one method it took there
(:data:`STAGE_WEIGHT`). The estimate of what is left is
the time per unit seen so far times the units left; it is None until a stage has
finished, because nothing measured stands behind a guess before that.

Pure: no I/O; time comes from an injectable clock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

# What an export does, in order. Preparation, once per export: load the model,
# tokenise the task, quantise (int8 only), calibrate. Per method to lower: export
# (torch.export, weights tagged), lower (to_edge + XNNPACK), emit (to_executorch),
# store (the .pte and .ptd written into the cache). Then write the files beside the manifest.
STAGES = ("load", "tokenise", "quantise", "calibrate", "export", "lower", "emit", "store", "write", "done")
PREPARATION_STAGES = ("load", "tokenise", "quantise", "calibrate")
METHOD_STAGES = ("export", "lower", "emit", "store")
METHOD_WEIGHT = 1.0  # one method to lower
METHOD_STAGE_SHARE = {"export": 0.06, "lower": 0.88, "emit": 0.04, "store": 0.02}  # of a method's weight
# Preparation and writing, in methods: on SmolLM2 a method lowers in ~100 s, loading takes
# ~5 s, tokenising ~2 s, measuring the smoothing ranges ~15 s, calibrating ~30 s, writing ~1 s.
STAGE_WEIGHT = {"load": 0.05, "tokenise": 0.02, "quantise": 0.15, "calibrate": 0.3, "write": 0.01}


@dataclass(frozen=True)
class ExportProgress:
    """One step of an export: a stage started, is still running, or finished."""

    stage: str  # one of STAGES
    state: str  # "start", "running" (a periodic tick or a note), "end", or "skip" (nothing to do)
    fraction: float  # of the whole export done, 0..1
    elapsed_s: float  # since the export began
    remaining_s: float | None  # estimate of what is left; None before anything has been measured
    message: str  # one line for a person, e.g. "lowering step_t32 of block L22-24"
    program: str = ""  # the program a method stage belongs to ("L22-24", "eval", ...); "" for shared stages
    method: str = ""  # the method being lowered; "" outside method stages
    seconds: float | None = None  # on "end": how long the stage took


Callback = Callable[[ExportProgress], None]


def silent(_event: ExportProgress) -> None:
    """The default callback: reports nothing."""


class ProgressTracker:
    """Weights the export's work and emits :class:`ExportProgress` for each stage.

    Args:
        on_progress: receives every event.
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, on_progress: Callback | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.on_progress = on_progress or silent
        self.clock = clock
        self.start = clock()
        self.base = sum(STAGE_WEIGHT.values())
        self.methods = 0  # methods to lower (expected, then known once the cache has been read)
        self.done = 0.0
        self._running: dict[tuple[str, str, str], tuple[float, float]] = {}  # key -> (started, weight)
        self._measured_weight = 0.0  # weight of the stages finished with a real duration
        self._measured_seconds = 0.0
        self.parallel = 1  # methods lowered at once

    @property
    def total(self) -> float:
        return self.base + self.methods * METHOD_WEIGHT

    def expect_methods(self, count: int) -> None:
        """At most ``count`` methods will be lowered (before the cache has been read)."""
        self.methods = count

    def plan_methods(self, count: int, parallel: int = 1) -> None:
        """``count`` methods will be lowered, ``parallel`` at a time (once the cache has been read)."""
        self.methods = count
        self.parallel = max(1, parallel)

    def skip(self, stage: str, message: str) -> None:
        """A preparation stage that has nothing to do (e.g. quantise for fp32): counted as done."""
        self.done += _weight(stage)
        self._emit(stage, "skip", message, seconds=0.0)

    def begin(self, stage: str, message: str, program: str = "", method: str = "") -> None:
        self._running[(stage, program, method)] = (self.clock(), _weight(stage))
        self._emit(stage, "start", message, program, method)

    def tick(self, stage: str, message: str, program: str = "", method: str = "") -> None:
        """A stage still running: the same event with the time moved on."""
        self._emit(stage, "running", message, program, method)

    def end(self, stage: str, message: str, program: str = "", method: str = "",
            seconds: float | None = None) -> None:
        """A stage finished; ``seconds`` overrides the tracker's own timing (work done elsewhere)."""
        started, weight = self._running.pop((stage, program, method), (self.clock(), _weight(stage)))
        took = self.clock() - started if seconds is None else seconds
        self.done = min(self.total, self.done + weight)
        if took > 0:
            self._measured_weight += weight
            self._measured_seconds += took
        self._emit(stage, "end", message, program, method, seconds=took)

    def note(self, stage: str, message: str) -> None:
        """A line of information inside a stage (e.g. what the model loader says)."""
        self._emit(stage, "running", message)

    def finish(self, message: str) -> None:
        self.done = self.total
        self._emit("done", "end", message, seconds=self.clock() - self.start)

    # -- the numbers -------------------------------------------------------------------

    @property
    def fraction(self) -> float:
        """Of the work done, counting running stages by the time they have had against their estimate."""
        partial = 0.0
        rate = self._seconds_per_weight()
        if rate is not None:
            now = self.clock()
            for started, weight in self._running.values():
                partial += min(0.95 * weight, (now - started) / rate)
        return min(1.0, (self.done + partial) / self.total) if self.total > 0 else 1.0

    def remaining_s(self) -> float | None:
        rate = self._seconds_per_weight()
        if rate is None:
            return None
        # Stage times are each worker's own; with several at once the wall clock runs that much faster.
        return max(0.0, (1.0 - self.fraction) * self.total * rate / self.parallel)

    def _seconds_per_weight(self) -> float | None:
        if self._measured_weight <= 0:
            return None
        return self._measured_seconds / self._measured_weight

    def _emit(self, stage: str, state: str, message: str, program: str = "", method: str = "",
              seconds: float | None = None) -> None:
        self.on_progress(ExportProgress(stage=stage, state=state, fraction=round(self.fraction, 4),
                                        elapsed_s=round(self.clock() - self.start, 2),
                                        remaining_s=_rounded(self.remaining_s()), message=message,
                                        program=program, method=method,
                                        seconds=None if seconds is None else round(seconds, 3)))


def _weight(stage: str) -> float:
    if stage in METHOD_STAGE_SHARE:
        return METHOD_WEIGHT * METHOD_STAGE_SHARE[stage]
    return STAGE_WEIGHT.get(stage, 0.0)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
