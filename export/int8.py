"""int8 frozen weights: what ``--weights int8`` quantises, and how.

The decoder layers' frozen linears become int8 weights with one scale per output
channel, read with int8 activations quantised per token at run time (torchao's
pattern, which XNNPACK's partitioner lowers to one quantised GEMM); the embedding
becomes int8 rows with one scale each (:class:`Int8RowEmbedding`). Norms, the head,
A and B stay fp32. Before quantising, SmoothQuant (``export.smoothing``) moves the
linears' activation outliers into their weights, measured on training prompts.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from export.lora import AdapterTensors
from export.quiet import import_torchao_quietly
from export.smoothing import input_ranges, scale_lora_a, smooth_

# What --weights int8 quantises, in the cache key of int8 programs only: change it when the
# recipe changes, so int8 programs are lowered again and fp32 ones stay cached.
INT8_RECIPE = "decoder-linears-qd8-per-channel+embedding-int8-rows+smoothquant"
BASE_WEIGHTS = ("fp32", "int8")


def base_weights_id(base_weights: str, smoothing: float, smoothing_examples: int) -> str:
    """fp32, or int8 with its recipe: an int8 recipe change makes new logits and new programs."""
    if base_weights != "int8":
        return base_weights
    return f"int8:{INT8_RECIPE}:alpha={smoothing:g}:prompts={smoothing_examples}"


class Int8RowEmbedding(torch.nn.Module):
    """An embedding table held as int8 rows with one fp32 scale per row.

    ExecuTorch's portable ``embedding`` kernel gathers int8 rows as readily as fp32
    ones, so the lookup stays one gather; the rows are widened and scaled after it,
    on [bs, T, H] values only. A quarter of the fp32 table's bytes (SmolLM2: 28 MB
    instead of 113 MB) on the device, in the shared weights file.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()  # [V, H]
        row_scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # [V, 1]
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight_int8", torch.round(weight / row_scale).clamp(-127, 127).to(torch.int8))  # [V, H]
        self.register_buffer("row_scale", row_scale)  # [V, 1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids, self.weight_int8).to(torch.float32)  # [..., H]
        return rows * torch.nn.functional.embedding(input_ids, self.row_scale)  # [..., H] * [..., 1]


def int8_base(model: torch.nn.Module, adapter: AdapterTensors, train, smoothing: float = 0.5,
              smoothing_examples: int = 128, note: Callable[[str], None] = lambda _m: None
              ) -> tuple[torch.nn.Module, AdapterTensors]:
    """The int8 copy of ``model`` an int8 program wraps, and the adapter it holds.

    With ``smoothing`` > 0, SmoothQuant scales measured on the first
    ``smoothing_examples`` training prompts are folded in before quantising; the
    smoothed linears then read x / s, so the program's A's become A diag(s) and x Aᵀ
    stays what it was. ``adapter`` (the A's the PEFT adapter gets) is left unchanged.
    The two halves are :func:`smoothing_ranges` (measured once, where the prompts
    are) and :func:`int8_model` (wherever the program is built).

    Args:
        model: the fp32 model (not changed).
        adapter: the adapter built on it.
        train: the tokenised training split (``shared.task_data.Split``).
        smoothing: SmoothQuant's alpha; 0 switches it off.
        smoothing_examples: training prompts the activation ranges are measured on.
        note: receives a line when smoothing is skipped for want of prompts.

    Returns:
        The int8 model and the program's adapter.
    """
    return int8_model(model, adapter, smoothing_ranges(model, train, smoothing, smoothing_examples, note), smoothing)


def smoothing_ranges(model: torch.nn.Module, train, smoothing: float = 0.5, smoothing_examples: int = 128,
                     note: Callable[[str], None] = lambda _m: None) -> dict | None:
    """The activation ranges SmoothQuant needs, from the first ``smoothing_examples`` training prompts.

    Returns:
        ``export.smoothing.input_ranges``' result, or None (no smoothing, or no prompts).
    """
    n = min(smoothing_examples, len(train.labels))
    if smoothing > 0 and n == 0:
        note("no training prompts to measure activation ranges on: int8 without smoothing")
    if smoothing <= 0 or n == 0:
        return None
    return input_ranges(model, train.input_ids[:n], train.lengths[:n])


def int8_model(model: torch.nn.Module, adapter: AdapterTensors, ranges: dict | None, smoothing: float
               ) -> tuple[torch.nn.Module, AdapterTensors]:
    """The int8 copy of ``model`` with ``ranges`` folded in (None: unsmoothed), and the program's adapter."""
    quantized, scales = quantize_base_weights(model, ranges, smoothing,
                                              trained=frozenset((s.layer, s.module) for s in adapter.layout))
    return quantized, scale_lora_a(adapter, scales)


def quantize_base_weights(model: torch.nn.Module, ranges: dict | None = None, alpha: float = 0.5,
                          trained: frozenset[tuple[int, str]] = frozenset()
                          ) -> tuple[torch.nn.Module, dict[tuple[int, str], torch.Tensor]]:
    """A copy of ``model`` whose frozen weights are int8: decoder linears and the embedding.

    Linears (torchao): per-output-channel symmetric int8 weights with dynamic per-token
    int8 activations, the pattern XNNPACK's partitioner takes as one quantised GEMM;
    with ``ranges``, SmoothQuant scales are folded in first (export.smoothing).
    The embedding: :class:`Int8RowEmbedding`. The head stays fp32: the verbalizer loss
    keeps only its answer words' rows (SmolLM2 ties it to the embedding; the fp32
    original stays as the head's weight, the copy's input embedding becomes int8).
    The copy keeps the caller's model (benchmarks reuse it) in fp32.

    Args:
        model: the fp32 model.
        ranges: activation ranges from ``export.smoothing.input_ranges``; None: no smoothing.
        alpha: SmoothQuant's migration strength.
        trained: (layer, module) pairs with a LoRA-FA adapter.

    Returns:
        The int8 copy, and the smoothing scales (empty without ``ranges``) that the
        program's A's must take (``export.smoothing.scale_lora_a``).
    """
    quantized = copy.deepcopy(model)
    scales = smooth_(quantized, ranges, alpha, trained) if ranges is not None and alpha > 0 else {}
    quantize_linears_int8(quantized, lambda fqn: ".layers." in f".{fqn}")
    quantized.model.embed_tokens = Int8RowEmbedding(quantized.model.embed_tokens.weight)
    return quantized, scales


def quantize_linears_int8(module: torch.nn.Module, include: Callable[[str], bool] = lambda fqn: True) -> None:
    """Make ``module``'s linears (those whose name ``include`` accepts) int8, in place.

    Per-output-channel symmetric int8 weights with dynamic per-token int8 activations
    (torchao), the pattern XNNPACK's partitioner lowers to one quantised GEMM.
    """
    import_torchao_quietly()
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda child, fqn: isinstance(child, torch.nn.Linear) and include(fqn))
