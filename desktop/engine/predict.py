"""Each round's predicted time per device, made when the round starts.

The plan prices every round alike: the job's expected step (its mix of length
buckets) times K, plus the round's bytes at the device's share. A round does
not run the expected step. Its K steps run at the lengths the device's trainer
will draw next, and the desktop knows them: the trainer's batch order on the
device's shard is replayed without running it (``device_agent.trainer.step_lengths``),
from where the trainer stands (the steps it has run on its current program;
a new program starts a fresh trainer). So the round is predicted as

    predicted_r = comm_s + f · Σ_{i in the round's steps} t_step(T_i, d)

where t_step(T, d) is the cost model's step at length T for a block at depth d
(``shared.costmodel.length_step_times``) and f the device's calibration: what
its steps so far measured over what the same formula priced them at. f is 1
until a step has been seen; the first step at each length on a program is left
out of f, because it also loads that length's method (a one-off). A device on
its own ``--data`` (rows the desktop never sees) is predicted from the plan's
expected compute, scaled by f alike.

Pure: lengths, prices and measurements in, seconds out; the engine keeps one
:class:`Calibration` and one :class:`TrainerPosition` per device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


@dataclass
class Calibration:
    """A device's measured step seconds over their prices, summed over the steps seen."""

    measured_s: float = 0.0
    priced_s: float = 0.0
    loaded: set[tuple[str, int]] = field(default_factory=set)  # (program, length): its first step was seen

    def observe(self, program: str, seq_len: int, seconds: float, priced_s: float | None) -> None:
        """One step: counted unless it is the program's first at that length (it loaded a method)."""
        key = (program, int(seq_len))
        if key not in self.loaded:
            self.loaded.add(key)
            return
        if priced_s is None or not (priced_s > 0) or not (seconds >= 0):
            return
        self.measured_s += seconds
        self.priced_s += priced_s

    @property
    def factor(self) -> float:
        """f: 1 until a counted step was seen."""
        return self.measured_s / self.priced_s if self.priced_s > 0 and self.measured_s > 0 else 1.0


@dataclass
class TrainerPosition:
    """How many steps a device's trainer has run on the program it holds."""

    program: str | None = None
    steps: int = 0

    def at(self, program: str, assumed: int) -> int:
        """The steps run on ``program``: 0 for a new program, ``assumed`` when nothing is known yet."""
        if self.program is None:
            self.program, self.steps = program, assumed
        elif self.program != program:
            self.program, self.steps = program, 0
        return self.steps

    def ran(self, program: str, steps: int) -> None:
        if self.program != program:
            self.program, self.steps = program, 0
        self.steps += steps


def round_compute_s(lengths: Sequence[int], step_s_at: Mapping[int, float], full_length_s: float) -> float:
    """Σ t_step(T_i) over a round's steps; a length with no price is priced at the full length."""
    return float(sum(step_s_at.get(int(t), full_length_s) for t in lengths))


def predicted_round_s(comm_s: float, compute_s: float, calibration: Calibration) -> float:
    """comm + f · compute."""
    return comm_s + calibration.factor * compute_s


def lengths_of_round(all_lengths: np.ndarray, position: int, k: int) -> np.ndarray:
    """[k] the lengths of steps position .. position+k-1 (``all_lengths`` must reach that far)."""
    if position < 0 or position + k > len(all_lengths):
        raise ValueError(f"steps {position}..{position + k - 1} are past the {len(all_lengths)} lengths counted")
    return all_lengths[position:position + k]
