"""An agent's training data: a shard the desktop sent, or the device's own private file.

* A **shard** is a ``shared.task_data`` ``.npz`` with a ``train`` split
  (input_ids [n, T], lengths [n], labels [n]), already tokenised on the desktop.
* A **private file** (``deftly-agent --data PATH``) never leaves the device; only
  its example count and label shares are reported. It is either a pre-tokenised
  ``.npz`` like a shard, or a CSV / TSV / JSONL file read with a task file
  (``--task TASK.toml``: columns, template, verbalizer) and tokenised on the
  device with the model's ``tokenizer.json`` (``device_agent.tokenizer``) when a
  program is loaded: the task's ``train`` split is trained on.

:func:`fit_to_program` checks rows against the program they will train (every
row's length, label and token ids) and pads them to its length, so a bad row is
an ``InputError`` naming the row, never a shape error inside the runtime.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import InputError
from shared.manifest import Manifest
from shared.protocol import DataSummary, ProtocolError
from shared.task_data import Split, load_splits
from shared.tasks import TaskSpec, encode_split, load_examples, load_task_spec, verbalizer_token_ids

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


def _bad(message: str) -> ProtocolError:
    return ProtocolError(message, code="bad_data")


@dataclass
class TrainData:
    """Rows to train on, and what may be said about them."""

    split: Split  # [n, T] rows, T <= the program's seq_len
    summary: DataSummary
    key: str  # sha256 of the rows: the sampler's position is kept per key


def rows_key(split: Split) -> str:
    digest = hashlib.sha256()
    for array in (split.input_ids, split.lengths, split.labels):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _shares(labels: np.ndarray, names: list[str] | None) -> dict[str, float]:
    values, counts = np.unique(labels, return_counts=True)
    total = max(int(counts.sum()), 1)
    return {(names[v] if names and 0 <= v < len(names) else str(int(v))): round(int(c) / total, 6)
            for v, c in zip(values, counts)}


def check_rows(split: Split, where: str) -> None:
    """Shapes, dtypes and values a program can train on, whatever the program.

    Raises:
        ProtocolError (bad_data): naming the first row at fault.
    """
    ids, lengths, labels = split.input_ids, split.lengths, split.labels
    if ids.ndim != 2 or lengths.shape != (ids.shape[0],) or labels.shape != (ids.shape[0],):
        raise _bad(f"{where}: input_ids {ids.shape}, lengths {lengths.shape} and labels {labels.shape} "
                   f"do not describe one set of rows")
    if ids.shape[0] == 0:
        raise _bad(f"{where}: no rows")
    for name, bad in (("length below 1 or above the row width", (lengths < 1) | (lengths > ids.shape[1])),
                      ("negative label", labels < 0), ("negative token id", (ids < 0).any(axis=1))):
        if bad.any():
            row = int(np.argmax(bad))
            raise _bad(f"{where}: row {row}: {name} (length {int(lengths[row])}, label {int(labels[row])})")


def load_shard(path: Path, sha256: str) -> TrainData:
    """A shard the desktop sent, checked.

    Raises:
        ProtocolError (bad_data): not a task data file, no train split, or a bad row.
    """
    try:
        splits = load_splits(path)
    except InputError as exc:
        raise _bad(f"shard {sha256[:12]}…: {str(exc).split(': ', 1)[-1]}") from None
    if "train" not in splits:
        raise _bad(f"shard {sha256[:12]}…: no 'train' split (it has {sorted(splits)})")
    split = splits["train"]
    check_rows(split, f"shard {sha256[:12]}…")
    summary = DataSummary(source="shard", examples=len(split), label_shares=_shares(split.labels, None),
                          seq_len=int(split.input_ids.shape[1]), sha256=sha256)
    return TrainData(split=split, summary=summary, key=rows_key(split))


class PrivateData:
    """The device's own file: read at start, tokenised when a program says how."""

    def __init__(self, path: Path, task_path: Path | None) -> None:
        """Read and check the file (its rows, not yet their tokens).

        Raises:
            InputError: a missing file; a text file without a task; a row that does not parse.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"--data {path}: no such file")
        name = self.path.name.lower().removesuffix(".gz").removesuffix(".bz2")
        self.task: TaskSpec | None = None
        self._tokenised: dict[tuple, TrainData] = {}
        if name.endswith(".npz"):
            splits = load_splits(self.path)
            if "train" not in splits:
                raise InputError(f"--data {path}: no 'train' split (it has {sorted(splits)})")
            check_rows(splits["train"], str(self.path))
            self._rows = splits["train"]
            self.summary = DataSummary(source="private", examples=len(self._rows),
                                       label_shares=_shares(self._rows.labels, None),
                                       seq_len=int(self._rows.input_ids.shape[1]))
        elif name.endswith(TEXT_SUFFIXES):
            if task_path is None:
                raise InputError(f"--data {path}: a text file needs --task TASK.toml (its columns, template and "
                                 f"verbalizer)")
            self.task = load_task_spec(str(task_path), data_path=self.path)
            self._examples = load_examples(self.task)["train"]
            labels = self.task.labels
            counts = np.array([sum(e.label == label for e in self._examples) for label in labels])
            self.summary = DataSummary(source="private", examples=len(self._examples),
                                       label_shares={label: round(int(c) / max(len(self._examples), 1), 6)
                                                     for label, c in zip(labels, counts)})
        else:
            raise InputError(f"--data {path}: expected a .npz, .csv, .tsv or .jsonl file")

    def for_program(self, manifest: Manifest, tokenizer_path: Path | None) -> TrainData:
        """The rows, tokenised for this program if they are text (once per tokenizer and length).

        Raises:
            ProtocolError: bad_data (no tokenizer, or the text does not fit), wrong_model
                (the task's labels or answer words are not the program's).
        """
        if self.task is None:
            return TrainData(split=self._rows, summary=self.summary, key=rows_key(self._rows))
        if self.task.labels != manifest.labels:
            raise ProtocolError(f"--task: labels {self.task.labels}, the program classifies {manifest.labels}",
                                code="wrong_model")
        if tokenizer_path is None:
            raise _bad("the private data is text: tokenising it needs the model's tokenizer.json (the program's "
                       "manifest names no 'tokenizer' file; start the agent with --tokenizer, or give a .npz)")
        cache_key = (str(tokenizer_path), manifest.seq_len)
        if cache_key not in self._tokenised:
            from device_agent.tokenizer import DeviceTokenizer

            tokenizer = DeviceTokenizer(tokenizer_path)
            if verbalizer_token_ids(self.task, tokenizer) != list(manifest.verbalizer_token_ids):
                raise ProtocolError(f"{tokenizer_path}: the answer words tokenise to "
                                    f"{verbalizer_token_ids(self.task, tokenizer)}, the program reads "
                                    f"{manifest.verbalizer_token_ids}: a tokenizer of another model",
                                    code="wrong_model")
            split = encode_split(self._examples, self.task, tokenizer, manifest.seq_len)
            summary = dataclasses.replace(self.summary, seq_len=manifest.seq_len)
            self._tokenised[cache_key] = TrainData(split=split, summary=summary, key=rows_key(split))
        return self._tokenised[cache_key]


def fit_to_program(data: TrainData, manifest: Manifest) -> Split:
    """The rows at the program's length, checked against its classes and batch size.

    Raises:
        ProtocolError (bad_data): rows longer than the program, a label it does not
            have, fewer rows than one batch.
    """
    split, where = data.split, f"{data.summary.source} data"
    T = split.input_ids.shape[1]
    longest = int(split.lengths.max())
    if longest > manifest.seq_len:
        row = int(np.argmax(split.lengths))
        raise _bad(f"{where}: row {row} has {longest} tokens, the program takes at most {manifest.seq_len}")
    classes = len(manifest.labels)
    if int(split.labels.max()) >= classes:
        row = int(np.argmax(split.labels >= classes))
        raise _bad(f"{where}: row {row}: label {int(split.labels[row])}, the program has {classes} classes "
                   f"({', '.join(manifest.labels)})")
    if len(split) < manifest.batch_size:
        raise _bad(f"{where}: {len(split)} rows, fewer than the program's batch of {manifest.batch_size}")
    if T == manifest.seq_len:
        return split
    ids = np.zeros((len(split), manifest.seq_len), dtype=np.int64)  # right padding, never read (see tokenizer.py)
    width = min(T, manifest.seq_len)
    ids[:, :width] = split.input_ids[:, :width]
    return Split(input_ids=ids, lengths=split.lengths, labels=split.labels)
