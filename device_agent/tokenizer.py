"""A model's tokenizer on a device, without transformers: the `tokenizers` package and a ``tokenizer.json``.

Tokenising a device's private file needs the model's tokenizer. ``transformers``
is far too heavy for a Pi or a phone; its fast tokenizers are a thin layer over
the `tokenizers` package (one 12 MB native wheel, no torch), which reads the same
``tokenizer.json`` that ``save_pretrained`` writes. :class:`DeviceTokenizer`
gives it the handful of methods ``shared.tasks`` calls, so a device encodes its
rows with exactly the exporter's code: same template, same truncation of the text
(never of the cue words after it), same special tokens.

One difference, harmless by construction: the padding id. A Hugging Face
tokenizer knows its pad token from ``tokenizer_config.json``; a bare
``tokenizer.json`` names one only if padding was configured, so the id is then
0. No position after a row's length is ever read (causal attention; the answer
is read at ``lengths - 1``), so the value never reaches the loss.

`tokenizers` is imported when a tokenizer is first opened; without it, an agent
trains on shards the desktop sends or on pre-tokenised ``.npz`` files only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import InputError


class DeviceTokenizer:
    """A ``tokenizers.Tokenizer`` with the calls ``shared.tasks`` makes of a Hugging Face tokenizer."""

    is_fast = True  # it has character offsets, which the exact truncation uses

    def __init__(self, path: Path) -> None:
        """Open a ``tokenizer.json``.

        Raises:
            InputError: `tokenizers` is not installed, or the file is not a tokenizer.
        """
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError("tokenising a text file on the device needs the `tokenizers` package "
                             "(pip install tokenizers); or give a pre-tokenised .npz") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises its own Exception type for a bad file
            raise InputError(f"{path}: not a tokenizer.json ({str(exc)[:200]})") from None
        padding = self._tokenizer.padding
        self.pad_token_id: int | None = int(padding["pad_id"]) if padding else None
        self.eos_token_id: int | None = None

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        if isinstance(text, list):
            encodings = self._tokenizer.encode_batch(text, add_special_tokens=add_special_tokens)
            out: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
            if return_offsets_mapping:
                out["offset_mapping"] = [e.offsets for e in encodings]
            return out
        encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
        out = {"input_ids": encoding.ids}
        if return_offsets_mapping:
            out["offset_mapping"] = encoding.offsets
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) for i in ids]
