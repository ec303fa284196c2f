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
copies.

**Exact choice** (`choose_boundaries`, method "exact").  A candidate x is a
split into n blocks together with a one-to-one matching of blocks to devices;
for a target T its required shares are f_x(T) = Σ_b a_{k,b} / (T − c_{k,b}), the
same strictly decreasing function the joint solver works on
(`shared/bandwidth.py`), so the same Dinkelbach search on T is exact
(`fractional_search`).  What changes is the inner step, min_x f_x(T): a dynamic
programme over (layers covered p, set U of devices used),

    F(U ∪ {k}, e) = min_p  F(U, p) + w_k(p, e)     (w = +inf where the block does not fit)

with F(∅, 0) = 0 and the answer min over |U| = n of F(U, L_train): blocks are
placed shallowest first, each on a device not used yet.  2^K · L_train states
and K · L_train transitions each; vectorised over p, e and the sets of one size,
it is exact for fleets of up to `exact_max_devices` devices that can hold a
block (12 by default: ~0.1 s per step of the search on 2 cores).  With n equal
to the trainable layers (or n = 1) only one split exists and it is exact at any
size.

**Heuristic beyond** (method "heuristic").  Local search: move each boundary by
4, 2, then 1 layers while the exact joint optimum on the split improves, from
three starts: equal-size blocks, the split of the lower bound below, and the
exact split among the `exact_max_devices` devices that are fastest alone (one
block each, the whole link); every candidate is scored by the exact joint solver.  Its answer is checked against a
**lower bound**: the same search with the inner DP over p alone, letting a
device train any number of blocks (the matching's one-to-one constraint
relaxed, so its optimum is never above the true one).

`brute_force_boundaries` scores every contiguous split with the brute-force
joint solver (tests and the benchmark).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from shared.bandwidth import (JointResult, balanced_shares, brute_force_joint, fractional_search, joint_exact,
                              start_time)
from shared.costmodel import block_costs, memory_need, round_bytes
from shared.profiles import Block, Fleet, Job

EXACT_MAX_DEVICES = 12  # exact boundaries up to this many devices able to hold a block (2^12 device sets)


@dataclass(frozen=True)
class BoundaryChoice:
    """The chosen split and the equal-size split it is compared with."""

    blocks: tuple[Block, ...]
    result: JointResult | None        # the joint plan for `blocks`; None: no split fits in memory
    equal_blocks: tuple[Block, ...]
    equal_result: JointResult | None  # the joint plan for equal-size blocks
    method: str                       # "exact" or "heuristic"
    lower_bound_s: float              # no split is faster (= result.round_s when exact); inf: none fits
    evaluations: int                  # DP steps, plus splits scored by the solver (heuristic)


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


@dataclass(frozen=True)
class _Pieces:
    """Every possible block (start p, end e: trainable offsets [p, e)) on every device."""

    compute: np.ndarray   # (K, Lt+1) K_local · t_step at start p (column Lt unused)
    transfer: np.ndarray  # (K, Lt+1, Lt+1) bytes of block [p, e) / R_k; inf where e <= p
    fits: np.ndarray      # (K, Lt+1, Lt+1) bool: block [p, e) fits device k (False where e <= p)

    def shares(self, t: float) -> np.ndarray:
        """(K, Lt+1, Lt+1) w_k(p, e) at T = t, +inf where impossible."""
        ok = self.fits & (self.compute[:, :, None] < t)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ok, self.transfer / np.where(ok, t - self.compute[:, :, None], 1.0), np.inf)

    def round_time(self, config: tuple[tuple[int, int, int], ...]) -> float:
        """T* of (device, p, e) triples with balanced shares."""
        k, p, e = (np.array(v) for v in zip(*config))
        return balanced_shares(self.transfer[k, p, e], self.compute[k, p])[0]


