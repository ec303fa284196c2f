from __future__ import annotations

import numpy as np
import pytest

from shared.blocks import (BlockSpan, block_span, check_cover, check_global_b, check_layout, merge_b, spans_for,
                           split_b, whole_span)
from shared.errors import InputError
from shared.manifest import BSlot


def _layout(layers=(2, 3, 4, 5), modules=(("q_proj", 6), ("v_proj", 2)), rank=2) -> list[BSlot]:
    slots, offset = [], 0
    for layer in layers:
        for module, out in modules:
            slots.append(BSlot(layer=layer, module=module, path=f"model.layers.{layer}.x.{module}",
                               shape=(out, rank), offset=offset))
            offset += out * rank
    return slots


def test_block_span_is_the_contiguous_slice_of_its_layers() -> None:
    layout = _layout()  # 16 entries per layer
    span = block_span(layout, 3, 4)
    assert (span.offset, span.size, span.stop) == (16, 32, 48)
    assert span.name == "L3-4"
    assert whole_span(layout) == BlockSpan(2, 5, 0, 64)


def test_split_then_merge_is_the_identity_and_touches_only_updated_blocks() -> None:
    layout = _layout()
    spans = spans_for(layout, [(4, 5), (2, 2), (3, 3)])
    assert [s.first_layer for s in spans] == [2, 3, 4]  # shallowest first
    b = np.arange(64, dtype=np.float32)
    parts = split_b(b, layout, spans)
    assert np.array_equal(np.concatenate(parts), b)
    merged = merge_b(b, layout, {spans[1]: np.full(16, -1.0, dtype=np.float32)})
    assert np.array_equal(merged[16:32], np.full(16, -1.0))
    assert np.array_equal(np.delete(merged, np.s_[16:32]), np.delete(b, np.s_[16:32]))
    assert np.array_equal(b, np.arange(64))  # the base is not modified


def test_a_plan_must_cover_every_layer_exactly_once() -> None:
    layout = _layout()
    with pytest.raises(InputError, match="overlap at layer 3"):
        spans_for(layout, [(2, 3), (3, 5)])
    with pytest.raises(InputError, match="no block holds trainable layers 5"):
        spans_for(layout, [(2, 3), (4, 4)])
    with pytest.raises(InputError, match="layer 7 is not a trainable layer"):
        spans_for(layout, [(2, 7)])
    with pytest.raises(InputError, match="do not match the layout"):
        check_cover(layout, [BlockSpan(2, 5, 0, 63)])


def test_wrong_sizes_are_named() -> None:
    layout = _layout()
    with pytest.raises(InputError, match=r"needs \[64\]"):
        check_global_b(np.zeros(63), layout)
    span = block_span(layout, 2, 2)
    with pytest.raises(InputError, match=r"block L2: update has shape \(15,\)"):
        merge_b(np.zeros(64), layout, {span: np.zeros(15)})
    with pytest.raises(InputError, match="non-finite"):
        merge_b(np.zeros(64), layout, {span: np.full(16, np.nan)})


def test_a_layout_with_a_gap_is_refused() -> None:
    layout = _layout()
    broken = [*layout[:3], BSlot(**{**layout[3].__dict__, "offset": layout[3].offset + 1})]
    with pytest.raises(InputError, match="starts at"):
        check_layout(broken)
    check_layout(layout)


def test_span_round_trips_through_a_dict() -> None:
    span = BlockSpan(3, 4, 16, 32)
    assert BlockSpan.from_dict(span.to_dict()) == span
    with pytest.raises(InputError, match="lacks field 'size'"):
        BlockSpan.from_dict({"first_layer": 3, "last_layer": 4, "offset": 16})


def test_a_manifest_without_a_block_trains_every_layer_and_a_wrong_block_is_refused() -> None:
    from dataclasses import replace

    from shared.blocks import program_block
    from shared.manifest import Manifest

    layout = _layout()
    manifest = Manifest(model_id="m", task="t", num_layers=6, trainable_layers=[2, 3, 4, 5],
                        target_modules=["q_proj", "v_proj"], rank=2, alpha=4.0, q=2, batch_size=2,
                        eval_batch_size=4, seq_len=8, labels=["a", "b"], verbalizer_token_ids=[1, 2],
                        class_bias=[0.0, 0.0], loss="verbalizer", prefix_sharing=True, b_size=64,
                        b_layout=layout, methods=["step"], step_buckets={"8": "step"}, lr=0.1, eps=0.01)
    assert program_block(manifest) == BlockSpan(2, 5, 0, 64)
    assert program_block(replace(manifest, block=BlockSpan(4, 5, 32, 32).to_dict())) == BlockSpan(4, 5, 32, 32)
    with pytest.raises(InputError, match="do not match"):
        program_block(replace(manifest, block=BlockSpan(4, 5, 30, 32).to_dict()))
    assert Manifest.from_json(replace(manifest, block=BlockSpan(4, 5, 32, 32).to_dict()).to_json()).block \
        == {"first_layer": 4, "last_layer": 5, "offset": 32, "size": 32}
