"""CRUNCH against brute force on random instances (hypothesis), plus fixed cases."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from shared.crunch import brute_force_minmax, crunch, feasible_at, hall_violation, max_matching


@st.composite
def latency_matrices(draw: st.DrawFn, monotone: bool) -> np.ndarray:
    """(K, N) latencies with ties (small integers) and +inf for blocks that do not fit."""
    n_dev = draw(st.integers(1, 8))
    n_blocks = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    levels = draw(st.integers(1, 6))          # few levels = many ties
    p_inf = draw(st.sampled_from([0.0, 0.2, 0.5]))
    rng = np.random.default_rng(seed)
    lat = rng.integers(0, levels, size=(n_dev, n_blocks)).astype(float)
    if monotone:
        # Non-increasing in depth, as the cost model gives for equal payloads.
        lat = -np.sort(-lat, axis=1)
        # Memory: a device fits every block deeper than a random cutoff.
        cut = rng.integers(0, n_blocks + 1, size=n_dev) if p_inf else np.zeros(n_dev, int)
        lat[np.arange(n_blocks)[None, :] < cut[:, None]] = np.inf
    else:
        lat[rng.random(lat.shape) < p_inf] = np.inf
    return lat


def _check(lat: np.ndarray) -> None:
    expected = brute_force_minmax(lat)
    got = crunch(lat)
    if not np.isfinite(expected):
        assert got is None
        return
    assert got is not None
    assert got.round_s == expected
    # The matching is one-to-one and really achieves the latency it claims.
    assert len(set(got.device_of_block)) == lat.shape[1]
    assert max(lat[k, b] for b, k in enumerate(got.device_of_block)) == expected


@settings(max_examples=300, deadline=None)
@given(latency_matrices(monotone=True))
def test_crunch_matches_brute_force_on_monotone_instances(lat: np.ndarray) -> None:
    _check(lat)


@settings(max_examples=200, deadline=None)
@given(latency_matrices(monotone=False))
def test_crunch_matches_brute_force_when_monotonicity_fails(lat: np.ndarray) -> None:
    _check(lat)


def test_more_devices_than_blocks_leaves_the_slowest_idle() -> None:
    # prepare: 3 devices, 2 blocks; device 2 is slow everywhere
    lat = np.array([[4.0, 2.0], [5.0, 3.0], [50.0, 40.0]])
    # execute
    got = crunch(lat)
    # assert: the shallow block goes to the fast device, the slow one idles
    assert got is not None and got.device_of_block == (0, 1) and got.round_s == 4.0


def test_more_blocks_than_devices_is_infeasible() -> None:
    assert crunch(np.ones((2, 3))) is None


def test_feasibility_is_monotone_in_the_limit() -> None:
    rng = np.random.default_rng(0)
    lat = -np.sort(-rng.random((6, 5)), axis=1)
    limits = np.sort(lat.ravel())
    flags = [feasible_at(lat, t) for t in limits]
    assert flags == sorted(flags)  # False ... False True ... True


def test_hall_violation_names_the_blocks_that_share_too_few_devices() -> None:
    # blocks 0 and 1 both fit only on device 0
    fits = np.array([[True, True, True], [False, False, True], [False, False, True]])
    blocks, devices = hall_violation(fits)
    assert blocks == [0, 1] and devices == [0]
    assert hall_violation(np.ones((3, 3), bool)) is None
    assert max_matching(fits).count(-1) == 1