def _pieces(fleet: Fleet, job: Job, steps: np.ndarray) -> _Pieces:
    lt, first = job.trainable_layers, job.trainable_first
    start = np.arange(lt + 1)
    length = start[None, :] - start[:, None]                    # (Lt+1, Lt+1) e − p
    valid = length > 0
    payload = job.layer_payload_bytes * np.maximum(length, 0)   # S_b of block [p, e)
    total = job.layer_payload_bytes * lt                        # S_tot: every split covers every layer
    rate = np.array([d.link_bytes_per_s for d in fleet.devices], dtype=float)
    limit = np.array([d.memory_bytes for d in fleet.devices], dtype=float)
    depth = np.minimum(first + start, job.layers - 1)           # the block's first layer (p = Lt unused)
    need = np.array([[memory_need(job, int(depth[p]), float(payload[p, e])) for e in start] for p in start])
    compute = job.local_steps * steps[:, depth]                 # (K, Lt+1)
    with np.errstate(divide="ignore"):
        transfer = np.where(valid, round_bytes(total, payload)[None] / rate[:, None, None], np.inf)
    fits = valid[None] & (need[None] <= limit[:, None, None])
    return _Pieces(compute, transfer, fits)


def _exact_dp(w: np.ndarray, n_blocks: int) -> tuple[float, tuple[tuple[int, int, int], ...]] | None:
    """min over splits into n blocks and one-to-one matchings of Σ w, by DP over (device set, layers covered).

    Args:
        w: (K, Lt+1, Lt+1) w_k(p, e), +inf where impossible.
        n_blocks: n.

    Returns:
        (total, ((device, p, e), ...) shallowest first), or None if every candidate is +inf.
    """
    n_dev, width, _ = w.shape
    lt = width - 1
    sets = np.arange(1 << n_dev)
    size = np.array([bin(u).count("1") for u in sets])
    best = np.full((1 << n_dev, width), np.inf)  # F(U, p)
    best[0, 0] = 0.0
    came_from = np.full((1 << n_dev, width, 2), -1, dtype=np.int64)  # (device k, start p) of the last block
    for j in range(n_blocks):
        for k in range(n_dev):
            bit = 1 << k
            rows = sets[(size == j) & (sets & bit == 0)]
            rows = rows[np.isfinite(best[rows]).any(axis=1)]
            if rows.size == 0:
                continue
            options = best[rows][:, :, None] + w[k][None]          # (|rows|, p, e)
            start = np.argmin(options, axis=1)                      # (|rows|, e)
            value = np.take_along_axis(options, start[:, None, :], axis=1)[:, 0]
            target = rows | bit
            better = value < best[target]
            best[target] = np.where(better, value, best[target])
            came_from[target, :, 0] = np.where(better, k, came_from[target, :, 0])
            came_from[target, :, 1] = np.where(better, start, came_from[target, :, 1])
    done = sets[size == n_blocks]
    if done.size == 0 or not np.isfinite(best[done, lt]).any():
        return None
    u = int(done[np.argmin(best[done, lt])])
    total, e, config = float(best[u, lt]), lt, []
    while e > 0:
        k, p = (int(v) for v in came_from[u, e])
        config.append((k, p, e))
        u, e = u & ~(1 << k), p
    return total, tuple(reversed(config))


def _relaxed_dp(w: np.ndarray, n_blocks: int) -> tuple[float, tuple[tuple[int, int, int], ...]] | None:
    """As `_exact_dp` but a device may take any number of blocks: DP over (blocks placed, layers covered)."""
    cheapest = np.min(w, axis=0)   # (p, e) the cheapest device for each block
    device = np.argmin(w, axis=0)
    width = w.shape[1]
    best = np.full(width, np.inf)  # G_j(p)
    best[0] = 0.0
    came_from = []
    for _ in range(n_blocks):
        options = best[:, None] + cheapest  # (p, e)
        start = np.argmin(options, axis=0)
        best = options[start, np.arange(width)]
        came_from.append(start)
    if not np.isfinite(best[-1]):
        return None
    e, config = width - 1, []
    for start in reversed(came_from):
        p = int(start[e])
        config.append((int(device[p, e]), p, e))
        e = p
    return float(best[-1]), tuple(reversed(config))


def _search(pieces: _Pieces, n_blocks: int, relaxed: bool):
    """The fractional search with the exact or the relaxed DP inside; (config or None, T*, steps)."""
    fits = pieces.fits
    if not fits.any():
        return None, math.inf, 0
    compute = np.broadcast_to(pieces.compute[:, :, None], fits.shape)[fits]
    dp = _relaxed_dp if relaxed else _exact_dp
    return fractional_search(start_time(compute, pieces.transfer[fits], n_blocks),
                             lambda t: dp(pieces.shares(t), n_blocks), pieces.round_time)


