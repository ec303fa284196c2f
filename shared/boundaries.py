"""Block boundaries: split the trainable layers into contiguous blocks.

When a job names only its trainable layers, the planner chooses the blocks: n
contiguous ranges, one per involved device.

Why the count is not a latency decision: a block's compute depends only on its
depth s_b (layers from s_b on run on 2q·bs rows whatever the block's length,
`shared/costmodel.py`), so merging blocks never makes a round slower — one block
on one device is always "fastest" per round, and trains nothing in parallel.
The count is a training decision (more blocks = more parameters moving at once,
each in a lower-dimensional zeroth-order problem), so it comes from the job
(`n_blocks`) or, by default, is one block per device that can hold one, capped
at the number of trainable layers.

Where the boundaries go *is* a latency decision: the device on the shallowest
block pays the most compute, so a longer first block pushes the others deeper
(cheaper), at the price of more bytes and more memory for its 2q perturbed
copies.  We search the boundaries by local search from equal-size blocks: move
each boundary by 4, 2, then 1 layers while the exact joint optimum
(`shared/bandwidth.py`) improves; each candidate split is scored by the full
matching + bandwidth solver, so the result is never worse than equal-size blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.bandwidth import JointResult
from shared.costmodel import Costs, block_costs, memory_need
from shared.profiles import Block, Fleet, Job

Solver = Callable[[Costs], "JointResult | None"]


@dataclass(frozen=True)
class BoundaryChoice:
    """The chosen split and the equal-size split it is compared with."""

    blocks: tuple[Block, ...]
    result: JointResult | None        # the joint plan for `blocks`
    equal_blocks: tuple[Block, ...]
    equal_result: JointResult | None  # the joint plan for equal-size blocks
    evaluations: int                  # splits scored by the solver


def blocks_from_cuts(job: Job, cuts: tuple[int, ...]) -> tuple[Block, ...]:
    """Blocks for cut points 0 = c_0 < c_1 < ... < c_n = trainable layers.

    Args:
        job: gives the first trainable layer and the payload per layer.
        cuts: offsets into the trainable layers.

    Returns:
        Blocks named b1..bn, shallowest first.
    """
    first = job.trainable_first
    return tuple(
        Block(name=f"b{i + 1}", first_layer=first + lo, last_layer=first + hi - 1,
              payload_bytes=job.layer_payload_bytes * (hi - lo))
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))
    )


def equal_cuts(layers: int, n_blocks: int) -> tuple[int, ...]:
    """Cut points of n blocks as equal as integers allow."""
    return tuple(int(round(i * layers / n_blocks)) for i in range(n_blocks + 1))


def default_block_count(fleet: Fleet, job: Job) -> int:
    """One block per device that can hold the cheapest block (a single deepest layer).

    Capped at the trainable layers; at least 1 (the planner reports if even that fails).
    """
    if job.n_blocks is not None:
        return job.n_blocks
    cheapest = memory_need(job, job.trainable_last, job.layer_payload_bytes)
    usable = sum(1 for d in fleet.devices if d.memory_bytes >= cheapest)
    return max(1, min(usable, job.trainable_layers))


def choose_boundaries(fleet: Fleet, job: Job, n_blocks: int, steps: np.ndarray,
                      solve: Solver) -> BoundaryChoice:
    """Local search over contiguous splits into `n_blocks` blocks.

    Args:
        fleet: the devices.
        job: the job (trainable layers, payload per layer).
        n_blocks: how many blocks.
        steps: `step_times(fleet, job)`, computed once.
        solve: the joint solver scoring a split (exact or dual ascent).

    Returns:
        The best split found and the equal-size split with their plans.
    """
    layers = job.trainable_layers
    cache: dict[tuple[int, ...], JointResult | None] = {}

    def score(cuts: tuple[int, ...]) -> float:
        if cuts not in cache:
            cache[cuts] = solve(block_costs(fleet, job, blocks_from_cuts(job, cuts), steps))
        result = cache[cuts]
        return math.inf if result is None else result.round_s

    start = equal_cuts(layers, n_blocks)
    best, best_t = start, score(start)
    for move in (4, 2, 1):
        improved = True
        while improved:
            improved = False
            for i in range(1, n_blocks):
                for delta in (-move, move):
                    cuts = list(best)
                    cuts[i] += delta
                    if not cuts[i - 1] < cuts[i] < cuts[i + 1]:
                        continue
                    t = score(tuple(cuts))
                    if t < best_t * (1 - 1e-12):
                        best, best_t, improved = tuple(cuts), t, True
    return BoundaryChoice(blocks=blocks_from_cuts(job, best), result=cache[best],
                          equal_blocks=blocks_from_cuts(job, start), equal_result=cache[start],
                          evaluations=len(cache))
