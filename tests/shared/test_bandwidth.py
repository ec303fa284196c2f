"""Joint bandwidth + blocks: Hungarian, exact search and dual ascent against brute force."""
from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings, strategies as st

from shared.bandwidth import (brute_force_joint, joint_dual_ascent, joint_exact,
                              matching_round_time, min_cost_assignment)
from shared.costmodel import Costs


@st.composite
def instances(draw: st.DrawFn, max_size: int = 6) -> Costs:
    """Random joint instances: monotone compute, unequal payloads, some blocks not fitting."""
    n_dev = draw(st.integers(1, max_size))
    n_blocks = draw(st.integers(1, max_size))
    comm_scale = draw(st.sampled_from([0.01, 1.0, 100.0]))  # compute-bound ... link-bound
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    compute = -np.sort(-rng.random((n_dev, n_blocks)) * 10, axis=1)
    payload = rng.random(n_blocks) + 0.1
    return Costs(compute_s=compute, comm_bytes=comm_scale * (payload.sum() + payload),
                 rate=rng.random(n_dev) * 2 + 0.1, memory_need=rng.random(n_blocks),
                 memory_limit=rng.random(n_dev) + draw(st.sampled_from([0.3, 1.0])))


def _check_feasible(costs: Costs, result) -> None:
    shares = np.array(result.shares)
    assert shares.sum() <= 1.0 + 1e-12 and np.all(shares >= 0)
    assert len(set(result.device_of_block)) == len(result.device_of_block)
    for b, k in enumerate(result.device_of_block):
        assert costs.fits[k, b]
        finish = costs.transfer_s[k, b] / shares[k] + costs.compute_s[k, b]
        assert finish <= result.round_s * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2), st.integers(0, 2**32 - 1))
def test_min_cost_assignment_matches_brute_force(n: int, extra: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 4, size=(n, n + extra)).astype(float)  # small ints: ties
    cost[rng.random(cost.shape) < 0.3] = np.inf
    maps = np.array(list(itertools.permutations(range(n + extra), n)))
    best = cost[np.arange(n), maps].sum(axis=1).min()
    got = min_cost_assignment(cost)
    assert (np.inf if got is None else sum(cost[i, got[i]] for i in range(n))) == best


@settings(max_examples=150, deadline=None)
@given(instances())
def test_exact_matches_brute_force(costs: Costs) -> None:
    expected = brute_force_joint(costs)
    got = joint_exact(costs)
    if not np.isfinite(expected):
        assert got is None
        return
    assert got is not None
    assert abs(got.round_s - expected) <= 1e-9 * expected
    _check_feasible(costs, got)


@settings(max_examples=150, deadline=None)
@given(instances(max_size=8))
def test_dual_ascent_is_feasible_and_within_two_percent_of_exact(costs: Costs) -> None:
    exact = joint_exact(costs)
    dual = joint_dual_ascent(costs)
    assert (exact is None) == (dual is None)
    if exact is None:
        return
    _check_feasible(costs, dual)
    assert dual.round_s >= exact.round_s * (1 - 1e-9)  # never beats the optimum
    assert dual.round_s <= exact.round_s * 1.02


def test_round_time_balances_shares_to_the_whole_link() -> None:
    # two devices: 1 s of transfer each on the whole band, 2 s and 3 s of compute
    a, c = np.array([1.0, 1.0]), np.array([2.0, 3.0])
    t = matching_round_time(a, c)
    # Σ a/(T − c) = 1  ->  1/(T−2) + 1/(T−3) = 1  ->  T = (7 + √5)/2
    assert abs(t - (7 + 5**0.5) / 2) < 1e-12
