"""Serve a trained adapter with plain transformers + peft, its class bias included.

`deftly train` writes a standard PEFT LoRA adapter, which
``PeftModel.from_pretrained(base, adapter_dir)`` loads on the fp32 base model.
But the classifier deftly trained is

    predicted class = argmax_c ( logits[answer position, verbalizer_token_ids[c]] + class_bias[c] )

and PEFT cannot hold ``class_bias``; it travels beside the adapter in
``deftly_calibration.json`` (``shared.calibration``). A user who loads the adapter
with PEFT alone gets the predictions without the bias, which are not the ones
training optimised. This module applies the bias and measures accuracy both ways,
so a figure quoted for an adapter can say which one it is.

The answer position of a right-padded prompt is its last real token,
``lengths[i] - 1``: causal attention keeps that position from seeing the padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.calibration import Calibration, read_calibration
from shared.errors import InputError
from shared.task_data import Split


@dataclass
class ServedAdapter:
    """A base model with the adapter applied (PEFT), and the calibration it ships with."""

    model: Any  # peft.PeftModel, in eval mode
    calibration: Calibration


@dataclass(frozen=True)
class ServedAccuracy:
    """Accuracy of a served adapter on a split, with and without its class bias."""

    with_bias: float  # argmax(verbalizer logits + class_bias): what deftly trained and reports
    without_bias: float  # argmax(verbalizer logits): what PEFT alone gives
    examples: int


def load_adapter(base_model: torch.nn.Module, adapter_dir: Path) -> ServedAdapter:
    """Apply the PEFT adapter in ``adapter_dir`` to ``base_model`` and read its calibration.

    Args:
        base_model: the fp32 base model the adapter was trained for (it is wrapped,
            and PEFT injects the LoRA layers into it: pass a copy to keep it clean).
        adapter_dir: a directory written by `deftly train` (``<out>/adapter``).

    Raises:
        InputError: the calibration side-car is missing or malformed, or PEFT cannot
            read the adapter.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    calibration = read_calibration(adapter_dir)  # first: a clear error before PEFT loads anything
    try:
        model = PeftModel.from_pretrained(base_model, adapter_dir)
    except (OSError, ValueError) as exc:
        raise InputError(f"{adapter_dir}: PEFT cannot load the adapter ({exc})") from None
    vocab = model.get_input_embeddings().num_embeddings
    if max(calibration.verbalizer_token_ids) >= vocab or min(calibration.verbalizer_token_ids) < 0:
        raise InputError(f"{adapter_dir}: verbalizer_token_ids {calibration.verbalizer_token_ids} do not fit "
                         f"the base model's vocabulary of {vocab}: is this the model the adapter was trained for?")
    return ServedAdapter(model=model.eval(), calibration=calibration)


def verbalizer_logits(served: ServedAdapter, input_ids: np.ndarray, lengths: np.ndarray,
                      batch_size: int = 16) -> np.ndarray:
    """The answer words' logits at each prompt's answer position, without the class bias.

    Args:
        served: the adapter applied to its base model.
        input_ids: [n, T] int64, right-padded prompts.
        lengths: [n] int64, real tokens per prompt (at least 1).
        batch_size: prompts per forward.

    Returns:
        [n, C] float32, one column per class in ``calibration.labels`` order.
    """
    input_ids, lengths = np.asarray(input_ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
        raise InputError(f"input_ids {input_ids.shape} and lengths {lengths.shape}: expected [n, T] and [n]")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > input_ids.shape[1]):
        raise InputError(f"lengths must lie in 1..{input_ids.shape[1]}, got {lengths.min()}..{lengths.max()}")
    columns = torch.tensor(served.calibration.verbalizer_token_ids)
    out = np.zeros((len(lengths), len(columns)), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(lengths), batch_size):
            rows = slice(start, start + batch_size)
            longest = int(lengths[rows].max())
            ids = torch.from_numpy(input_ids[rows, :longest])  # [rows, T'] the padding past every row's end is never read
            logits = served.model(input_ids=ids).logits  # [rows, T', V]
            answer = torch.from_numpy(lengths[rows] - 1)  # [rows]
            out[rows] = logits[torch.arange(len(answer)), answer][:, columns].float().numpy()  # [rows, C]
    return out


def predict(logits: np.ndarray, class_bias: list[float] | None) -> np.ndarray:
    """[n] class indices: argmax of ``logits`` [n, C] plus ``class_bias`` [C] (None: no bias)."""
    biased = logits if class_bias is None else logits + np.asarray(class_bias, dtype=np.float32)
    return biased.argmax(axis=1)


def served_accuracy(served: ServedAdapter, split: Split, limit: int | None = None,
                    batch_size: int = 16) -> ServedAccuracy:
    """Accuracy on the first ``limit`` rows of a tokenised split (all when None), both ways.

    Report both figures: ``with_bias`` is the classifier deftly trained,
    ``without_bias`` what a user loading the adapter with PEFT alone gets.
    An empty split gives nan for both, as ``device_agent.program.Program.accuracy`` does.
    """
    n = len(split) if limit is None else min(limit, len(split))
    if n == 0:
        return ServedAccuracy(with_bias=math.nan, without_bias=math.nan, examples=0)
    logits = verbalizer_logits(served, split.input_ids[:n], split.lengths[:n], batch_size)  # [n, C]
    labels = split.labels[:n]
    return ServedAccuracy(
        with_bias=float((predict(logits, served.calibration.class_bias) == labels).mean()),
        without_bias=float((predict(logits, None) == labels).mean()),
        examples=n)
