"""The planner end to end on the example fleets, and its infeasibility messages."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from shared.errors import InputError
from shared.fleet_io import load_fleet, load_job
from shared.planner import PlannerConfig, plan, summary_rows

ROOT = Path(__file__).resolve().parents[2]
LAB = load_fleet(ROOT / "assets/fleets/lab3.toml")
SMOLLM2 = load_job(ROOT / "assets/jobs/smollm2.toml")
BLOCKS = load_job(ROOT / "assets/jobs/smollm2_blocks.toml")


def test_plan_balances_every_involved_device_to_the_round_latency() -> None:
    result = plan(LAB, BLOCKS, PlannerConfig(random_seeds=10))
    busy = [r for r in result.devices if r.block is not None]
    assert len(busy) == 3 and sum(r.share for r in busy) <= 1 + 1e-12
    for r in busy:
        assert r.round_s == pytest.approx(result.round_s, rel=1e-9)
        assert r.memory_bytes <= r.memory_limit_bytes
    assert result.exact_round_s == result.round_s and result.dual_gap >= -1e-9
    assert result.baselines["equal_bandwidth"] >= result.round_s


def test_chosen_boundaries_report_the_saving_over_equal_blocks() -> None:
    result = plan(LAB, SMOLLM2, PlannerConfig(random_seeds=10))
    assert result.boundaries_chosen
    assert result.round_s == pytest.approx(result.equal_blocks_round_s * (1 - result.boundary_saving))
    assert result.boundary_saving >= 0
    json.dumps(result.to_dict())  # plain data
    assert summary_rows(result)[0][0] == "device"


def test_dual_solver_gives_a_feasible_plan() -> None:
    result = plan(LAB, BLOCKS, PlannerConfig(solver="dual", baselines=False))
    assert result.solver == "dual" and result.round_s == result.dual_round_s
    assert result.round_s >= result.exact_round_s * (1 - 1e-9)


def test_a_block_that_fits_nowhere_is_named_with_its_need_and_the_limits() -> None:
    tiny = replace(LAB, devices=tuple(replace(d, memory_bytes=1.5 * 2**30) for d in LAB.devices))
    with pytest.raises(InputError, match=r"block 'layers-0-9' \(layers 0-9\) fits on no device: it needs "
                                         r"2\.1\d GiB.*pi4 1\.50 GiB"):
        plan(tiny, BLOCKS)


def test_blocks_sharing_too_few_devices_are_named() -> None:
    # only the laptop can hold the shallowest two blocks
    devices = (replace(LAB.devices[0], memory_bytes=1.0 * 2**30), replace(LAB.devices[1], memory_bytes=1.0 * 2**30),
               LAB.devices[2])
    with pytest.raises(InputError, match=r"blocks 'layers-0-9', 'layers-10-19' fit only on 1 device\(s\) \(laptop\)"):
        plan(replace(LAB, devices=devices), BLOCKS)


def test_more_blocks_than_devices_and_bad_solver_are_input_errors() -> None:
    two = replace(LAB, devices=LAB.devices[:2])
    with pytest.raises(InputError, match="3 blocks but the fleet has 2 devices"):
        plan(two, BLOCKS)
    with pytest.raises(InputError, match="solver"):
        plan(LAB, BLOCKS, PlannerConfig(solver="magic"))
