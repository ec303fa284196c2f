"""Tests for shared/tasks.py: the embedded task, user CSV/JSONL files, errors, encoding."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from shared.tasks import (
    Example,
    TaskSpec,
    encode_split,
    load_examples,
    load_task_spec,
    verbalizer_token_ids,
)
from shared.errors import InputError
from shared.task_data import load_splits, save_splits

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "assets" / "tasks"

ROWS = [
    ("A warm and funny film.", "pos"),
    ("Dull from start to finish.", "neg"),
    ("The best thing I saw all year.", "pos"),
    ("A muddled, tedious mess.", "neg"),
    ("Sharp, moving and beautifully shot.", "pos"),
]


def write_task(tmp_path: Path, data_name: str, **overrides: object) -> Path:
    """Writes a TOML task file next to `data_name`; overrides replace or add keys."""
    keys: dict[str, object] = {
        "data": data_name,
        "text_column": "review",
        "label_column": "label",
        "template": "{text} It was",
    }
    keys.update(overrides)
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items() if v is not None]
    lines += ["[verbalizer]", 'neg = " terrible"', 'pos = " great"']
    path = tmp_path / "task.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "review,label") -> Path:
    body = "".join(f'"{text}",{label}\n' for text, label in rows)
    path.write_text(header + "\n" + body)
    return path


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"review": t, "label": lab}) + "\n" for t, lab in rows))
    return path


# --- the embedded task ---------------------------------------------------------------


def test_embedded_rotten_tomatoes_is_split_deterministically() -> None:
    # execute
    task = load_task_spec("rotten_tomatoes")
    first = load_examples(task)
    second = load_examples(task)
    # assert
    assert first == second
    sizes = {k: len(v) for k, v in first.items()}
    assert sizes == {"train": 10201, "validation": 1275, "test": 1276}  # 12,752 reviews after dedup
    all_examples = [e for split in first.values() for e in split]
    assert {e.label for e in all_examples} == {"fresh", "rotten"}  # "plot" rows dropped
    assert len({e.text for e in all_examples}) == len(all_examples)  # no text twice, so no leak between splits
    assert task.labels == ["rotten", "fresh"]


def test_embedded_split_depends_on_the_seed() -> None:
    task = load_task_spec("rotten_tomatoes")
    other = TaskSpec(**{**task.__dict__, "seed": 1})
    assert load_examples(task)["test"] != load_examples(other)["test"]


def test_shipped_rotten_tomatoes_toml_is_the_embedded_task() -> None:
    assert load_task_spec(str(TASKS / "rotten_tomatoes.toml")) == load_task_spec("rotten_tomatoes")


def test_shipped_example_csv_task_loads(smollm2_tokenizer) -> None:
    task = load_task_spec(str(TASKS / "example_csv.toml"))
    splits = load_examples(task)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 2, "test": 2}
    assert len(verbalizer_token_ids(task, smollm2_tokenizer)) == 2


@pytest.mark.parametrize("name", ["rotten_tomatoes.toml", "rotten_tomatoes_mezo.toml", "rotten_tomatoes_movie_review.toml",
                                  "example_csv.toml"])
def test_example_configs_start_with_the_command_that_uses_them(name: str) -> None:
    first = (TASKS / name).read_text().splitlines()[0]
    assert first.startswith("# deftly export ") and f"--task assets/tasks/{name}" in first


# --- user files ---------------------------------------------------------------------


def test_csv_jsonl_and_gzip_give_the_same_examples(tmp_path: Path) -> None:
    # prepare: the same rows in three formats, data paths relative to each TOML
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    write_csv(tmp_path / "a" / "d.csv", ROWS)
    write_jsonl(tmp_path / "b" / "d.jsonl", ROWS)
    with gzip.open(tmp_path / "c" / "d.csv.gz", "wt") as f:
        f.write((tmp_path / "a" / "d.csv").read_text())
    specs = [
        load_task_spec(str(write_task(tmp_path / "a", "d.csv"))),
        load_task_spec(str(write_task(tmp_path / "b", "d.jsonl"))),
        load_task_spec(str(write_task(tmp_path / "c", "d.csv.gz"))),
    ]
    # execute
    results = [load_examples(s) for s in specs]
    # assert
    assert results[0] == results[1] == results[2]
    assert sum(len(v) for v in results[0].values()) == 5
    assert specs[0].name == "task" and specs[0].labels == ["neg", "pos"]


def test_split_fractions_seed_and_dedup_are_honoured(tmp_path: Path) -> None:
    rows = [(f"review number {i}", "pos" if i % 2 else "neg") for i in range(20)] + [("review number 3", "pos")]
    write_csv(tmp_path / "d.csv", rows)
    task = load_task_spec(str(write_task(tmp_path, "d.csv", split_fractions=[0.5, 0.25, 0.25], seed=7)))
    splits = load_examples(task)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "validation": 5, "test": 5}
    assert task.seed == 7


def test_skip_labels_drop_rows(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ROWS + [("No opinion here.", "neutral")])
    task = load_task_spec(str(write_task(tmp_path, "d.csv", skip_labels=["neutral"])))
    assert sum(len(v) for v in load_examples(task).values()) == 5


def test_numeric_json_labels_match_string_verbalizer_keys(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"review": "Great.", "label": 1}\n{"review": "Awful.", "label": 0}\n')
    path = tmp_path / "task.toml"
    path.write_text(
        'data = "d.jsonl"\ntext_column = "review"\nlabel_column = "label"\ntemplate = "{text} It was"\n'
        '[verbalizer]\n"0" = " terrible"\n"1" = " great"\n'
    )
    examples = [e for split in load_examples(load_task_spec(str(path))).values() for e in split]
    assert sorted(e.label for e in examples) == ["0", "1"]


# --- bad files: the error names the file, the line and the problem -----------------


def load_all(toml: Path) -> dict[str, list[Example]]:
    return load_examples(load_task_spec(str(toml)))


def test_missing_csv_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ROWS, header="text,label")
    with pytest.raises(InputError, match=r"d\.csv, line 1: missing column\(s\) \['review'\]"):
        load_all(write_task(tmp_path, "d.csv"))


def test_missing_jsonl_key(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write('{"text": "wrong key", "label": "pos"}\n')
    with pytest.raises(InputError, match=r"d\.jsonl, line 6: missing column\(s\) \['review'\]"):
        load_all(write_task(tmp_path, "d.jsonl"))


def test_unknown_label_names_the_line(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ROWS[:2] + [("So-so.", "meh")])  # header is line 1, so the row is line 4
    with pytest.raises(InputError, match=r"d\.csv, line 4: unknown label 'meh'"):
        load_all(write_task(tmp_path, "d.csv"))


def test_line_numbers_count_multiline_cells(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('review,label\n"two\nlines",pos\n"ok",huh\n')
    with pytest.raises(InputError, match=r"line 4: unknown label 'huh'"):
        load_all(write_task(tmp_path, "d.csv"))


@pytest.mark.parametrize("content", ["", "review,label\n"])
def test_empty_csv(tmp_path: Path, content: str) -> None:
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(InputError, match=r"d\.csv: (empty file|no examples)"):
        load_all(write_task(tmp_path, "d.csv"))


def test_empty_jsonl(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match=r"d\.jsonl: no examples"):
        load_all(write_task(tmp_path, "d.jsonl"))


def test_empty_text(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", ROWS[:1] + [("   ", "neg")])
    with pytest.raises(InputError, match=r"d\.csv, line 3: empty text in column 'review'"):
        load_all(write_task(tmp_path, "d.csv"))


def test_malformed_json_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write('{"review": "unterminated, "label": "pos"}\n')
    with pytest.raises(InputError, match=r"d\.jsonl, line 3: malformed JSON"):
        load_all(write_task(tmp_path, "d.jsonl"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"template": "Review: It was"}, r"template .* must contain \{text\} exactly once"),
        ({"template": "{text} {mood}"}, r"placeholder other than \{text\}"),
        ({"split_fractions": [0.5, 0.5, 0.5]}, r"split_fractions must sum to 1"),
        ({"text_col": "review"}, r"unknown key\(s\) text_col"),
        ({"data": "missing.csv"}, r"data file 'missing.csv' not found"),
        ({"data": "embedded:imdb"}, r"unknown embedded data"),
        ({"label_column": None}, r"missing key 'label_column'"),
    ],
)
def test_bad_task_file_names_the_file_and_the_problem(tmp_path: Path, overrides: dict, message: str) -> None:
    write_csv(tmp_path / "d.csv", ROWS)
    toml = write_task(tmp_path, "d.csv", **overrides)
    with pytest.raises(InputError, match=message) as err:
        load_task_spec(str(toml))
    assert "task.toml" in str(err.value)


def test_missing_task_file() -> None:
    with pytest.raises(InputError, match="no such file"):
        load_task_spec("no/such/task.toml")


# --- verbalizer and encoding --------------------------------------------------------


def test_verbalizer_token_ids_follow_label_order(smollm2_tokenizer) -> None:
    task = load_task_spec("rotten_tomatoes")
    assert verbalizer_token_ids(task, smollm2_tokenizer) == [3524, 2731]  # " negative", " positive"
    mezo = load_task_spec(str(TASKS / "rotten_tomatoes_mezo.toml"))
    assert verbalizer_token_ids(mezo, smollm2_tokenizer) == [13321, 1109]  # " terrible", " great"


def test_multi_token_verbalizer_word_is_refused(smollm2_tokenizer) -> None:
    task = TaskSpec(
        name="t", data_path=None, text_column="text", label_column="category", template="{text} It was",
        verbalizer={"rotten": " terrible", "fresh": " supercalifragilistic"},
    )  # fmt: skip
    with pytest.raises(InputError, match=r"' supercalifragilistic' for label 'fresh' is \d+ tokens"):
        verbalizer_token_ids(task, smollm2_tokenizer)


def test_encode_split_right_pads_and_keeps_the_cue_words(smollm2_tokenizer) -> None:
    # prepare: one short review and one far longer than seq_len
    task = load_task_spec("rotten_tomatoes")
    long_text = " ".join(f"word{i}" for i in range(200)) + " and the ending"
    examples = [Example("Loved it.", "fresh"), Example(long_text, "rotten")]
    pad = smollm2_tokenizer.pad_token_id
    # execute
    enc = encode_split(examples, task, smollm2_tokenizer, seq_len=32)
    # assert
    assert enc.input_ids.shape == (2, 32) and enc.input_ids.dtype == np.int64
    assert enc.labels.tolist() == [1, 0]
    short = smollm2_tokenizer("Review: Loved it.\nSentiment:")["input_ids"]
    assert enc.lengths[0] == len(short) and enc.input_ids[0, : len(short)].tolist() == short
    assert (enc.input_ids[0, len(short) :] == pad).all()
    assert enc.lengths[1] <= 32
    decoded = smollm2_tokenizer.decode(enc.input_ids[1, : enc.lengths[1]])
    assert decoded.startswith("Review: word0 word1") and decoded.endswith("\nSentiment:")
    assert "the ending" not in decoded  # the text's end was cut, not the template's


def test_encode_split_refuses_a_seq_len_shorter_than_the_template(smollm2_tokenizer) -> None:
    with pytest.raises(InputError, match="seq_len 2 is too short"):
        encode_split([Example("Fine.", "fresh")], load_task_spec("rotten_tomatoes"), smollm2_tokenizer, seq_len=2)


def test_encoded_splits_round_trip_through_the_shipped_npz_with_numpy_alone(smollm2_tokenizer, tmp_path: Path) -> None:
    # prepare
    task = load_task_spec("rotten_tomatoes")
    examples = load_examples(task)
    encoded = {name: encode_split(examples[name][:50], task, smollm2_tokenizer, seq_len=64) for name in ("train", "test")}
    # execute
    save_splits(tmp_path / "data.npz", {name: (s.input_ids, s.lengths, s.labels) for name, s in encoded.items()})
    raw = np.load(tmp_path / "data.npz", allow_pickle=False)  # what the device side does
    back = load_splits(tmp_path / "data.npz")
    # assert
    assert sorted(raw.files) == sorted(f"{n}.{a}" for n in ("train", "test") for a in ("input_ids", "labels", "lengths"))
    assert sorted(back) == ["test", "train"]
    for name in ("train", "test"):
        for array in ("input_ids", "lengths", "labels"):
            np.testing.assert_array_equal(getattr(back[name], array), getattr(encoded[name], array))
        assert len(back[name]) == 50 and (back[name].lengths >= 1).all() and (back[name].lengths <= 64).all()
