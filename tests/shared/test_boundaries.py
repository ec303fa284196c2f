"""Block boundaries: the exact DP against brute force over contiguous splits, the heuristic and its bound."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shared.boundaries import (blocks_from_cuts, brute_force_boundaries, choose_boundaries, default_block_count,
                               equal_cuts)
from shared.costmodel import step_times
from shared.fleet_io import load_fleet, load_job
from shared.profiles import DeviceProfile, Fleet, Job

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def _dev(name: str, bs: float, wide: float, memory: float, rate: float) -> DeviceProfile:
    return DeviceProfile(name, (bs,), (wide,), 0.02, memory, rate)


# Two instances on which the local search from equal blocks (the planner before the DP) failed:
# it called the first infeasible (2 of its 3 equal blocks fit only on d0), and returned a split
# 66 % slower than the best for the second.
INFEASIBLE_FROM_EQUAL = (
    Fleet("f", (_dev("d0", 0.0274, 0.2529, 1.068e9, 6.8e6), _dev("d1", 0.0104, 0.1936, 6.70e8, 2.54e7),
                _dev("d2", 0.0480, 0.2635, 6.77e8, 1.04e6))),
    Job("j", 8, 0, 7, 43252.0, 4, 4, 1, 512 * MIB, 57.83e6))
SLOW_FROM_EQUAL = (
    Fleet("f", (_dev("d0", 0.0392, 0.2551, 1.164e9, 4.65e7), _dev("d1", 0.0381, 0.0955, 9.75e8, 1.28e7),
                _dev("d2", 0.0259, 0.1770, 8.51e8, 3.27e5), _dev("d3", 0.0452, 0.1412, 6.61e8, 1.19e6))),
    Job("j", 5, 0, 4, 10911.0, 4, 4, 5, 512 * MIB, 85.02e6))


def test_equal_cuts_and_blocks_cover_the_trainable_layers() -> None:
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    cuts = equal_cuts(30, 4)
    blocks = blocks_from_cuts(job, cuts)
    assert cuts == (0, 8, 15, 22, 30)
    assert [(b.first_layer, b.last_layer) for b in blocks] == [(0, 7), (8, 14), (15, 21), (22, 29)]
    assert blocks[0].payload_bytes == 8 * 24576


@st.composite
def fleets_and_jobs(draw: st.DrawFn) -> tuple[Fleet, Job, int]:
    """Small instances, link rates 1 B/s to 1e13 B/s, tight memory so some splits do not fit."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_dev = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 8))
    devices = tuple(_dev(f"d{k}", float(s), float(s * rng.uniform(1, 10)), float(rng.uniform(0.3, 1.2) * 2**30),
                         float(10 ** rng.uniform(0, 13)))
                    for k, s in enumerate(10 ** rng.uniform(-4, 0, n_dev)))
    job = Job("j", layers + 1, 1, layers, float(10 ** rng.uniform(0, 6)), 2, 2, int(rng.integers(1, 6)),
              0.2 * 2**30, float(rng.uniform(0, 0.1)) * 2**30)
    return Fleet("f", devices), job, draw(st.integers(1, min(n_dev, layers)))


@settings(max_examples=80, deadline=None)
@given(fleets_and_jobs())
def test_exact_boundaries_match_brute_force_over_contiguous_splits(case: tuple[Fleet, Job, int]) -> None:
    fleet, job, n_blocks = case
    steps = step_times(fleet, job)
    expected = brute_force_boundaries(fleet, job, n_blocks, steps)
    choice = choose_boundaries(fleet, job, n_blocks, steps)
    assert choice.method == "exact"
    if not math.isfinite(expected):
        assert choice.result is None and choice.lower_bound_s == math.inf
        return
    assert choice.result is not None
    assert choice.result.round_s == pytest.approx(expected, rel=1e-9)
    assert choice.lower_bound_s == pytest.approx(expected, rel=1e-9)
    # contiguous, covering, n blocks
    assert len(choice.blocks) == n_blocks
    assert choice.blocks[0].first_layer == job.trainable_first and choice.blocks[-1].last_layer == job.trainable_last
    for a, b in zip(choice.blocks, choice.blocks[1:]):
        assert b.first_layer == a.last_layer + 1
    if choice.equal_result is not None:
        assert choice.result.round_s <= choice.equal_result.round_s * (1 + 1e-12)


@settings(max_examples=40, deadline=None)
@given(fleets_and_jobs())
def test_heuristic_lies_between_its_lower_bound_and_any_split(case: tuple[Fleet, Job, int]) -> None:
    fleet, job, n_blocks = case
    steps = step_times(fleet, job)
    expected = brute_force_boundaries(fleet, job, n_blocks, steps)
    choice = choose_boundaries(fleet, job, n_blocks, steps, exact_max_devices=0)  # force the heuristic
    got = math.inf if choice.result is None else choice.result.round_s
    assert choice.lower_bound_s <= expected * (1 + 1e-9)
    assert got >= expected * (1 - 1e-9)
    if not math.isfinite(choice.lower_bound_s):
        assert not math.isfinite(expected)  # the relaxed bound says infeasible only when it is


@pytest.mark.parametrize("case", [INFEASIBLE_FROM_EQUAL, SLOW_FROM_EQUAL], ids=["infeasible", "slow"])
def test_cases_the_local_search_got_wrong_are_now_optimal(case: tuple[Fleet, Job]) -> None:
    fleet, job = case
    steps = step_times(fleet, job)
    n_blocks = default_block_count(fleet, job)
    expected = brute_force_boundaries(fleet, job, n_blocks, steps)
    choice = choose_boundaries(fleet, job, n_blocks, steps)
    assert math.isfinite(expected) and choice.result is not None
    assert choice.result.round_s == pytest.approx(expected, rel=1e-9)


def test_block_count_is_one_per_device_that_can_hold_a_block() -> None:
    fleet = load_fleet(ROOT / "assets/fleets/classroom10.toml")
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    assert default_block_count(fleet, job) == 10
    small = Job("j", 30, 0, 4, 1.0, 4, 4, 1, 0.0, 0.0)
    assert default_block_count(fleet, small) == 5  # capped at the trainable layers


def test_search_moves_boundaries_when_it_pays() -> None:
    # On the lab fleet the slow Pi should get a deep block: the split is not the equal one.
    fleet = load_fleet(ROOT / "assets/fleets/lab3.toml")
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    choice = choose_boundaries(fleet, job, 3, step_times(fleet, job))
    assert choice.method == "exact"
    assert choice.result.round_s < choice.equal_result.round_s
    assert choice.blocks != choice.equal_blocks


def test_one_block_per_layer_is_the_only_split_and_exact_at_any_fleet_size() -> None:
    fleet = Fleet("f", tuple(_dev(f"d{k}", 0.01, 0.05, 2**31, 1e6 * (k + 1)) for k in range(20)))
    job = Job("j", 6, 0, 5, 1e4, 2, 2, 1, 0.0, 0.0)
    choice = choose_boundaries(fleet, job, 6, step_times(fleet, job), exact_max_devices=4)
    assert choice.method == "exact" and [b.first_layer for b in choice.blocks] == list(range(6))
