"""Tokenised task splits on disk: one uncompressed `.npz`, read with numpy alone.

Keys are ``<split>.<array>``: ``train.input_ids`` [n, T] int64 (right-padded),
``train.lengths`` [n] int64, ``train.labels`` [n] int64 (class index), and the same
for ``validation`` and ``test``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import InputError

ARRAYS = ("input_ids", "lengths", "labels")


@dataclass
class Split:
    input_ids: np.ndarray  # [n, T] int64
    lengths: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def save_splits(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Write splits given as (input_ids, lengths, labels) tuples."""
    arrays = {f"{name}.{key}": np.asarray(value, dtype=np.int64)
              for name, split in splits.items() for key, value in zip(ARRAYS, split)}
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **arrays)


def load_splits(path: Path) -> dict[str, Split]:
    """Read splits written by :func:`save_splits`.

    Raises:
        InputError: the file is missing, not an npz, or lacks an array.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            names = sorted({key.split(".", 1)[0] for key in data.files})
            return {name: Split(*(data[f"{name}.{key}"].astype(np.int64) for key in ARRAYS)) for name in names}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a deftly task data file ({exc})") from None
