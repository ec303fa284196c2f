"""Baselines: scored on the same blocks; none beats the exact joint optimum it shares blocks with."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.bandwidth import joint_exact
from shared.boundaries import blocks_from_cuts, equal_cuts
from shared.costmodel import block_costs, step_times
from shared.fleet_io import load_fleet, load_job
from shared.plan_baselines import all_baselines, all_on_fastest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fleet_name", ["lab3", "classroom10"])
def test_same_block_baselines_are_never_below_the_joint_optimum(fleet_name: str) -> None:
    fleet = load_fleet(ROOT / f"assets/fleets/{fleet_name}.toml")
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    blocks = blocks_from_cuts(job, equal_cuts(30, len(fleet.devices)))
    steps = step_times(fleet, job)
    optimum = joint_exact(block_costs(fleet, job, blocks, steps)).round_s
    base = all_baselines(fleet, job, blocks, steps, random_seeds=20, seed=1)
    assert set(base) == {"equal_bandwidth", "random", "fastest_first", "memory_proportional",
                         "lowest_throughput_window", "all_on_fastest"}
    for name in ("equal_bandwidth", "random", "fastest_first", "lowest_throughput_window"):
        assert base[name] >= optimum * (1 - 1e-12), name
    # random is a mean of matchings, equal_bandwidth the best of them
    assert base["random"] >= base["equal_bandwidth"]


def test_all_on_fastest_runs_every_block_in_turn_with_the_whole_link() -> None:
    fleet = load_fleet(ROOT / "assets/fleets/lab3.toml")
    job = load_job(ROOT / "assets/jobs/smollm2_blocks.toml")
    costs = block_costs(fleet, job, job.blocks)
    s_tot = sum(b.payload_bytes for b in job.blocks)
    wire = 4 / 3 * 2 * s_tot  # the global state down once and every block up, base64 on the wire
    expected = min(costs.compute_s[k].sum() + wire / costs.rate[k] for k in range(3) if costs.fits[k].all())
    assert all_on_fastest(costs) == pytest.approx(expected)
    assert np.isfinite(expected)
