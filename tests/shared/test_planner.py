"""The planner end to end on the example fleets, and its infeasibility messages."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shared import planner as planner_module
from shared.boundaries import brute_force_boundaries, default_block_count
from shared.costmodel import step_times
from shared.errors import InputError
from shared.fleet_io import load_fleet, load_job
from shared.planner import PlannerConfig, brute_force_round, plan, summary_rows
from shared.profiles import Block, DeviceProfile, Fleet, Job

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
                                         r"2\.1\d GiB.*pi4 1\.50 GiB \(669 MiB short\)"):
        plan(tiny, BLOCKS)


def test_a_device_one_byte_short_says_so_rather_than_showing_equal_sizes() -> None:
    job = Job("j", 4, 0, 3, 1000.0, 2, 2, 1, 0.87 * 2**30, 0.0, blocks=(Block("all", 0, 3, 4000.0),))
    need = 0.87 * 2**30 + 2 * 2 * 4000.0
    fleet = Fleet("f", (DeviceProfile("d3", (0.1,), (0.2,), 0.0, need - 1, 1e6),))
    with pytest.raises(InputError, match=r"needs 0\.87 GiB of memory; device limits: d3 0\.87 GiB \(1 B short\)"):
        plan(fleet, job)


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


def test_plans_say_which_profiles_are_estimated_and_how_the_boundaries_were_chosen() -> None:
    result = plan(LAB, SMOLLM2, PlannerConfig(random_seeds=5))
    assert [r.profile for r in result.devices] == ["estimated"] * 3
    assert summary_rows(result)[0][-1] == "profile" and summary_rows(result)[1][-1] == "estimated"
    assert result.boundary_method == "exact"
    assert result.boundary_lower_bound_s == pytest.approx(result.round_s)
    assert plan(LAB, BLOCKS, PlannerConfig(baselines=False)).boundary_method == "given"
    assert plan(LAB, SMOLLM2, PlannerConfig(choose_boundaries=False, baselines=False)).boundary_method == "equal"


# The crash of the issue: link rates 1e5 apart, the fast-link device listed (and picked) first.
# Dual ascent's price update overflowed and its Lagrangian time divided by zero; both solvers
# crashed, since the exact one runs dual ascent for the gap.
FAST_LINK_FIRST = Fleet("f", (DeviceProfile("fast-link", (0.0128,), (0.161,), 0.02, 2 * 2**30, 7.8e10),
                              DeviceProfile("slow-link", (0.034,), (0.153,), 0.02, 2 * 2**30, 7.8e5)))
SIX_LAYERS = Job("j", 6, 0, 5, 2778.0, 4, 4, 3, 512 * 2**20, 10 * 2**20)


@pytest.mark.parametrize("solver", ["exact", "dual"])
def test_link_rates_1e5_apart_plan_optimally_with_either_solver(solver: str) -> None:
    result = plan(FAST_LINK_FIRST, SIX_LAYERS, PlannerConfig(solver=solver))
    expected = brute_force_boundaries(FAST_LINK_FIRST, SIX_LAYERS, 2, step_times(FAST_LINK_FIRST, SIX_LAYERS))
    assert result.round_s == pytest.approx(expected, rel=1e-9)
    assert result.dual_gap is not None and 0 <= result.dual_gap < 1e-6


def test_a_failing_dual_ascent_leaves_the_exact_plan_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def overflow(*_args, **_kwargs):
        raise OverflowError("math range error")

    monkeypatch.setattr(planner_module, "joint_dual_ascent", overflow)
    exact = plan(LAB, BLOCKS, PlannerConfig(baselines=False))
    asked_dual = plan(LAB, BLOCKS, PlannerConfig(solver="dual", baselines=False))
    assert exact.dual_round_s is None and exact.dual_gap is None
    assert asked_dual.solver == "exact" and asked_dual.round_s == exact.exact_round_s
    assert any("dual ascent failed (OverflowError" in note and "exact plan is shown" in note
               for note in asked_dual.notes)


def test_the_default_block_count_falls_to_what_memory_allows_and_says_so() -> None:
    # All three devices hold a block of the deepest layer alone, but the two small ones hold
    # nothing that starts higher (one more wide layer), so three blocks fit in no split: two do.
    job = Job("j", 4, 0, 3, 1000.0, 2, 2, 1, 1e9, 1e8)
    fleet = Fleet("f", (DeviceProfile("big", (0.1,), (0.2,), 0.0, 1.5e9, 1e6),
                        DeviceProfile("small-1", (0.1,), (0.2,), 0.0, 1.15e9, 1e6),
                        DeviceProfile("small-2", (0.1,), (0.2,), 0.0, 1.15e9, 1e6)))
    assert default_block_count(fleet, job) == 3
    result = plan(fleet, job, PlannerConfig(baselines=False))
    assert [(b.first_layer, b.last_layer) for b in result.blocks] == [(0, 2), (3, 3)]
    assert result.devices[0].block == "b1"
    assert any("3 blocks" in note and "planned 2" in note for note in result.notes)
    with pytest.raises(InputError, match="no split of layers 0-3 into 3 blocks fits in memory"):
        plan(fleet, replace(job, n_blocks=3))


@st.composite
def extreme_cases(draw: st.DrawFn) -> tuple[Fleet, Job]:
    """Valid but extreme input: link rates 1 B/s to 1e13 B/s, times 0 to 1e4 s, memories 1 B to 1e15 B."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_dev = draw(st.integers(1, 4))
    layers = draw(st.integers(1, 6))
    memory_scale = 10 ** rng.uniform(0, 15)
    devices = []
    for k in range(n_dev):
        bs = 0.0 if rng.random() < 0.1 else float(10 ** rng.uniform(-9, 3))
        devices.append(DeviceProfile(f"d{k}", (bs,), (bs * float(10 ** rng.uniform(0, 1)),),
                                     float(10 ** rng.uniform(-9, 3)) * (rng.random() > 0.1),
                                     float(memory_scale * rng.uniform(0.5, 2)), float(10 ** rng.uniform(0, 13))))
    payload = float(10 ** rng.uniform(0, 9))
    blocks: tuple[Block, ...] = ()
    if draw(st.booleans()):  # fixed blocks, one per layer up to the device count
        n = min(n_dev, layers)
        blocks = tuple(Block(f"b{i}", i, i if i < n - 1 else layers - 1, payload * (1 if i < n - 1 else layers - i))
                       for i in range(n))
    job = Job("j", layers, 0, layers - 1, payload, 2, 2, int(rng.integers(1, 4)),
              memory_scale * rng.uniform(0, 0.5), memory_scale * rng.uniform(0, 0.1), blocks=blocks)
    return Fleet("f", tuple(devices)), job


@settings(max_examples=150, deadline=None)
@given(extreme_cases(), st.sampled_from(["exact", "dual"]))
def test_extreme_but_valid_input_plans_optimally_or_says_why_not(case: tuple[Fleet, Job], solver: str) -> None:
    fleet, job = case
    expected = brute_force_round(fleet, job)
    try:
        result = plan(fleet, job, PlannerConfig(solver=solver, random_seeds=3))
    except InputError:
        assert not math.isfinite(expected)
        return
    assert math.isfinite(expected)
    assert result.exact_round_s == pytest.approx(expected, rel=1e-9)
    assert result.round_s >= expected * (1 - 1e-9)
    assert sum(r.share for r in result.devices) <= 1 + 1e-12
    for r in result.devices:
        if r.block is not None:
            assert r.memory_bytes <= r.memory_limit_bytes and r.round_s <= result.round_s * (1 + 1e-9)
