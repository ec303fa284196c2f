"""CRUNCH: optimal min-max block↔device matching for a fixed bandwidth split.

Given the per-round latency T_k(b) of every (device, block) pair under fixed
shares (`shared/costmodel.py`; +inf where the block does not fit), find the
one-to-one matching of the N blocks to N of the K devices that minimises the
round latency `max_b T_{σ(b)}(b)`.

How (docs/design.md, "Planning"):

1. **Cut.**  For a candidate latency T, device k can take block b iff
   T_k(b) ≤ T.  Latency is non-increasing in depth, so with blocks listed
   shallowest first each device's feasible set is a suffix: every block from
   its *cutoff* c_k on.
2. **Recount.**  Count how many devices have c_k ≤ j, i.e. can take block j
   (and hence every deeper block).  The sets are nested, so these prefix counts
   are all Hall's condition needs.
3. **Check.**  A matching covering all blocks exists iff for every j the
   j+1 shallowest blocks have at least j+1 devices: `#{k: c_k ≤ j} ≥ j + 1`.
4. **Search** T over the sorted distinct finite latencies (the optimum is one
   of them) by bisection: O(log(KN)) checks of O(KN) each.

The matching at the optimum is built shallowest block first, each block taking
the still-free capable device with the *latest* cutoff (the weakest device that
can do it), which keeps strong devices for the expensive shallow blocks; with
nested sets any such greedy choice succeeds when the check passes.

Monotonicity can fail when blocks have unequal payloads (a deeper block that
moves more bytes or needs more memory).  The cut then gives sets that are not
suffixes; the check detects this and falls back to an augmenting-path maximum
matching (Kuhn) for that T.  The answer stays exact, only slower.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Matching:
    """A block→device matching and its round latency."""

    device_of_block: tuple[int, ...]  # device index for each block, shallowest block first
    round_s: float                    # max over blocks of T_{σ(b)}(b)
    checks: int                       # feasibility checks the search made


def _cutoffs(feasible: np.ndarray) -> np.ndarray | None:
    """Cutoff c_k per device if every row is a suffix, else None.

    Args:
        feasible: (K, N) bool.

    Returns:
        (K,) int array (N for a device that can take nothing), or None if some
        device can take a block but not a deeper one.
    """
    if feasible.shape[1] > 1 and np.any(feasible[:, :-1] & ~feasible[:, 1:]):
        return None
    n_blocks = feasible.shape[1]
    any_ok = feasible.any(axis=1)
    return np.where(any_ok, np.argmax(feasible, axis=1), n_blocks)


def _nested_check(cutoffs: np.ndarray, n_blocks: int) -> bool:
    # Recount: devices able to take block j (and all deeper ones), for j = 0..N-1.
    able = np.cumsum(np.bincount(cutoffs, minlength=n_blocks + 1))[:n_blocks]
    return bool(np.all(able >= np.arange(1, n_blocks + 1)))


def _nested_matching(cutoffs: np.ndarray, n_blocks: int) -> list[int] | None:
    order = np.argsort(cutoffs, kind="stable")
    stack: list[int] = []
    taken: list[int] = []
    ptr = 0
    for j in range(n_blocks):
        while ptr < len(order) and cutoffs[order[ptr]] <= j:
            stack.append(int(order[ptr]))
            ptr += 1
        if not stack:
            return None
        taken.append(stack.pop())  # LIFO: the weakest device that can take block j
    return taken


def max_matching(feasible: np.ndarray) -> list[int]:
    """Maximum bipartite matching of blocks to devices (Kuhn's augmenting paths).

    Args:
        feasible: (K, N) bool, device k may take block b.

    Returns:
        Device index per block, -1 for a block left unmatched.
    """
    n_dev, n_blocks = feasible.shape
    options = [np.flatnonzero(feasible[:, b]).tolist() for b in range(n_blocks)]
    block_of_device = [-1] * n_dev

    def augment(b: int, seen: list[bool]) -> bool:
        for k in options[b]:
            if not seen[k]:
                seen[k] = True
                if block_of_device[k] < 0 or augment(block_of_device[k], seen):
                    block_of_device[k] = b
                    return True
        return False

    # Hardest blocks (fewest options) first: fewer augmentations in practice.
    for b in sorted(range(n_blocks), key=lambda b: len(options[b])):
        augment(b, [False] * n_dev)
    device_of_block = [-1] * n_blocks
    for k, b in enumerate(block_of_device):
        if b >= 0:
            device_of_block[b] = k
    return device_of_block


def matching_at(latency: np.ndarray, limit: float) -> list[int] | None:
    """A matching with every pair's latency ≤ `limit`, or None if there is none.

    Args:
        latency: (K, N) seconds, +inf where impossible; blocks shallowest first.
        limit: the candidate round latency T.

    Returns:
        Device index per block, or None.
    """
    feasible = latency <= limit
    n_blocks = latency.shape[1]
    cutoffs = _cutoffs(feasible)
    if cutoffs is not None:
        if not _nested_check(cutoffs, n_blocks):
            return None
        return _nested_matching(cutoffs, n_blocks)
    match = max_matching(feasible)
    return None if min(match, default=0) < 0 else match


def feasible_at(latency: np.ndarray, limit: float) -> bool:
    """Whether some matching has round latency ≤ `limit` (the cut–recount–check)."""
    feasible = latency <= limit
    cutoffs = _cutoffs(feasible)
    if cutoffs is not None:
        return _nested_check(cutoffs, latency.shape[1])
    return min(max_matching(feasible), default=0) >= 0


def crunch(latency: np.ndarray) -> Matching | None:
    """Min-max matching of N blocks to K devices.

    Args:
        latency: (K, N) per-round latency of device k on block b under a fixed
            bandwidth split, +inf where impossible; blocks shallowest first.

    Returns:
        The optimal `Matching`, or None if no matching covers every block.
    """
    latency = np.asarray(latency, dtype=float)
    n_dev, n_blocks = latency.shape
    if n_blocks == 0:
        return Matching((), 0.0, 0)
    if n_blocks > n_dev:
        return None
    candidates = np.unique(latency[np.isfinite(latency)])
    checks = 1
    if candidates.size == 0 or not feasible_at(latency, candidates[-1]):
        return None
    lo, hi = 0, candidates.size - 1  # invariant: candidates[hi] feasible
    while lo < hi:
        mid = (lo + hi) // 2
        checks += 1
        if feasible_at(latency, candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    match = matching_at(latency, candidates[hi])
    assert match is not None  # candidates[hi] passed the check
    round_s = float(max(latency[k, b] for b, k in enumerate(match)))
    return Matching(tuple(match), round_s, checks)


def hall_violation(feasible: np.ndarray) -> tuple[list[int], list[int]] | None:
    """Why no matching exists: a set of blocks with too few devices.

    Args:
        feasible: (K, N) bool, device k may take block b (e.g. memory fits).

    Returns:
        (blocks, devices): blocks that together can use only `devices`, fewer
        than the blocks; None if a full matching exists.
    """
    match = max_matching(feasible)
    if min(match, default=0) >= 0:
        return None
    # König: blocks reachable from an unmatched block by alternating paths form a Hall violator.
    block_of_device = {k: b for b, k in enumerate(match) if k >= 0}
    start = match.index(-1)
    blocks, devices = {start}, set()
    frontier = [start]
    while frontier:
        b = frontier.pop()
        for k in np.flatnonzero(feasible[:, b]).tolist():
            if k not in devices:
                devices.add(k)
                nb = block_of_device.get(k)
                if nb is not None and nb not in blocks:
                    blocks.add(nb)
                    frontier.append(nb)
    return sorted(blocks), sorted(devices)


def brute_force_minmax(latency: np.ndarray) -> float:
    """Reference: the min-max latency over every injective block→device map.

    Exponential (K!/(K-N)! maps); for tests and the benchmark only.

    Returns:
        The optimal round latency, +inf if no map is feasible.
    """
    latency = np.asarray(latency, dtype=float)
    n_dev, n_blocks = latency.shape
    if n_blocks == 0:
        return 0.0
    if n_blocks > n_dev:
        return float("inf")
    maps = np.array(list(itertools.permutations(range(n_dev), n_blocks)), dtype=int)  # (M, N)
    worst = latency[maps, np.arange(n_blocks)].max(axis=1)                            # (M,)
    return float(worst.min())
