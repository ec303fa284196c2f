"""shared.probe: a probe's method times laid out per layer, each layer its chains' slope."""
from __future__ import annotations

from dataclasses import replace

import pytest

from shared.errors import InputError
from shared.probe import (MIN_SLOPE_SHARE, ProbeManifest, call_cost_s, layer_cost_s, layer_times,
                          split_method)

MS = 1e-3


def _probe(length_buckets: tuple[int, ...] = ()) -> ProbeManifest:
    # a 6-layer model training layers 3-4: layers 0-2 frozen below, 5 the last
    return ProbeManifest(model_id="m", model_fingerprint="f" * 64, base_weights="fp32", num_layers=6, hidden_size=8,
                         job_layers=(3, 4), target_modules=("q_proj",), rank=2, q=2, batch_size=2, seq_len=64,
                         layer_b_size=16, b_size=32, classes=2, methods=(), length_buckets=length_buckets)


# Each bs chain costs 3 ms a layer plus 4 ms a call (a single call is off that line, as measured:
# 5 ms, not 7); a widened layer 100 ms plus 6 ms a call.
TIMES = {"layer_bs": 5 * MS, "layer_bs_x2": 10 * MS, "layer_bs_x4": 16 * MS,
         "frozen_bs": 5 * MS, "frozen_bs_x4": 15 * MS, "frozen_bs_x8": 27 * MS,
         "layer_wide": 106 * MS, "layer_wide_x2": 206 * MS, "last_wide": 18 * MS, "head": 2 * MS}


def test_method_names_split_into_the_layer_its_chain_and_its_length() -> None:
    assert split_method("layer_bs_x4_t32") == ("layer_bs", 4, 32)
    assert split_method("frozen_bs_x8") == ("frozen_bs", 8, None)
    assert split_method("frozen_bs_x2") == ("frozen_bs_x2", 1, None)  # not one of its chains
    assert split_method("layer_wide_t16") == ("layer_wide", 1, 16)
    assert split_method("last_wide") == ("last_wide", 1, None)
    # not a layer method, or a chain the probe never has: the name whole
    assert split_method("head") == ("head", 1, None)
    assert split_method("layer_bs_x3") == ("layer_bs_x3", 1, None)
    assert split_method("last_wide_x2") == ("last_wide_x2", 1, None)


def test_a_layer_costs_its_chains_slope_and_the_call_keeps_the_rest() -> None:
    assert layer_cost_s(TIMES, "layer_bs") == pytest.approx(3 * MS)      # (16 - 10) / (4 - 2)
    assert layer_cost_s(TIMES, "frozen_bs") == pytest.approx(3 * MS)     # (27 - 15) / (8 - 4)
    assert layer_cost_s(TIMES, "layer_wide") == pytest.approx(100 * MS)  # 206 - 106
    assert call_cost_s(TIMES, "layer_bs") == pytest.approx(4 * MS)       # 10 - 2 x 3
    assert call_cost_s(TIMES, "layer_wide") == pytest.approx(6 * MS)
    # the last layer has no chains: its own time, and no call cost of its own
    assert layer_cost_s(TIMES, "last_wide") == 18 * MS and call_cost_s(TIMES, "last_wide") == 0.0
    # a probe without a method's chains (an older one) takes its single call's time
    no_chains = {k: v for k, v in TIMES.items() if "_x" not in k}
    assert layer_cost_s(no_chains, "layer_bs") == 5 * MS and call_cost_s(no_chains, "layer_bs") == 0.0


def test_noise_never_makes_a_layer_free_nor_dearer_than_its_long_chain() -> None:
    # the long chain no dearer than the short one: clipped to a share of the long chain's mean
    flat = {**TIMES, "layer_bs_x4": 10 * MS}
    assert layer_cost_s(flat, "layer_bs") == pytest.approx(MIN_SLOPE_SHARE * 10 * MS / 4)
    # a slope above the long chain's mean would mean a negative call cost: clipped to the mean
    steep = {**TIMES, "layer_bs_x2": 2 * MS, "layer_bs_x4": 16 * MS}
    assert layer_cost_s(steep, "layer_bs") == pytest.approx(4 * MS)
    assert call_cost_s(steep, "layer_bs") == 0.0


