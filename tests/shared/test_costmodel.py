"""Cost model: prefix-shared step time, memory, communication; monotone in depth."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shared.costmodel import block_costs, latency, memory_need, step_times
from shared.profiles import Block, DeviceProfile, Fleet, Job


def _job(layers: int = 4, **over) -> Job:
    fields = dict(name="j", layers=layers, trainable_first=0, trainable_last=layers - 1,
                  layer_payload_bytes=100.0, q=2, bs=3, local_steps=2,
                  memory_base_bytes=1000.0, memory_per_wide_layer_bytes=10.0)
    fields.update(over)
    return Job(**fields)


def _device(name: str, bs, wide, head=0.5, memory=1e9, link=1e3) -> DeviceProfile:
    return DeviceProfile(name, tuple(bs), tuple(wide), head, memory, link)


def test_step_time_is_prefix_on_bs_rows_then_wide() -> None:
    # prepare: 4 layers, distinct times so every term is visible
    dev = _device("d", [1, 2, 3, 4], [10, 20, 30, 40])
    # execute
    steps = step_times(Fleet("f", (dev,)), _job())
    # assert: t(d) = Σ_{l<d} bs + Σ_{l≥d} wide + head
    assert steps[0].tolist() == [100.5, 91.5, 73.5, 46.5, 10.5]


def test_uniform_profile_broadcasts_to_every_layer() -> None:
    dev = _device("d", [1], [3], head=0.0)
    assert step_times(Fleet("f", (dev,)), _job()).tolist() == [[12.0, 10.0, 8.0, 6.0, 4.0]]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_cost_is_monotone_in_depth(layers: int, seed: int) -> None:
    # prepare: random measured times with wide >= bs per layer, as check_device enforces
    rng = np.random.default_rng(seed)
    bs = rng.random(layers)
    wide = bs + rng.random(layers) * rng.integers(0, 2, layers)  # ties included: wide == bs
    job = _job(layers)
    # execute
    steps = step_times(Fleet("f", (_device("d", bs, wide),)), job)[0]
    mem = [memory_need(job, d, job.layer_payload_bytes) for d in range(layers)]
    # assert: deeper never costs more, in time or memory (equal payloads)
    assert np.all(np.diff(steps) <= 1e-12)
    assert np.all(np.diff(mem) <= 0)


def test_block_costs_and_latency_under_shares() -> None:
    # prepare: two blocks of 100 and 300 bytes; two devices
    job = _job()
    blocks = (Block("a", 0, 1, 100.0), Block("b", 2, 3, 300.0))
    fleet = Fleet("f", (_device("x", [1], [2], head=0.0, memory=1100.0),
                        _device("y", [1], [2], head=0.0, memory=5000.0, link=2e3)))
    # execute
    costs = block_costs(fleet, job, blocks)
    lat = latency(costs, np.array([0.5, 0.5]))
    # assert
    assert costs.comm_bytes.tolist() == pytest.approx([4 / 3 * 500.0, 4 / 3 * 700.0])  # base64 of S_tot + S_b
    assert costs.compute_s.tolist() == [[16.0, 12.0], [16.0, 12.0]]  # 2 local steps
    # memory: 1000 + 10·(4 − s_b) + 2q·S_b = 1440 and 2220 bytes: x holds neither
    assert costs.memory_need.tolist() == [1440.0, 2220.0]
    assert np.isinf(lat[0]).all()
    assert lat[1].tolist() == pytest.approx([16.0 + 4 / 3 * 500.0 / 1e3, 12.0 + 4 / 3 * 700.0 / 1e3])
    assert np.isinf(latency(costs, np.array([0.0, 0.0]))).all()  # no share, no block
