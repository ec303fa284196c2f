"""From measured profiles and a job to the plan the engine runs: who trains which slice of b.

Two policies, scored with the same cost model (``shared.costmodel``):

* ``planned``: the planner (``shared.planner.plan``: CRUNCH matching, the joint
  bandwidth split, chosen block boundaries) on the devices' measured profiles;
* ``equal_random``: the baseline the planner must beat, run for real by the
  benchmark: equal-size blocks (as many as the plan would use), a random
  memory-feasible matching (seeded), and an equal share of the link each.

With ``replicas``, devices the plan leaves idle (more devices than blocks:
a job has at most one block per trainable layer) train a *replica* of a block
on their own data, and the engine averages a block's replicas before it merges
(data parallelism inside a block, as federated averaging does). Each replica
goes to the block with the fewest replicas so far among those that fit in its
memory; the link is then split equally among every device that trains, since
the planner's joint optimum covers one device per block only.

Either way the result is a :class:`desktop.engine.events.PlanView` whose
assignments carry each block's slice of the global b (from the job's layout,
``shared.blocks.block_span``) and the predicted compute, communication and
round seconds, which the engine compares with what it measures. Pure.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np

from desktop.engine.events import Assignment, PlanView
from shared.blocks import block_span
from shared.boundaries import blocks_from_cuts, equal_cuts
from shared.costmodel import block_costs, step_times
from shared.errors import InputError
from shared.manifest import BSlot
from shared.planner import PlannerConfig, plan
from shared.profiles import Block, DeviceProfile, Fleet, Job

POLICIES = ("planned", "equal_random")


def fleet_names(names: Mapping[str, str]) -> dict[str, str]:
    """A unique planner name per device id: its own name, with a piece of its id where two share one."""
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {device: name if counts[name] == 1 else f"{name}-{device[:6]}" for device, name in names.items()}


def fleet_of(profiles: Mapping[str, DeviceProfile], names: Mapping[str, str], fleet: str = "fleet") -> Fleet:
    """The planner's fleet: each device's profile under its unique name, in the order given."""
    unique = fleet_names({device: names.get(device, device) for device in profiles})
    return Fleet(fleet, tuple(_renamed(profile, unique[device]) for device, profile in profiles.items()))


def _renamed(profile: DeviceProfile, name: str) -> DeviceProfile:
    return replace(profile, name=name)


def make_plan(profiles: Mapping[str, DeviceProfile], names: Mapping[str, str], job: Job,
              layout: Sequence[BSlot], *, policy: str = "planned", first_round: int = 1, reason: str = "start",
              seed: int = 0, n_blocks: int | None = None, config: PlannerConfig | None = None,
              replicas: bool = False) -> PlanView:
    """Plan a round for these devices.

    Args:
        profiles: device id -> its profile (measured, or estimated), in a stable order.
        names: device id -> the name shown for it.
        job: the planner's job (its layers must be the model layers of ``layout``).
        layout: the job's adapter layout (``Manifest.b_layout``): gives each block's slice of b.
        policy: one of :data:`POLICIES`.
        first_round: the round this plan starts at.
        reason: why the engine planned (shown and written to plan.json).
        seed: seeds the random matching of ``equal_random``.
        n_blocks: ``equal_random`` only: how many blocks (default: as many as the planner would use).
        config: planner settings (default ``PlannerConfig()``).
        replicas: give idle devices a replica of a block (see the module docstring).

    Returns:
        The plan, with one assignment per device (``block`` None for idle ones).

    Raises:
        InputError: no devices, an unknown policy, or a job no matching can place (named by the planner).
    """
    if not profiles:
        raise InputError("no device to plan for: every device is lost, in error or unpaired")
    if policy not in POLICIES:
        raise InputError(f"plan policy {policy!r}: expected one of {', '.join(POLICIES)}")
    fleet = fleet_of(profiles, names)
    ids = list(profiles)
    start = time.perf_counter()
    result = plan(fleet, job, config or PlannerConfig())
    planner_s = time.perf_counter() - start
    baselines = {k: (v if math.isfinite(v) else None) for k, v in result.baselines.items()}
    if policy == "planned":
        rows = []
        for device, row in zip(ids, result.devices):
            rows.append(_assignment(device, names.get(device, device), row.block, row.first_layer, row.last_layer,
                                    row.share, row.compute_s, row.comm_s, row.memory_bytes,
                                    row.memory_limit_bytes, row.profile, layout))
        round_s = result.round_s
    else:
        blocks = blocks_from_cuts(job, equal_cuts(job.trainable_layers, n_blocks or len(result.blocks)))
        rows, round_s = _equal_random(fleet, job, blocks, ids, names, layout, seed)
    if replicas and any(r.block is None for r in rows):
        rows, round_s = _with_replicas(fleet, job, ids, rows, layout)
    return PlanView(first_round, reason, policy, round_s, tuple(rows), baselines, planner_s, job.name,
                    job.layers)


def _assignment(device: str, name: str, block: str | None, first: int | None, last: int | None, share: float,
                compute_s: float, comm_s: float, memory: float, limit: float, source: str,
                layout: Sequence[BSlot]) -> Assignment:
    if block is None or first is None or last is None:
        return Assignment(device, name, None, None, None, None, None, 0.0, 0.0, 0.0, 0.0, 0.0, limit, source)
    span = block_span(layout, first, last)
    return Assignment(device, name, span.name, first, last, span.offset, span.size, share, compute_s, comm_s,
                      compute_s + comm_s, memory, limit, source)


def _with_replicas(fleet: Fleet, job: Job, ids: list[str], rows: list[Assignment],
                   layout: Sequence[BSlot]) -> tuple[list[Assignment], float]:
    """Idle devices take replicas of the blocks; every training device gets an equal share of the link."""
    blocks = sorted({(r.first_layer, r.last_layer, r.block) for r in rows if r.block is not None})
    planned = [Block(name, first, last, job.layer_payload_bytes * (last - first + 1)) for first, last, name in blocks]
    costs = block_costs(fleet, job, planned, step_times(fleet, job))
    owner: dict[int, int] = {}  # device index -> block index
    for k, row in enumerate(rows):
        if row.block is not None:
            owner[k] = next(b for b, blk in enumerate(planned) if blk.first_layer == row.first_layer)
    count = [sum(1 for b in owner.values() if b == i) for i in range(len(planned))]
    idle = sorted((k for k, row in enumerate(rows) if row.block is None), key=lambda k: costs.compute_s[k].min())
    for k in idle:
        fitting = [b for b in range(len(planned)) if costs.fits[k, b]]
        if fitting:
            b = min(fitting, key=lambda b: (count[b], b))
            owner[k] = b
            count[b] += 1
    share = 1.0 / len(owner)
    out = []
    for k, row in enumerate(rows):
        b = owner.get(k)
        if b is None:
            out.append(row)
            continue
        compute = float(costs.compute_s[k, b])
        comm = float(costs.transfer_s[k, b] / share)
        blk = planned[b]
        out.append(_assignment(ids[k], row.name, blk.name, blk.first_layer, blk.last_layer, share, compute, comm,
                               float(costs.memory_need[b]), row.memory_limit_bytes, row.profile, layout))
    return out, max(r.round_s for r in out if r.block is not None)


def _equal_random(fleet: Fleet, job: Job, blocks: tuple[Block, ...], ids: list[str], names: Mapping[str, str],
                  layout: Sequence[BSlot], seed: int) -> tuple[list[Assignment], float]:
    """A random memory-feasible matching of ``blocks`` with equal shares, and its predicted round latency."""
    costs = block_costs(fleet, job, blocks, step_times(fleet, job))
    rng = np.random.default_rng(seed)
    share = 1.0 / len(blocks)
    for _ in range(1000):  # a random order, then first fit: uniform over orders, respects memory
        order = rng.permutation(len(ids)).tolist()
        device_of_block: list[int] = []
        for b in range(len(blocks)):
            pick = next((k for k in order if k not in device_of_block and costs.fits[k, b]), None)
            if pick is None:
                break
            device_of_block.append(pick)
        if len(device_of_block) == len(blocks):
            break
    else:
        raise InputError(f"equal_random: no memory-feasible matching of {len(blocks)} equal-size blocks found")
    block_of = {k: b for b, k in enumerate(device_of_block)}
    rows = []
    for k, device in enumerate(ids):
        profile = fleet.devices[k]
        source = profile.source_for(job)
        b = block_of.get(k)
        if b is None:
            rows.append(_assignment(device, names.get(device, device), None, None, None, 0.0, 0.0, 0.0, 0.0,
                                    profile.memory_bytes, source, layout))
            continue
        compute = float(costs.compute_s[k, b])
        comm = float(costs.transfer_s[k, b] / share)
        rows.append(_assignment(device, names.get(device, device), blocks[b].name, blocks[b].first_layer,
                                blocks[b].last_layer, share, compute, comm, float(costs.memory_need[b]),
                                profile.memory_bytes, source, layout))
    return rows, max(r.round_s for r in rows if r.block is not None)
