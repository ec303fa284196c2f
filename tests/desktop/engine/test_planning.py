"""Planning for the engine: the planner's plan with each block's slice of b, and the equal-random baseline."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from desktop.engine.planning import fleet_names, make_plan
from shared.blocks import check_cover, block_span
from shared.errors import InputError
from shared.fleet_io import load_fleet, load_job
from shared.manifest import BSlot

ROOT = Path(__file__).resolve().parents[3]


def layout(layers: int) -> list[BSlot]:
    slots, offset = [], 0
    for layer in range(layers):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            slots.append(BSlot(layer, module, f"model.layers.{layer}.self_attn.{module}", (out, 8), offset))
            offset += out * 8
    return slots


@pytest.fixture()
def lab():
    fleet = load_fleet(ROOT / "assets/fleets/lab3.toml")
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    profiles = {f"id-{d.name}": d for d in fleet.devices}
    names = {f"id-{d.name}": d.name for d in fleet.devices}
    return profiles, names, job


def test_planned_blocks_cover_the_layout_and_match_the_planner(lab) -> None:
    profiles, names, job = lab
    slots = layout(job.layers)
    plan = make_plan(profiles, names, job, slots)
    active = plan.active()
    assert {a.device for a in plan.assignments} == set(profiles)
    spans = [block_span(slots, a.first_layer, a.last_layer) for a in active]
    check_cover(slots, spans)  # the plan's blocks tile b exactly once
    assert [(a.offset, a.size) for a in active] == [(s.offset, s.size) for s in spans]
    assert plan.round_s == pytest.approx(max(a.round_s for a in active))
    assert sum(a.share for a in active) <= 1 + 1e-9
    assert plan.baselines["random"] is not None and plan.baselines["random"] > plan.round_s
    assert all(a.profile == "estimated" for a in plan.assignments)  # hand-written fleet, not measured


def test_equal_random_uses_equal_blocks_and_equal_shares(lab) -> None:
    profiles, names, job = lab
    slots = layout(job.layers)
    planned = make_plan(profiles, names, job, slots)
    baseline = make_plan(profiles, names, job, slots, policy="equal_random", seed=3)
    active = baseline.active()
    assert len(active) == len(planned.active())
    assert len({a.last_layer - a.first_layer for a in active}) <= 2  # equal-size (within one layer)
    assert all(a.share == pytest.approx(1 / len(active)) for a in active)
    check_cover(slots, [block_span(slots, a.first_layer, a.last_layer) for a in active])
    assert baseline.round_s >= planned.round_s - 1e-9  # the plan is optimal under the same cost model


def test_two_devices_with_one_name_get_distinct_planner_names() -> None:
    assert fleet_names({"aaaaaa11": "pi", "bbbbbb22": "pi", "c": "laptop"}) == \
        {"aaaaaa11": "pi-aaaaaa", "bbbbbb22": "pi-bbbbbb", "c": "laptop"}


def test_no_device_left_is_a_clear_error(lab) -> None:
    _, _, job = lab
    with pytest.raises(InputError, match="no device to plan for"):
        make_plan({}, {}, job, layout(job.layers))


def test_replicas_put_idle_devices_on_blocks_evenly_with_equal_shares() -> None:
    fleet = load_fleet(ROOT / "assets/fleets/classroom10.toml")
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    from dataclasses import replace

    job = replace(job, n_blocks=3)  # three blocks, ten devices: seven would idle
    profiles = {f"id{k}": d for k, d in enumerate(fleet.devices)}
    names = {f"id{k}": d.name for k, d in enumerate(fleet.devices)}
    slots = layout(job.layers)
    plain = make_plan(profiles, names, job, slots)
    replicated = make_plan(profiles, names, job, slots, replicas=True)
    assert len(plain.active()) == 3
    trained = replicated.active()
    assert len(trained) == len(fleet.devices)  # every device fits a block here
    per_block = {}
    for a in trained:
        per_block.setdefault(a.block, []).append(a)
    assert sorted(len(v) for v in per_block.values()) in ([3, 3, 4], [3, 4, 3], [4, 3, 3])
    assert {a.block for a in trained} == {a.block for a in plain.active()}
    assert all(a.share == pytest.approx(1 / len(trained)) for a in trained)
    assert replicated.round_s == pytest.approx(max(a.round_s for a in trained))
