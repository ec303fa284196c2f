"""Baselines the planner must beat, each scored with the same cost model.

Every baseline trains the same blocks as the plan (for a job with chosen
boundaries: equal-size blocks, same count), except where its rule is itself a
rule for boundaries (memory-proportional).  None of these systems allocates
bandwidth, so every baseline splits the link equally among the devices it
involves (β = 1/N).  Rules:

* `equal_bandwidth`: CRUNCH's optimal matching, but equal shares.  Isolates
  what the bandwidth allocation buys.
* `random`: a random memory-feasible matching, equal shares; the mean over
  seeds.  This is "equal bandwidth + random blocks" in the benchmark's
  `gain_vs_equal_random`.
* `fastest_first`: devices ranked by step time at full depth; the shallowest
  (dearest) block goes to the fastest device that fits it, and so on.
* `memory_proportional` (exo's rule): devices by memory, largest first, each
  gets a contiguous run of trainable layers in proportion to its memory; a
  device given no layer idles.  Its own boundaries, so a different block count.
* `lowest_throughput_window` (Petals' rule): devices join in fleet order and
  each serves the uncovered window with the lowest throughput.  With one device
  per block every uncovered block has throughput 0, so the tie goes to the
  first (shallowest) uncovered block that fits: arrival order, depth-blind.
* `all_on_fastest`: the fastest device trains every block itself, one after the
  other, K_local steps each, with the whole link (download and upload all of
  B).  Same work per round as the plan, no parallelism.

A baseline that cannot place a block (memory) scores +inf ("infeasible").
"""
from __future__ import annotations

import math

import numpy as np

from shared.costmodel import Costs, block_costs, latency
from shared.crunch import crunch
from shared.profiles import Block, Fleet, Job


def _equal_share_round(costs: Costs, device_of_block: list[int]) -> float:
    n_blocks = len(device_of_block)
    lat = latency(costs, np.full(costs.rate.size, 1.0 / n_blocks))
    return float(max(lat[k, b] for b, k in enumerate(device_of_block)))


def _greedy(costs: Costs, device_order: list[int]) -> list[int] | None:
    """Shallowest block first, each to the first free device in `device_order` that fits it."""
    free = list(device_order)
    out: list[int] = []
    for b in range(costs.compute_s.shape[1]):
        pick = next((k for k in free if costs.fits[k, b]), None)
        if pick is None:
            return None
        free.remove(pick)
        out.append(pick)
    return out


def equal_bandwidth(costs: Costs) -> float:
    """CRUNCH matching with equal shares."""
    n_blocks = costs.compute_s.shape[1]
    match = crunch(latency(costs, np.full(costs.rate.size, 1.0 / n_blocks)))
    return math.inf if match is None else match.round_s


def random_allocation(costs: Costs, seeds: int, seed: int = 0) -> float:
    """Mean round latency of random memory-feasible matchings with equal shares."""
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(seeds):
        # A random order, then first-fit: uniform over orders, respects memory.
        match = _greedy(costs, rng.permutation(costs.rate.size).tolist())
        if match is not None:
            rounds.append(_equal_share_round(costs, match))
    return float(np.mean(rounds)) if rounds else math.inf


def fastest_first(costs: Costs, full_depth_step_s: np.ndarray) -> float:
    """Shallowest block to the fastest device that fits, equal shares."""
    match = _greedy(costs, np.argsort(full_depth_step_s, kind="stable").tolist())
    return math.inf if match is None else _equal_share_round(costs, match)


def lowest_throughput_window(costs: Costs) -> float:
    """Petals' rule with one device per block: fleet order, shallowest uncovered block."""
    match = _greedy(costs, list(range(costs.rate.size)))
    return math.inf if match is None else _equal_share_round(costs, match)


def memory_proportional(fleet: Fleet, job: Job, steps: np.ndarray) -> float:
    """exo's rule: contiguous layer runs in proportion to memory, equal shares."""
    memory = np.array([d.memory_bytes for d in fleet.devices])
    order = np.argsort(-memory, kind="stable")
    bounds = np.round(np.cumsum(memory[order]) / memory.sum() * job.trainable_layers).astype(int)
    blocks, owners, lo = [], [], 0
    for k, hi in zip(order.tolist(), bounds.tolist()):
        if hi > lo:
            blocks.append(Block(f"m{len(blocks) + 1}", job.trainable_first + lo, job.trainable_first + hi - 1,
                                job.layer_payload_bytes * (hi - lo)))
            owners.append(k)
            lo = hi
    costs = block_costs(fleet, job, blocks, steps)
    if not all(costs.fits[k, b] for b, k in enumerate(owners)):
        return math.inf
    return _equal_share_round(costs, owners)


def all_on_fastest(costs: Costs) -> float:
    """The best single device trains every block in turn, with the whole link."""
    ok = costs.fits.all(axis=1)
    if not ok.any():
        return math.inf
    # comm_bytes[b] = w · (S_tot + S_b), so Σ_b comm_bytes = (N + 1) · w · S_tot (w: the wire's encoding).
    s_tot = costs.comm_bytes.sum() / (costs.comm_bytes.size + 1)
    # Download the global state once and upload all of it: 2 · w · S_tot bytes.
    rounds = costs.compute_s.sum(axis=1) + 2.0 * s_tot / costs.rate
    return float(rounds[ok].min())


def all_baselines(fleet: Fleet, job: Job, blocks: tuple[Block, ...], steps: np.ndarray,
                  random_seeds: int = 100, seed: int = 0) -> dict[str, float]:
    """Round latency (s) of every baseline, +inf where one cannot place a block.

    Args:
        fleet: the devices.
        job: the job.
        blocks: the blocks the plan trains (equal-size ones for a chosen split).
        steps: `step_times(fleet, job)`.
        random_seeds: how many random matchings to average.
        seed: seed of the random baseline.

    Returns:
        Baseline name -> round latency in seconds.
    """
    costs = block_costs(fleet, job, blocks, steps)
    return {
        "equal_bandwidth": equal_bandwidth(costs),
        "random": random_allocation(costs, random_seeds, seed),
        "fastest_first": fastest_first(costs, steps[:, job.trainable_first]),
        "memory_proportional": memory_proportional(fleet, job, steps),
        "lowest_throughput_window": lowest_throughput_window(costs),
        "all_on_fastest": all_on_fastest(costs),
    }
