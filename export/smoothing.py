"""Smoothing a Llama decoder's activations before int8 quantisation (SmoothQuant).

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models" (ICML 2023).  An int8 program quantises each linear's input
per token at run time, with one scale per token set by its largest value.  In
SmolLM2 a few input channels of every linear run 4-8x larger than the median
channel (layer 25: q/k/v input 8.1x, down_proj input 7.7x), so the other channels
of every token get a coarse grid.  For P-RGE that grid is the whole problem: the
+eps and -eps copies differ by a small shift of the activations, and their
rounding differences are what ``L+ - L-`` measures unless eps is large
(docs/accuracy_experiments.md, session 6).

A linear ``y = x Wᵀ`` is unchanged when its input channels are divided by ``s`` and
its weight's columns multiplied by it:  ``y = (x / s) (W diag(s))ᵀ``.  The weights
are quantised per output channel and tolerate the larger columns; the activations
lose their outliers.  Per input channel j, with ``a_j = max |x_j|`` over
calibration prompts and ``w_j = max |W_{:,j}|`` over the linears that read x,

    s_j = a_j^alpha / w_j^(1 - alpha)

The division by ``s`` is folded into whatever produces x, so the graph gains no op:

* ``input_layernorm`` -> q, k, v and ``post_attention_layernorm`` -> gate, up:
  the norm's weight becomes ``γ / s`` (RMSNorm is ``γ ⊙ n(h)``);
* ``up_proj`` -> ``down_proj``: down's input is ``silu(gate) ⊙ up``, linear in up's
  output, so up's output rows are divided by ``s``;
* ``o_proj``'s input (the attention output) is left alone: its producer is v_proj
  through heads that share kv heads.

LoRA-FA reads the same x as the linear it adapts: a target's frozen ``A`` takes the
same ``s`` on its columns (``A' = A diag(s)``, so ``x' A'ᵀ = x Aᵀ``) inside the
program, while the adapter written for PEFT keeps the original A over the original
model.  Where smoothing up -> down would also scale a trained up_proj's output (its
B), that pair is left alone.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from export.lora import AdapterTensors

# (group, the norm or linear whose output is divided by s, the linears that read it)
GROUPS = (
    ("attn", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", "mlp.up_proj", ("mlp.down_proj",)),
)
GROUP_OF_MODULE = {path.split(".")[-1]: group for group, _, readers in GROUPS for path in readers}


def input_ranges(model: nn.Module, input_ids: np.ndarray, lengths: np.ndarray,
                 batch_size: int = 16) -> dict[tuple[int, str], torch.Tensor]:
    """Per input channel, the largest |x| each smoothing group's linears read, over real tokens.

    Runs the wrapped model's own forward with temporary pre-hooks on the first reader
    of each group (the hooks are removed before returning; the model is not changed).

    Args:
        model: a Llama-family causal LM (fp32).
        input_ids: [n, T] right-padded prompts (training prompts: never validation or test).
        lengths: [n] real tokens per prompt; padding is left out of the ranges.
        batch_size: prompts per forward.

    Returns:
        (layer, group) -> [in] max |x| per input channel.
    """
    ranges: dict[tuple[int, str], torch.Tensor] = {}
    real = torch.zeros(0, dtype=torch.bool)  # [rows, T] of the batch being run; set below

    def hook_for(key: tuple[int, str]) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()[real].abs()  # [real tokens, in]
            peak = x.amax(dim=0)
            ranges[key] = torch.maximum(ranges[key], peak) if key in ranges else peak
        return hook

    hooks = [layer.get_submodule(readers[0]).register_forward_pre_hook(hook_for((index, group)))
             for index, layer in enumerate(model.model.layers) for group, _, readers in GROUPS]
    try:
        with torch.no_grad():
            for start in range(0, len(lengths), batch_size):
                ids = torch.as_tensor(input_ids[start:start + batch_size])  # [rows, T]
                real = torch.arange(ids.shape[1]).unsqueeze(0) < torch.as_tensor(lengths[start:start + batch_size]).unsqueeze(1)
                model(input_ids=ids, attention_mask=real.long())
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def smooth_(model: nn.Module, ranges: dict[tuple[int, str], torch.Tensor], alpha: float = 0.5,
            trained: frozenset[tuple[int, str]] = frozenset()) -> dict[tuple[int, str], torch.Tensor]:
    """Fold smoothing scales into ``model`` in place (call it on a copy).

    Args:
        model: a Llama-family causal LM, fp32.
        ranges: from :func:`input_ranges`.
        alpha: how much of the activations' range moves into the weights (0: none, 1: all).
        trained: (layer, module) pairs with a LoRA-FA adapter; a ``down`` group whose
            ``up_proj`` is trained is left alone (smoothing would rescale its B).

    Returns:
        (layer, group) -> [in] the scales ``s`` applied; a target's A in the program
        must be multiplied by its group's ``s`` (:func:`scale_lora_a`).
    """
    scales: dict[tuple[int, str], torch.Tensor] = {}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for group, producer_path, readers in GROUPS:
                if group == "down" and (index, "up_proj") in trained:
                    continue
                linears = [layer.get_submodule(path) for path in readers]
                weight_peak = torch.cat([linear.weight.abs() for linear in linears]).amax(dim=0)  # [in]
                a = ranges[(index, group)].clamp_min(1e-5)
                s = (a ** alpha / weight_peak.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)  # [in]
                producer = layer.get_submodule(producer_path)
                if group == "down":
                    producer.weight.div_(s.unsqueeze(1))  # up_proj's output rows: [I, H] / [I, 1]
                else:
                    producer.weight.div_(s)  # the norm's γ: [H]
                for linear in linears:
                    linear.weight.mul_(s)  # columns: [out, in] * [in]
                scales[(index, group)] = s
    return scales


def scale_lora_a(adapter: AdapterTensors, scales: dict[tuple[int, str], torch.Tensor]) -> AdapterTensors:
    """The adapter a smoothed program must hold: ``A diag(s)`` for targets whose input was smoothed.

    Args:
        adapter: the adapter built on the unsmoothed model (left unchanged: its A's are
            what the PEFT adapter gets).
        scales: from :func:`smooth_`.

    Returns:
        A copy of ``adapter`` with the scaled A's.
    """
    a_by_path = dict(adapter.a_by_path)
    for slot in adapter.layout:
        s = scales.get((slot.layer, GROUP_OF_MODULE.get(slot.module, "")))
        if s is not None:
            a_by_path[slot.path] = adapter.a_by_path[slot.path] * s.unsqueeze(0)  # [r, in] * [1, in]
    return replace(adapter, a_by_path=a_by_path)
