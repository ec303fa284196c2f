"""Blocks of one adapter: split the global ``b`` by layout, and merge the blocks back.

A *job* trains one LoRA-FA adapter whose trainable state is the flat vector ``b``
laid out by a list of :class:`shared.manifest.BSlot` (layer-major, then module
order; ``export.lora.b_layout``). A *block* is a contiguous range of the job's
trainable layers; because the layout is layer-major, a block's B tensors are one
contiguous slice ``b[offset:offset + size]`` of the global vector.

Devices train disjoint blocks at the same time (block-coordinate zeroth-order
descent): each receives the whole global ``b`` (the layers outside its block
still carry the other devices' LoRA terms), perturbs and updates only its own
slice, and returns that slice. The coordinator writes each returned slice into
the global vector. Nothing here knows about programs, sockets or devices: the
trainer, the engine and the adapter writer all call these functions.

Everything is pure: a layout and arrays in, arrays out; bad input is an
``InputError`` naming the block and the layers at fault.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from shared.errors import InputError
from shared.manifest import BSlot, Manifest


@dataclass(frozen=True)
class BlockSpan:
    """One block of a layout: its layers and where its B's sit in the global ``b``."""

    first_layer: int  # shallowest layer of the block (its depth)
    last_layer: int  # deepest layer, inclusive
    offset: int  # start of the block's slice in the global b
    size: int  # number of b entries the block holds

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def name(self) -> str:
        """A stable, readable name: ``L22-25`` (or ``L29`` for a single layer)."""
        if self.first_layer == self.last_layer:
            return f"L{self.first_layer}"
        return f"L{self.first_layer}-{self.last_layer}"

    def to_dict(self) -> dict[str, int]:
        return {"first_layer": self.first_layer, "last_layer": self.last_layer,
                "offset": self.offset, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], where: str = "block") -> "BlockSpan":
        try:
            values = {key: data[key] for key in ("first_layer", "last_layer", "offset", "size")}
        except KeyError as exc:
            raise InputError(f"{where}: lacks field {exc}") from None
        for key, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{where}: field {key!r} must be an integer >= 0, got {value!r}")
        return cls(**values)  # type: ignore[arg-type]


def layout_layers(layout: Sequence[BSlot]) -> list[int]:
    """The trainable layers of a layout, ascending, each once."""
    return sorted({slot.layer for slot in layout})


def layout_size(layout: Sequence[BSlot]) -> int:
    """P, the length of the global ``b``."""
    return sum(slot.size for slot in layout)


def check_layout(layout: Sequence[BSlot]) -> None:
    """A layout must tile ``b`` from 0 without gaps, layer-major (non-decreasing layers).

    Raises:
        InputError: naming the first slot out of place.
    """
    offset, last_layer = 0, -1
    for i, slot in enumerate(layout):
        if slot.offset != offset:
            raise InputError(f"layout slot {i} ({slot.path}) starts at {slot.offset}, expected {offset}")
        if slot.layer < last_layer:
            raise InputError(f"layout slot {i} ({slot.path}) is layer {slot.layer} after layer {last_layer}: "
                             f"a layout is layer-major")
        offset, last_layer = offset + slot.size, slot.layer


def block_span(layout: Sequence[BSlot], first_layer: int, last_layer: int) -> BlockSpan:
    """The block of ``layout`` that holds the trainable layers ``first_layer..last_layer``.

    Raises:
        InputError: the range is empty, or an end is not a trainable layer of the layout.
    """
    layers = layout_layers(layout)
    if first_layer > last_layer:
        raise InputError(f"block {first_layer}-{last_layer}: the first layer is after the last")
    for end in (first_layer, last_layer):
        if end not in layers:
            raise InputError(f"block {first_layer}-{last_layer}: layer {end} is not a trainable layer of "
                             f"this job (trainable: {_ranges(layers)})")
    slots = [slot for slot in layout if first_layer <= slot.layer <= last_layer]
    offset = slots[0].offset
    size = sum(slot.size for slot in slots)
    if slots[-1].offset + slots[-1].size - offset != size:
        raise InputError(f"block {first_layer}-{last_layer}: its slots are not contiguous in the layout")
    return BlockSpan(first_layer=first_layer, last_layer=last_layer, offset=offset, size=size)


def whole_span(layout: Sequence[BSlot]) -> BlockSpan:
    """One block holding every trainable layer (what a single device trains)."""
    layers = layout_layers(layout)
    if not layers:
        raise InputError("the layout has no trainable layer")
    return block_span(layout, layers[0], layers[-1])


