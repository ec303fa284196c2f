"""Cost model: prefix-shared step time, memory, communication; monotone in depth."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from shared.costmodel import block_costs, latency, memory_need, step_times
import pytest

from shared.errors import InputError
from shared.planner import PlannerConfig, plan
from shared.profiles import Block, DeviceProfile, Fleet, Job, LengthTimes, check_device, check_job


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


def test_a_step_mix_weights_each_length_s_layer_times() -> None:
    # prepare: 4 layers at T=64, and at T=32 about half as slow; 70 % of the steps at 32
    dev = DeviceProfile("d", (1, 2, 3, 4), (10, 20, 30, 40), 0.5, 1e9, 1e3,
                        at_lengths=(LengthTimes(32, (0.5, 1, 1.5, 2), (4, 8, 12, 16)),))
    job = _job(seq_len=64, step_mix=((32, 0.7), (64, 0.3)))
    # execute
    mixed = step_times(Fleet("f", (dev,)), job)[0]
    # assert: by hand, t(d) = Σ_{l<d} (0.7·bs32 + 0.3·bs64) + Σ_{l≥d} (0.7·wide32 + 0.3·wide64) + head
    bs = [0.7 * a + 0.3 * b for a, b in zip((0.5, 1, 1.5, 2), (1, 2, 3, 4))]  # [0.65, 1.3, 1.95, 2.6]
    wide = [0.7 * a + 0.3 * b for a, b in zip((4, 8, 12, 16), (10, 20, 30, 40))]  # [5.8, 11.6, 17.4, 23.2]
    by_hand = [sum(bs[:d]) + sum(wide[d:]) + 0.5 for d in range(5)]
    assert np.allclose(mixed, by_hand, rtol=0, atol=1e-12)
    assert np.allclose(mixed, [58.5, 53.35, 43.05, 27.6, 7.0])
    # every step at 64 (no mix, or a mix all at 64) is the full-length model; all at 32 is the T=32 one
    assert step_times(Fleet("f", (dev,)), _job()).tolist() == [[100.5, 91.5, 73.5, 46.5, 10.5]]
    assert np.allclose(step_times(Fleet("f", (dev,)), _job(seq_len=64, step_mix=((64, 1.0),)))[0],
                       [100.5, 91.5, 73.5, 46.5, 10.5])
    assert np.allclose(step_times(Fleet("f", (dev,)), _job(seq_len=64, step_mix=((32, 1.0), (64, 0.0))))[0],
                       [40.5, 37, 30, 19.5, 5.5])


def test_a_device_without_times_at_a_length_falls_back_to_full_length_and_the_plan_says_so() -> None:
    # prepare: two devices, only one timed at T=32; a mix half at 32
    timed = DeviceProfile("timed", (1,), (2,), 0.0, 1e9, 1e3, at_lengths=(LengthTimes(32, (0.5,), (1,)),))
    full_only = DeviceProfile("full", (1,), (2,), 0.0, 1e9, 1e3)
    job = _job(seq_len=64, step_mix=((32, 0.5), (64, 0.5)))
    # execute
    steps = step_times(Fleet("f", (timed, full_only)), job)
    result = plan(Fleet("f", (timed, full_only)), job, PlannerConfig(baselines=False))
    # assert: the untimed device costs its full-length times; its plan row says why
    assert steps[0, 0] == 4 * (0.5 * 1 + 0.5 * 2) and steps[1, 0] == 4 * 2
    sources = {row.device: row.profile for row in result.devices}
    assert sources == {"timed": "estimated", "full": "estimated, at T=64 only (no times at T=32)"}


def test_bad_mixes_and_length_times_are_refused_by_name() -> None:
    with pytest.raises(InputError, match="shares sum to 0.9"):
        check_job(_job(seq_len=64, step_mix=((32, 0.6), (64, 0.3))))
    with pytest.raises(InputError, match="needs the job's full length 'seq_len'"):
        check_job(_job(step_mix=((32, 1.0),)))
    with pytest.raises(InputError, match="must be distinct integers in 1..64"):
        check_job(_job(seq_len=64, step_mix=((128, 1.0),)))
    slow_wide = DeviceProfile("d", (1,), (2,), 0.0, 1e9, 1e3, at_lengths=(LengthTimes(32, (3,), (2,)),))
    with pytest.raises(InputError, match=r"at_lengths\[0\] \(T=32\): layer_s_wide\[0\] = 2 is below"):
        check_device(slow_wide)


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
