"""Joint bandwidth and block allocation: exact search and dual ascent.

The problem (docs/design.md, "Planning"; cost terms in `shared/costmodel.py`):
choose a one-to-one matching σ of blocks to devices and link shares β_k
(Σ_k β_k ≤ 1) minimising the round latency

    T = max_b  a_{σ(b)b} / β_{σ(b)} + c_{σ(b)b},

where `a_kb = bytes_b / R_k` (seconds to move block b's bytes on the whole band)
and `c_kb = K_local · t_step(k, s_b)` (compute), subject to memory.

**Required shares.**  For a target T, device k can finish block b by T with
share `w_kb(T) = a_kb / (T − c_kb)` (∞ if T ≤ c_kb or the block does not fit).
T is achievable iff the min-cost assignment of these shares, g(T), is ≤ 1.
For a fixed matching, `f_σ(T) = Σ_b w_{σ(b)b}(T)` is continuous and strictly
decreasing, so its round latency T*_σ is the unique root of f_σ(T) = 1, and at
the optimum every involved device finishes exactly at T (the shares balance).

**Exact reference** (`joint_exact`): search on T with a min-cost assignment
(Hungarian, `min_cost_assignment`) at each step.  Start at a T where every
matching is affordable; then repeat: σ ← argmin_σ f_σ(T) (the assignment);
T ← T*_σ.  Each step strictly lowers T unless g(T) = 1; since g is strictly
decreasing and g(T*) = 1 at the optimum T*, g(T) = 1 means T = T*.  There are
finitely many matchings, so it stops, exactly (a Dinkelbach-type search; usually
3-5 assignments instead of the ~50 a bisection needs).

**Dual ascent** (`joint_dual_ascent`), as in LoLa DEFT: relax the bandwidth
budget with a price λ ≥ 0 on the Lagrangian

    L(T, x, λ) = T + λ (Σ_kb x_kb w_kb(T) − 1),

where x_kb ∈ {0, 1} are device-involvement indicators (device k trains block b).
Each iteration (1) picks x minimising L at the current T, a min-cost assignment
of the shares; (2) minimises L over T for that x (1 = λ Σ a/(T − c)²); (3) moves
the price along the subgradient, clipped, λ ← λ·exp(η·min(Σ x w(T) − 1, 1)),
raising it while the shares overrun the link.  The clip bounds one step to a
factor e^η: when a device on a link 1e5 times slower than another's is picked
at a T just above its compute, the overrun is ~1e5 and the unclipped step
overflowed; near the optimum |overrun| ≪ 1 and the clip does nothing.  The
price is kept as log λ, and a T that is no longer representable ends the
ascent with the best plan found.  Every x it visits is turned into a feasible plan
(T*_x and its balanced shares) and the best is kept, so the result is always
feasible and never below the exact optimum; `gap` is how far above it lies.

`brute_force_joint` enumerates every matching (for tests and the benchmark).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from shared.costmodel import Costs


@dataclass(frozen=True)
class DualConfig:
    """Settings of the dual-ascent solver."""

    max_iter: int = 60    # price updates; it usually settles in under 20
    step: float = 2.0     # η: multiplicative step on the price λ; |d overrun / d log λ| ≤ 1/2 near
                          # the optimum (Cauchy–Schwarz), so 2 is a Newton step at most: no overshoot
    tol: float = 1e-4     # stop when |Σ shares − 1| is below this and x is unchanged (x is then
                          # recovered exactly, so a loose price tolerance costs no accuracy)


@dataclass(frozen=True)
class JointResult:
    """A matching, its link shares and its round latency."""

    device_of_block: tuple[int, ...]  # device index per block, shallowest first
    shares: tuple[float, ...]         # β_k per device (0 for idle devices), Σ ≤ 1
    round_s: float                    # T: every involved device finishes by then
    assignments: int                  # min-cost assignments solved


def min_cost_assignment(cost: np.ndarray) -> list[int] | None:
    """Min-cost assignment of every row to a distinct column (Hungarian, O(n²m)).

    The shortest-augmenting-path form with potentials (Kuhn–Munkres as in
    Jonker–Volgenant), vectorised over columns.

    Args:
        cost: (n, m) with n ≤ m; +inf marks a forbidden pair.

    Returns:
        Column per row, or None if every assignment uses a forbidden pair.
    """
    cost = np.asarray(cost, dtype=float)
    n, m = cost.shape
    if n == 0:
        return []
    if n > m:
        return None
    finite = np.isfinite(cost)
    if not finite.any(axis=1).all():
        return None
    # A finite stand-in for +inf, dearer than any assignment of allowed pairs.
    big = (float(np.abs(cost[finite]).max()) + 1.0) * (n + 1)
    c = np.where(finite, cost, big)
    u = np.zeros(n + 1)             # row potentials (1-based; 0 is the virtual row)
    v = np.zeros(m + 1)             # column potentials
    row_of = np.zeros(m + 1, int)   # row matched to column j (0 = none)
    way = np.zeros(m + 1, int)      # previous column on the shortest path
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used[1:]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col_of = [0] * n
    for j in range(1, m + 1):
        if row_of[j]:
            col_of[row_of[j] - 1] = j - 1
    if any(not finite[i, col_of[i]] for i in range(n)):
        return None
    return col_of


def balanced_shares(transfer_s: np.ndarray, compute_s: np.ndarray) -> tuple[float, np.ndarray]:
    """T*_σ and its shares: the root of Σ_b a_b / (T − c_b) = 1 for one matching.

    Solved in the gap u = T − max_b c_b rather than in T: with a fast link a_b can
    lie below the rounding step of c_b (1e-13 s of transfer beside 1e4 s of
    compute), and T − c_b would then be 0 and every share infinite.  With
    d_b = max c − c_b ≥ 0 the root is the u > 0 of Σ a_b / (d_b + u) = 1; f is
    convex and decreasing in u, so Newton from u₀ = max_b(a_b − d_b) (where f ≥ 1)
    climbs monotonically to it, at least by half of u per step while f ≥ 2.

    Args:
        transfer_s: (N,) a_b > 0 of the chosen pairs.
        compute_s: (N,) c_b ≥ 0 of the chosen pairs.

    Returns:
        (T, shares): the round latency and the (N,) shares a_b / (d_b + u), Σ ≤ 1.
    """
    a = np.asarray(transfer_s, dtype=float)
    c = np.asarray(compute_s, dtype=float)
    if a.size == 0:
        return 0.0, np.zeros(0)
    top = float(np.max(c))
    d = top - c                   # (N,) ≥ 0, exact where it matters (the largest c gives 0)
    u = float(np.max(a - d))      # > 0: the largest c's own term has d = 0 and a > 0
    for _ in range(200):
        gap = d + u
        f = float(np.sum(a / gap))
        slope = float(np.sum(a / gap**2))
        step = (f - 1.0) / slope
        if not step > u * 1e-15:  # converged (or a non-finite step: keep the last u)
            break
        u += step
    share = a / (d + u)
    return top + u, share / max(1.0, float(share.sum()))  # guard the last ulp: never exceed the link


def matching_round_time(transfer_s: np.ndarray, compute_s: np.ndarray) -> float:
    """T*_σ: the root of Σ_b a_b / (T − c_b) = 1 for one matching (see `balanced_shares`).

    Args:
        transfer_s: (N,) a_b of the chosen pairs.
        compute_s: (N,) c_b of the chosen pairs.

    Returns:
        The round latency with balanced shares.
    """
    return balanced_shares(transfer_s, compute_s)[0]


def _shares(costs: Costs, t: float) -> np.ndarray:
    """(K, N) w_kb(T), +inf where the pair cannot finish by T."""
    a, c = costs.transfer_s, costs.compute_s
    ok = costs.fits & (c < t)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, a / np.where(ok, t - c, 1.0), np.inf)


def start_time(compute_s: np.ndarray, transfer_s: np.ndarray, n_blocks: int) -> float:
    """A T at which every pair is affordable with a share of at most 1/N.

    ``max c + N · max a``, with at least a few ulps of ``max c`` above it: a gap
    below the rounding step of c would leave the slowest pairs no time at all.

    Args:
        compute_s: c of the pairs that fit (any shape).
        transfer_s: a of the same pairs.
        n_blocks: N.
    """
    top = float(np.max(compute_s))
    return top + max(n_blocks * float(np.max(transfer_s)), 4 * math.ulp(top))


Config = TypeVar("Config")


def fractional_search(t: float, cheapest: Callable[[float], "tuple[float, Config] | None"],
                      round_time: Callable[[Config], float]) -> tuple[Config | None, float, int]:
    """The Dinkelbach-type search on T shared by the exact solvers.

    Each candidate x (a matching, or a split with its matching) has required
    shares f_x(T) = Σ a/(T − c), continuous and strictly decreasing, and round
    latency T*_x, the root of f_x = 1.  From a T where some x is affordable:
    x ← the cheapest at T (``cheapest``), T ← T*_x (``round_time``).  T falls
    strictly until the cheapest total is 1, which happens only at the optimum
    (module docstring); finitely many x, so it stops.

    Args:
        t: the start, at which every candidate that fits is affordable.
        cheapest: T -> (min_x f_x(T), argmin x), or None when no candidate can finish by T.
        round_time: x -> T*_x.

    Returns:
        (best x or None, its T*, steps taken).
    """
    best, best_t = None, math.inf
    for step in range(1, 10_000):
        found = cheapest(t)
        if found is None:
            return best, best_t, step
        total, candidate = found
        if best is not None and total >= 1.0 - 1e-12:
            return best, best_t, step  # g(T) = 1: T is the optimum
        t_new = round_time(candidate)
        if not t_new < best_t:
            return best, best_t, step  # no strict progress left (floating point)
        best, best_t, t = candidate, t_new, t_new
    return best, best_t, step


def _result(costs: Costs, match: list[int], assignments: int) -> JointResult:
    cols = np.arange(len(match))
    t, share = balanced_shares(costs.transfer_s[match, cols], costs.compute_s[match, cols])
    shares = np.zeros(costs.rate.size)
    shares[match] = share
    return JointResult(tuple(int(k) for k in match), tuple(float(s) for s in shares), t, assignments)


def joint_exact(costs: Costs) -> JointResult | None:
    """Exact joint optimum: search on T with a min-cost assignment of required shares.

    Args:
        costs: the instance (blocks shallowest first).

    Returns:
        The optimal `JointResult`, or None if no matching fits in memory.
    """
    n_dev, n_blocks = costs.compute_s.shape
    if n_blocks == 0:
        return JointResult((), tuple([0.0] * n_dev), 0.0, 0)
    if n_blocks > n_dev or not costs.fits.any():
        return None
    cols = np.arange(n_blocks)

    def cheapest(t: float) -> tuple[float, list[int]] | None:
        w = _shares(costs, t)
        match = min_cost_assignment(w.T)
        return None if match is None else (float(w[match, cols].sum()), match)

    def round_time(match: list[int]) -> float:
        return matching_round_time(costs.transfer_s[match, cols], costs.compute_s[match, cols])

    fits = costs.fits
    best, _, steps = fractional_search(start_time(costs.compute_s[fits], costs.transfer_s[fits], n_blocks),
                                       cheapest, round_time)
    return None if best is None else _result(costs, best, steps)


def _lagrangian_time(a: np.ndarray, c: np.ndarray, price: float) -> tuple[float, float]:
    """argmin_T T + λ Σ a/(T − c): the root of λ Σ a/(T − c)² = 1.

    In the gap u = T − max c, as in `balanced_shares`: λ Σ a/(d + u)² is convex
    and decreasing in u, so Newton from u₀ = max(√(λa) − d) climbs to the root.

    Returns:
        (T, Σ a/(T − c) there); (nan, nan) when the price is so far off that the
        root is not representable.
    """
    top = float(np.max(c))
    d = top - c
    u = float(np.max(np.sqrt(price * a) - d))
    if not (u > 0 and math.isfinite(u)):
        return math.nan, math.nan
    for _ in range(200):
        gap = d + u
        g = price * float(np.sum(a / gap**2)) - 1.0
        slope = 2.0 * price * float(np.sum(a / gap**3))
        step = g / slope if slope > 0 else math.nan
        if not step > u * 1e-15:
            break
        u += step
    return top + u, float(np.sum(a / (d + u)))


def joint_dual_ascent(costs: Costs, config: DualConfig = DualConfig()) -> JointResult | None:
    """Joint matching and shares by dual ascent on the bandwidth price.

    Args:
        costs: the instance (blocks shallowest first).
        config: iteration limits and step.

    Returns:
        The best feasible plan it found, or None if no matching fits in memory.
    """
    n_dev, n_blocks = costs.compute_s.shape
    if n_blocks == 0:
        return JointResult((), tuple([0.0] * n_dev), 0.0, 0)
    if n_blocks > n_dev or not costs.fits.any():
        return None
    cols = np.arange(n_blocks)
    fits = costs.fits
    match = min_cost_assignment(_shares(costs, start_time(costs.compute_s[fits], costs.transfer_s[fits],
                                                          n_blocks)).T)
    if match is None:
        return None
    a, c = costs.transfer_s[match, cols], costs.compute_s[match, cols]
    t, share = balanced_shares(a, c)
    best, best_t = match, t
    # Stationarity of L in T at this plan: λ Σ a/(T − c)² = 1, with T − c = a / share.
    log_price = -math.log(float(np.sum(share**2 / a)))
    assignments = 1
    previous = match
    for _ in range(config.max_iter):
        # (1) involvement indicators: the cheapest shares at the current T
        w = _shares(costs, t)
        x = min_cost_assignment(w.T)
        assignments += 1
        if x is None:  # T fell below what any matching can reach: back off to the best plan's T
            t = best_t
            log_price += config.step
            continue
        a, c = costs.transfer_s[x, cols], costs.compute_s[x, cols]
        # primal recovery: this x as a feasible plan
        t_x = matching_round_time(a, c)
        if t_x < best_t:
            best, best_t = x, t_x
        # (2) minimise the Lagrangian over T for this x; (3) price step on the clipped subgradient
        t, used = _lagrangian_time(a, c, math.exp(log_price))
        if not math.isfinite(t):
            break  # the price left the range where T is representable: keep the best plan found
        overrun = used - 1.0
        log_price += config.step * min(overrun, 1.0)
        if abs(overrun) < config.tol and x == previous:
            break
        previous = x
    return _result(costs, best, assignments)


def brute_force_joint(costs: Costs) -> float:
    """Reference: min over every injective matching of T*_σ (bisection per matching).

    Exponential; for tests and the benchmark only.  Uses bisection rather than
    the Newton step of `matching_round_time` so the two are independent.

    Returns:
        The optimal round latency, +inf if nothing fits.
    """
    n_dev, n_blocks = costs.compute_s.shape
    if n_blocks == 0:
        return 0.0
    if n_blocks > n_dev:
        return math.inf
    maps = np.array(list(itertools.permutations(range(n_dev), n_blocks)), dtype=int)  # (M, N)
    cols = np.arange(n_blocks)
    ok = costs.fits[maps, cols].all(axis=1)
    if not ok.any():
        return math.inf
    a = costs.transfer_s[maps[ok], cols]  # (M, N)
    c = costs.compute_s[maps[ok], cols]
    lo = (c + a).max(axis=1)        # f ≥ 1 here
    hi = c.max(axis=1) + a.sum(axis=1)  # f ≤ 1 here
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        over = (a / (mid[:, None] - c)).sum(axis=1) > 1.0
        lo = np.where(over, mid, lo)
        hi = np.where(over, hi, mid)
        if np.all(hi - lo <= 1e-13 * hi):
            break
    return float(hi.min())
