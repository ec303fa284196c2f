"""Tests for device_agent/data.py: shards and private files checked row by row, only counts reported."""
from __future__ import annotations

import numpy as np
import pytest

from device_agent.data import PrivateData, fit_to_program, load_shard
from shared.errors import InputError
from shared.manifest import Manifest
from shared.protocol import ProtocolError
from shared.task_data import save_splits
from tests.device_agent.conftest import write_task

SHA = "0" * 64


def _shard(tmp_path, ids=None, lengths=None, labels=None):
    ids = np.ones((6, 8), np.int64) if ids is None else ids
    lengths = np.full(6, 5) if lengths is None else lengths
    labels = np.array([0, 1, 1, 0, 1, 1]) if labels is None else labels
    path = tmp_path / "shard.npz"
    save_splits(path, {"train": (ids, lengths, labels)})
    return path


def _manifest(**change) -> Manifest:
    values = dict(model_id="m", task="t", num_layers=2, trainable_layers=[1], target_modules=["q_proj"], rank=8,
                  alpha=16.0, q=4, batch_size=4, eval_batch_size=8, seq_len=16, labels=["rotten", "fresh"],
                  verbalizer_token_ids=[1, 2], class_bias=[0.0, 0.0], loss="verbalizer", prefix_sharing=True,
                  b_size=8, b_layout=[], methods=["step"], step_buckets={"16": "step"}, lr=0.1, eps=0.01)
    return Manifest(**{**values, **change})


def test_a_shard_reports_counts_and_shares_and_is_padded_to_the_program(tmp_path) -> None:
    data = load_shard(_shard(tmp_path), SHA)
    assert data.summary.examples == 6 and data.summary.label_shares == {"0": pytest.approx(1 / 3),
                                                                        "1": pytest.approx(2 / 3)}
    rows = fit_to_program(data, _manifest())
    assert rows.input_ids.shape == (6, 16) and (rows.input_ids[:, :8] == 1).all()


@pytest.mark.parametrize("change, message", [
    ({"lengths": np.array([5, 5, 0, 5, 5, 5])}, "row 2: length below 1"),
    ({"lengths": np.array([5, 5, 5, 9, 5, 5])}, "row 3: length below 1 or above the row width"),
    ({"labels": np.array([0, -1, 1, 0, 1, 1])}, "row 1: negative label"),
    ({"ids": np.array([[1] * 8] * 5 + [[-3] * 8])}, "row 5: negative token id"),
])
def test_a_shard_row_that_cannot_be_trained_on_is_named(tmp_path, change, message) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        load_shard(_shard(tmp_path, **change), SHA)
    assert caught.value.code == "bad_data"


def test_rows_that_do_not_fit_the_program_are_named(tmp_path) -> None:
    data = load_shard(_shard(tmp_path, labels=np.array([0, 1, 2, 0, 1, 1])), SHA)
    with pytest.raises(ProtocolError, match="row 2: label 2, the program has 2 classes"):
        fit_to_program(data, _manifest())
    with pytest.raises(ProtocolError, match="row 0 has 5 tokens, the program takes at most 4"):
        fit_to_program(load_shard(_shard(tmp_path), SHA), _manifest(seq_len=4))
    with pytest.raises(ProtocolError, match="6 rows, fewer than the program's batch of 8"):
        fit_to_program(load_shard(_shard(tmp_path), SHA), _manifest(batch_size=8))


def test_a_private_text_file_reports_only_counts_and_a_bad_row_names_its_line(tmp_path) -> None:
    task = write_task(tmp_path, data="elsewhere.csv")  # --data replaces the file the task names
    good = tmp_path / "mine.csv"
    good.write_text("text,label\nsecret one,fresh\nsecret two,rotten\nsecret three,fresh\n")
    private = PrivateData(good, task)
    assert private.summary.examples == 3 and private.summary.label_shares == {"rotten": pytest.approx(1 / 3),
                                                                             "fresh": pytest.approx(2 / 3)}
    assert "secret" not in repr(private.summary)
    with pytest.raises(ProtocolError, match="labels \\['rotten', 'fresh'\\], the program classifies"):
        private.for_program(_manifest(labels=["no", "yes"]), None)
    with pytest.raises(ProtocolError, match="needs the model's tokenizer.json"):
        private.for_program(_manifest(), None)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,fresh\n\"unterminated,rotten\nmore,fresh\n")
    with pytest.raises(InputError, match=r"bad.csv, line \d+"):
        PrivateData(bad, task)
    with pytest.raises(InputError, match="a text file needs --task"):
        PrivateData(good, None)