def _cuts(config) -> tuple[int, ...]:
    return (0, *(e for _, _, e in config))


def choose_boundaries(fleet: Fleet, job: Job, n_blocks: int, steps: np.ndarray,
                      exact_max_devices: int = EXACT_MAX_DEVICES) -> BoundaryChoice:
    """The fastest contiguous split into `n_blocks` blocks (exact up to `exact_max_devices`).

    Args:
        fleet: the devices.
        job: the job (trainable layers, payload per layer, memory terms).
        n_blocks: how many blocks.
        steps: `step_times(fleet, job)`, computed once.
        exact_max_devices: the exact DP runs when at most this many devices can hold some block.

    Returns:
        The chosen split with its plan, the equal-size split with its plan, the
        method used and a lower bound on any split's round latency.
    """
    layers = job.trainable_layers
    equal = equal_cuts(layers, n_blocks)
    cache: dict[tuple[int, ...], JointResult | None] = {}

    def solve(cuts: tuple[int, ...]) -> JointResult | None:
        if cuts not in cache:
            cache[cuts] = joint_exact(block_costs(fleet, job, blocks_from_cuts(job, cuts), steps))
        return cache[cuts]

    def score(cuts: tuple[int, ...]) -> float:
        result = solve(cuts)
        return math.inf if result is None else result.round_s

    def choice(cuts: tuple[int, ...], method: str, bound: float, evaluations: int) -> BoundaryChoice:
        return BoundaryChoice(blocks_from_cuts(job, cuts), solve(cuts), blocks_from_cuts(job, equal),
                              solve(equal), method, bound, evaluations + len(cache))

    full = _pieces(fleet, job, steps)
    usable = np.flatnonzero(full.fits.any(axis=(1, 2)))
    if n_blocks in (1, layers):  # one split only
        return choice(equal, "exact", score(equal), 0)
    if usable.size <= exact_max_devices:
        pieces = _Pieces(full.compute[usable], full.transfer[usable], full.fits[usable])
        config, t, steps_taken = _search(pieces, n_blocks, relaxed=False)
        if config is None:
            return choice(equal, "exact", math.inf, steps_taken)
        return choice(_cuts(config), "exact", t, steps_taken)

    config, bound, steps_taken = _search(full, n_blocks, relaxed=True)
    starts = [equal] + ([_cuts(config)] if config is not None else [])
    if n_blocks <= exact_max_devices:  # the exact split among the devices that are best alone
        alone = np.where(full.fits, full.compute[:, :, None] + full.transfer, np.inf).min(axis=(1, 2))
        best_alone = usable[np.argsort(alone[usable], kind="stable")[:exact_max_devices]]
        pieces = _Pieces(full.compute[best_alone], full.transfer[best_alone], full.fits[best_alone])
        restricted, _, more = _search(pieces, n_blocks, relaxed=False)
        steps_taken += more
        if restricted is not None:
            starts.append(_cuts(restricted))
    best, best_t = equal, score(equal)
    for start in starts:
        cuts, t = start, score(start)
        for move in (4, 2, 1):
            improved = True
            while improved:
                improved = False
                for i in range(1, n_blocks):
                    for delta in (-move, move):
                        moved = list(cuts)
                        moved[i] += delta
                        if not moved[i - 1] < moved[i] < moved[i + 1]:
                            continue
                        t_moved = score(tuple(moved))
                        if t_moved < t * (1 - 1e-12):
                            cuts, t, improved = tuple(moved), t_moved, True
        if t < best_t:
            best, best_t = cuts, t
    return choice(best, "heuristic", bound if config is not None else math.inf, steps_taken)


def brute_force_boundaries(fleet: Fleet, job: Job, n_blocks: int, steps: np.ndarray) -> float:
    """Reference: the best round latency over every contiguous split, by brute force per split.

    Exponential; for tests and the benchmark only.

    Returns:
        The optimal round latency, +inf if no split fits.
    """
    layers = job.trainable_layers
    best = math.inf
    for inner in itertools.combinations(range(1, layers), n_blocks - 1):
        cuts = (0, *inner, layers)
        best = min(best, brute_force_joint(block_costs(fleet, job, blocks_from_cuts(job, cuts), steps)))
    return best
