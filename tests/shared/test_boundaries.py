"""Block-boundary search: valid splits, never worse than equal-size blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings, strategies as st

from shared.bandwidth import joint_exact
from shared.boundaries import blocks_from_cuts, choose_boundaries, default_block_count, equal_cuts
from shared.costmodel import step_times
from shared.fleet_io import load_fleet, load_job
from shared.profiles import DeviceProfile, Fleet, Job

ROOT = Path(__file__).resolve().parents[2]


def test_equal_cuts_and_blocks_cover_the_trainable_layers() -> None:
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    cuts = equal_cuts(30, 4)
    blocks = blocks_from_cuts(job, cuts)
    assert cuts == (0, 8, 15, 22, 30)
    assert [(b.first_layer, b.last_layer) for b in blocks] == [(0, 7), (8, 14), (15, 21), (22, 29)]
    assert blocks[0].payload_bytes == 8 * 24576


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(4, 12), st.integers(0, 2**32 - 1))
def test_chosen_split_is_contiguous_and_never_worse_than_equal(n_dev: int, layers: int, seed: int) -> None:
    # prepare: a random heterogeneous fleet
    rng = np.random.default_rng(seed)
    devices = tuple(DeviceProfile(f"d{k}", (float(s),), (float(s * (2 + rng.random() * 6)),), 0.01,
                                  float(rng.uniform(0.6, 1.3)), float(rng.uniform(0.05, 0.5)))
                    for k, s in enumerate(rng.uniform(0.01, 0.1, n_dev)))
    fleet = Fleet("f", devices)
    job = Job("j", layers, 0, layers - 1, 0.01, 2, 2, 3, 0.4, 0.05)
    n = default_block_count(fleet, job)
    # execute
    choice = choose_boundaries(fleet, job, n, step_times(fleet, job), joint_exact)
    # assert
    assert [b.first_layer for b in choice.blocks][0] == 0 and choice.blocks[-1].last_layer == layers - 1
    for a, b in zip(choice.blocks, choice.blocks[1:]):
        assert b.first_layer == a.last_layer + 1
    if choice.equal_result is not None:
        assert choice.result is not None and choice.result.round_s <= choice.equal_result.round_s


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
    choice = choose_boundaries(fleet, job, 3, step_times(fleet, job), joint_exact)
    assert choice.result.round_s < choice.equal_result.round_s
    assert choice.blocks != choice.equal_blocks
