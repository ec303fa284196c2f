"""Data shards: disjoint, covering, class-balanced, reproducible."""
from __future__ import annotations

import numpy as np
import pytest

from desktop.engine.shards import shard_indices, shard_split, write_shard
from shared.errors import InputError
from shared.task_data import Split, load_splits


def test_shards_are_disjoint_cover_every_row_and_keep_class_shares() -> None:
    labels = np.array([0] * 70 + [1] * 30)
    shards = shard_indices(labels, 3, seed=1)
    joined = np.concatenate(shards)
    assert sorted(joined.tolist()) == list(range(100))  # every row once
    assert sorted(len(s) for s in shards) == [33, 33, 34]
    for s in shards:
        share = labels[s].mean()
        assert abs(share - 0.3) <= 1 / len(s) + 1e-9  # within one row of the split's share


def test_shards_depend_on_the_seed_only() -> None:
    labels = np.arange(40) % 2
    first = shard_indices(labels, 2, seed=5)
    again = shard_indices(labels, 2, seed=5)
    other = shard_indices(labels, 2, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_too_few_rows_is_an_input_error() -> None:
    with pytest.raises(InputError, match="3 training rows cannot be cut into 4 shards"):
        shard_indices(np.array([0, 1, 0]), 4)


def test_a_written_shard_reads_back_as_a_train_split(tmp_path) -> None:
    train = Split(np.arange(12).reshape(6, 2), np.full(6, 2), np.array([0, 1, 0, 1, 0, 1]))
    shard = shard_split(train, np.array([1, 4]))
    path = write_shard(tmp_path / "s" / "d.npz", shard)
    back = load_splits(path)
    assert list(back) == ["train"]
    assert back["train"].input_ids.tolist() == [[2, 3], [8, 9]]
    assert back["train"].labels.tolist() == [1, 0]