def test_every_layer_is_its_slope_and_each_of_a_programs_calls_is_paid_once() -> None:
    bs, wide = layer_times(_probe(), TIMES)
    # layer 0 carries the call below the block: frozen_bs's call, 15 - 4 x 3 = 3 ms
    assert bs == pytest.approx([6 * MS] + [3 * MS] * 4 + [3 * MS])
    # the last layer's own call whole: it stands for the call the widened layers share with it
    assert wide == pytest.approx([100 * MS] * 5 + [18 * MS])
    # a job that starts at layer 0 has no frozen layer below it: layer_bs's call (10 - 2 x 3 = 4 ms)
    from_zero = ProbeManifest(**{**_probe().__dict__, "job_layers": (0, 1, 2, 3, 4)})
    assert layer_times(from_zero, TIMES)[0][0] == pytest.approx(7 * MS)
    # a one-layer model: its layer is the last, and no block has a call below it
    one = ProbeManifest(**{**_probe().__dict__, "num_layers": 1, "job_layers": (0,)})
    assert layer_times(one, TIMES) == (pytest.approx((3 * MS,)), pytest.approx((18 * MS,)))
    # at a shorter bucket (single calls only): the full length's costs scaled by the single calls' ratio
    short = {f"{k}_t32": TIMES[k] / 2 for k in ("layer_bs", "layer_wide", "frozen_bs", "last_wide")}
    bs32, wide32 = layer_times(_probe((32,)), {**TIMES, **short}, seq_len=32)
    assert bs32[3] == pytest.approx(1.5 * MS) and wide32[3] == pytest.approx(50 * MS)
    assert call_cost_s({**TIMES, **short}, "frozen_bs", 32) == pytest.approx(1.5 * MS)
    assert bs32[0] == pytest.approx(1.5 * MS + 1.5 * MS)
    assert wide32[-1] == pytest.approx(9 * MS)


def test_a_missing_method_is_named() -> None:
    with pytest.raises(InputError, match=r"no time for method 'frozen_bs'"):
        layer_times(_probe(), {k: v for k, v in TIMES.items() if not k.startswith("frozen_bs")})
    # one chain without the other, a wide call's cost without its single call, a bucket without its methods
    with pytest.raises(InputError, match=r"no time for method 'layer_bs_x2'"):
        layer_times(_probe(), {k: v for k, v in TIMES.items() if k != "layer_bs_x2"})
    with pytest.raises(InputError, match=r"no time for method 'layer_wide'"):
        layer_times(_probe(), {k: v for k, v in TIMES.items() if k != "layer_wide"})
    with pytest.raises(InputError, match=r"no time for method 'last_wide_t32'"):
        layer_times(_probe((32,)), TIMES, seq_len=32)


def test_a_manifest_names_only_methods_a_probe_has() -> None:
    probe = _probe((32,))
    good = ("layer_bs", "layer_bs_x2", "layer_bs_x4", "frozen_bs_x8", "layer_wide_t32", "last_wide_t32", "head")
    assert ProbeManifest.from_json(replace(probe, methods=good).to_json()).methods == good
    # a chain at a length bucket, a chain of one, a chain length it has not, a bucket it has not
    for name in ("layer_bs_x4_t32", "layer_wide_x1", "layer_bs_x8", "layer_bs_t16", "layer_bs_t32x"):
        with pytest.raises(InputError, match=rf"unknown probe methods \['{name}'\]"):
            ProbeManifest.from_json(replace(probe, methods=("layer_bs", name)).to_json(), source="p.json")
