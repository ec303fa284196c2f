"""Calibration of the verbalizer: a per-class bias on the answer logits, from training data.

Zero-shot, SmolLM2 answers " great" to 98 % of reviews although its logit
difference still ranks them well; zeroth-order training spends hundreds of
steps just moving that threshold.  A bias chosen from training prompts at
``b = 0`` removes the imbalance before the first step (Zhao et al. 2021,
"Calibrate Before Use", do the same with content-free prompts).  The bias is
a constant of the exported program: the loss and the predictions both use it,
and the trainer writes it beside the PEFT adapter.
"""
from __future__ import annotations

import torch

from export.prge import PrgeProgram


def median_class_bias(program: PrgeProgram, split, b: torch.Tensor | None = None, limit: int = 256,
                      batch_size: int = 32) -> torch.Tensor:
    """A per-class logit bias, from training prompts only, that makes the classes equally likely.

    SmolLM2 answers " great" to 98 % of reviews zero-shot; the logit difference
    still ranks them (a median threshold gives ~0.66).  Centre each prompt's
    class logits, take each class's median over ``limit`` training prompts, and
    negate: for two classes that is ``[+m/2, −m/2]`` with ``m`` the median of
    ``logit_1 − logit_0``, i.e. exactly the median threshold.  Added to the answer
    logits (in the loss as well as at evaluation) it is a constant of the
    program, so the exported step applies it too (see docs/accuracy_experiments.md).

    Args:
        program: the step module (its own class_bias is ignored while measuring).
        split: the training split (never validation or test).
        b: [P] B vector to calibrate at; zeros (the untrained model) when None.
        limit: prompts to use (the first ``limit`` of the split).
        batch_size: rows per forward.

    Returns:
        [C] bias to add to the class logits.
    """
    b = torch.zeros(program.b_size) if b is None else b
    n = min(limit, len(split.labels))
    bias_before = program.class_bias.clone()
    program.class_bias.zero_()  # measure the raw logits
    logits = []
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                logits.append(program.class_logits(torch.as_tensor(split.input_ids[start:stop]),
                                                   torch.as_tensor(split.lengths[start:stop]), b))  # [rows, C]
    finally:
        program.class_bias.copy_(bias_before)
    logits = torch.cat(logits)  # [n, C]
    centred = logits - logits.mean(dim=1, keepdim=True)  # [n, C]: only differences between classes matter
    # quantile, not median: torch's median takes the lower middle value, which is not odd-symmetric.
    return -torch.quantile(centred, 0.5, dim=0)  # [C]
