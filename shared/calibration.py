"""The calibration side-car of a trained adapter: ``deftly_calibration.json``.

deftly's classifier is ``argmax(verbalizer logits + class_bias)``: the logits of
the task's answer words at the answer position, plus a per-class bias measured
at export (``export.calibration``) that the loss and the predictions both use.
A PEFT adapter holds the LoRA tensors but has no place for that bias, so the
trainer writes it beside the adapter, and whoever serves the adapter adds it
(``export.serving``). Without it the same adapter predicts differently.

One record, one reader: :func:`read_calibration` checks the file against
:class:`Calibration` and refuses one whose lists disagree in length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InputError
from shared.records import from_plain

CALIBRATION_FILE = "deftly_calibration.json"  # beside adapter_config.json and adapter_model.safetensors


@dataclass(frozen=True)
class Calibration:
    """What the side-car holds: one entry per class, in class-index order."""

    labels: list[str]  # the class names as the task file writes them
    verbalizer_token_ids: list[int]  # the answer word of each class, as a token id of the model's tokenizer
    class_bias: list[float]  # added to the verbalizer logits before the argmax


def read_calibration(adapter_dir: Path) -> Calibration:
    """Read ``<adapter_dir>/deftly_calibration.json``.

    Raises:
        InputError: the file is missing, not JSON, not a calibration record, or
            its three lists do not have one entry per class each.
    """
    path = Path(adapter_dir) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; an adapter written by `deftly train` carries it beside "
                         f"adapter_config.json (without it the adapter's predictions lack the class bias)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable calibration file ({exc})") from None
    calibration = from_plain(Calibration, data, str(path))
    sizes = {len(calibration.labels), len(calibration.verbalizer_token_ids), len(calibration.class_bias)}
    if len(sizes) != 1 or not calibration.labels:
        raise InputError(f"{path}: labels ({len(calibration.labels)}), verbalizer_token_ids "
                         f"({len(calibration.verbalizer_token_ids)}) and class_bias ({len(calibration.class_bias)}) "
                         f"must each have one entry per class")
    return calibration
