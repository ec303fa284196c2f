"""Data shards: disjoint, covering, class-balanced, reproducible."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from desktop.engine.shards import job_buckets, run_step_mix, shard_indices, shard_split, step_mix, write_shard
from device_agent.trainer import BUCKET_WINDOW_BATCHES
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


def _split(lengths: list[int], seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    lengths = np.array(rng.permutation(lengths), dtype=np.int64)  # [n] in no particular order
    ids = np.zeros((len(lengths), 32), dtype=np.int64)
    return Split(ids, lengths, (np.arange(len(lengths)) % 2).astype(np.int64))


def test_the_step_mix_counts_the_trainer_s_batches_at_each_length() -> None:
    # prepare: batches of 2 from 16 rows: one epoch is one window of the trainer's order
    # (8 batches), sorted by length bucket, so its short rows fill the first batches
    # whatever the shuffle: 7 short rows make 3 short batches (the 4th holds a long row
    # too, and runs at 32); 10 short rows make 5
    assert BUCKET_WINDOW_BATCHES == 8
    seven = _split([9] * 7 + [30] * 9)
    ten = _split([16] * 10 + [17] * 6, seed=1)
    # execute: two epochs each (16 steps)
    one = step_mix([seven], [16, 32], batch_size=2, steps=16, seed=4)
    both = step_mix([seven, ten], [16, 32], batch_size=2, steps=16, seed=4)
    # assert: by hand, 3 of 8 and (3 + 5) of 16 steps at 16 tokens
    assert one == ((16, 3 / 8), (32, 5 / 8))
    assert both == ((16, 8 / 16), (32, 8 / 16))
    assert step_mix([seven], [32], batch_size=2, steps=5) == ((32, 1.0),)
    with pytest.raises(InputError, match="at least one split and one step"):
        step_mix([], [16, 32], batch_size=2, steps=4)


def test_a_job_s_lengths_come_from_its_step_program_or_its_eval_program(tiny_program) -> None:
    manifest = tiny_program.export.manifest  # step and eval, at 16 and the full 32 tokens
    assert job_buckets(manifest) == [16, 32]
    assert job_buckets(replace(manifest, step_buckets={})) == [16, 32]  # the job's eval program
    assert job_buckets(replace(manifest, step_buckets={}, eval_buckets={})) == [32]
    with pytest.raises(InputError, match="at least one round and one local step, got 0 and 4"):
        run_step_mix(manifest, [_split([9] * 8)], rounds=0, local_steps=4)
