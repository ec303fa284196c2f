"""shared.probe: a probe's method times laid out per layer, less each call's own cost."""
from __future__ import annotations

import pytest

from shared.probe import MAX_OVERHEAD_SHARE, ProbeManifest, call_overhead_s, layer_times

MS = 1e-3


def _probe(length_buckets: tuple[int, ...] = ()) -> ProbeManifest:
    # a 6-layer model training layers 3-4: layers 0-2 frozen below, 5 the last
    return ProbeManifest(model_id="m", model_fingerprint="f" * 64, base_weights="fp32", num_layers=6, hidden_size=8,
                         job_layers=(3, 4), target_modules=("q_proj",), rank=2, q=2, batch_size=2, seq_len=64,
                         layer_b_size=16, b_size=32, classes=2, methods=(), length_buckets=length_buckets)


TIMES = {"layer_bs": 20 * MS, "layer_bs_pair": 36 * MS, "layer_wide": 100 * MS, "frozen_bs": 19 * MS,
         "last_wide": 18 * MS, "head": 2 * MS}


def test_a_call_s_own_cost_is_two_single_calls_less_the_pair() -> None:
    assert call_overhead_s(TIMES) == pytest.approx(4 * MS)  # 2 x 20 - 36
    # a probe without the pair (or at a length it has no pair for) takes nothing off
    assert call_overhead_s({k: v for k, v in TIMES.items() if k != "layer_bs_pair"}) == 0.0
    assert call_overhead_s(TIMES, seq_len=32) == 0.0


def test_noise_never_makes_the_overhead_negative_or_a_layer_free() -> None:
    assert call_overhead_s({**TIMES, "layer_bs_pair": 45 * MS}) == 0.0  # the pair dearer than two calls
    # a pair "free" of any cost: clipped to a share of the quickest layer method (last_wide, 18 ms)
    assert call_overhead_s({**TIMES, "layer_bs_pair": 1 * MS}) == pytest.approx(MAX_OVERHEAD_SHARE * 18 * MS)


def test_every_layer_time_is_less_one_call_s_cost_and_the_head_keeps_it() -> None:
    bs, wide = layer_times(_probe(), TIMES)
    overhead = 4 * MS
    assert bs == pytest.approx([19 * MS - overhead] * 3 + [20 * MS - overhead] * 2 + [18 * MS - overhead])
    assert wide == pytest.approx([100 * MS - overhead] * 5 + [18 * MS - overhead])
    # at a shorter bucket, that bucket's own pair
    short = {f"{k}_t32": v / 2 for k, v in TIMES.items() if k != "head"}
    short["layer_bs_pair_t32"] = 17 * MS  # 2 x 10 - 17 = 3 ms
    bs32, _ = layer_times(_probe((32,)), {**TIMES, **short}, seq_len=32)
    assert bs32[3] == pytest.approx(10 * MS - 3 * MS)