def spans_for(layout: Sequence[BSlot], ranges: Iterable[tuple[int, int]]) -> list[BlockSpan]:
    """Blocks for ``(first_layer, last_layer)`` ranges, checked to cover the layout exactly once.

    Raises:
        InputError: a range outside the layout, two that overlap, or layers no block holds.
    """
    spans = sorted((block_span(layout, first, last) for first, last in ranges), key=lambda s: s.first_layer)
    check_cover(layout, spans)
    return spans


def check_cover(layout: Sequence[BSlot], spans: Sequence[BlockSpan]) -> None:
    """Every trainable layer of ``layout`` in exactly one of ``spans``.

    Raises:
        InputError: naming the overlapping blocks or the layers left out.
    """
    owner: dict[int, BlockSpan] = {}
    for span in spans:
        expected = block_span(layout, span.first_layer, span.last_layer)
        if expected != span:
            raise InputError(f"block {span.name}: offset {span.offset} and size {span.size} do not match the "
                             f"layout (expected {expected.offset} and {expected.size})")
        for layer in layout_layers(layout):
            if span.first_layer <= layer <= span.last_layer:
                if layer in owner:
                    raise InputError(f"blocks {owner[layer].name} and {span.name} overlap at layer {layer}")
                owner[layer] = span
    missing = [layer for layer in layout_layers(layout) if layer not in owner]
    if missing:
        raise InputError(f"no block holds trainable layers {_ranges(missing)}")


def check_global_b(b: np.ndarray, layout: Sequence[BSlot], what: str = "b") -> np.ndarray:
    """``b`` as a float32 [P] array, or an error saying what size the layout needs.

    Raises:
        InputError: the wrong rank, size or a non-finite entry.
    """
    array = np.asarray(b)
    expected = layout_size(layout)
    if array.ndim != 1 or array.shape[0] != expected:
        raise InputError(f"{what}: shape {tuple(array.shape)}, this job's adapter needs [{expected}]")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: holds non-finite values")
    return array


def split_b(b: np.ndarray, layout: Sequence[BSlot], spans: Sequence[BlockSpan]) -> list[np.ndarray]:
    """Each block's slice of the global ``b`` (copies), in the order of ``spans``."""
    b = check_global_b(b, layout)
    return [b[span.offset:span.stop].copy() for span in spans]


def merge_b(base: np.ndarray, layout: Sequence[BSlot], updates: Mapping[BlockSpan, np.ndarray]) -> np.ndarray:
    """A new global ``b``: ``base`` with each block's slice replaced by its update.

    Blocks not in ``updates`` keep ``base``'s values (a device that missed a round
    leaves its block where the last merge put it).

    Args:
        base: [P] the global b the round started from.
        layout: the job's layout.
        updates: block -> its new slice [size].

    Raises:
        InputError: overlapping blocks, or an update of the wrong size.
    """
    merged = check_global_b(base, layout, "base b").copy()
    owner: dict[int, BlockSpan] = {}
    for span, values in updates.items():
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (span.size,):
            raise InputError(f"block {span.name}: update has shape {tuple(values.shape)}, the block holds [{span.size}]")
        if not np.all(np.isfinite(values)):
            raise InputError(f"block {span.name}: update holds non-finite values")
        for layer in range(span.first_layer, span.last_layer + 1):
            if layer in owner:
                raise InputError(f"blocks {owner[layer].name} and {span.name} overlap at layer {layer}")
            owner[layer] = span
        merged[span.offset:span.stop] = values
    return merged


def program_block(manifest: Manifest) -> BlockSpan:
    """The block a program trains: its manifest's ``block``, or every trainable layer."""
    if manifest.block is None:
        return whole_span(manifest.b_layout)
    span = BlockSpan.from_dict(manifest.block, where="manifest block")
    expected = block_span(manifest.b_layout, span.first_layer, span.last_layer)
    if expected != span:
        raise InputError(f"manifest block {span.name}: offset {span.offset} and size {span.size} do not match "
                         f"the manifest's layout (expected {expected.offset} and {expected.size})")
    return span


def _ranges(layers: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts: list[str] = []
    start = prev = None
    for layer in layers:
        if start is None:
            start = prev = layer
        elif layer == prev + 1:
            prev = layer
        else:
            parts.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = layer
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ", ".join(parts) or "none"
