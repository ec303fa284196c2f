"""Data shards: the training split cut into disjoint, class-balanced parts, one per device.

In a cooperative round every device trains its block on its own data, as the
devices of a lab would hold different data. A device started with its own
``--data`` keeps it (its rows never leave it); every other device gets a shard
the desktop cuts from the task's training split.

The cut is stratified: each class's rows are shuffled with ``seed`` and dealt
round-robin, so every shard holds the split's class shares (within one row per
class) and the shards are disjoint and together cover the split. Pure: arrays
in, arrays out; :func:`write_shard` is the one function that writes a file.

:func:`step_mix` counts the share of steps the devices will run at each length
bucket on their shards, in the trainer's own batch order
(``device_agent.trainer.step_lengths``): the planner's ``Job.step_mix``.
:func:`run_step_mix` counts it for a run of a job's programs (their buckets,
batch size and batch order); the engine (on the shards it cut) and ``deftly plan
--programs`` (on the shards :func:`cut_shards` would cut) both price plans with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from device_agent.trainer import step_lengths
from shared.errors import InputError
from shared.manifest import Manifest
from shared.task_data import Split, save_splits


def shard_indices(labels: np.ndarray, shards: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of each shard: disjoint, covering every row, each at the classes' shares.

    Args:
        labels: [n] int64 class index per training row.
        shards: how many shards (devices that take a shard).
        seed: seeds the shuffle.

    Returns:
        ``shards`` arrays of row indices, each sorted.

    Raises:
        InputError: fewer rows than shards.
    """
    labels = np.asarray(labels)
    if shards < 1:
        raise InputError(f"data shards: need at least one shard, got {shards}")
    if len(labels) < shards:
        raise InputError(f"data shards: {len(labels)} training rows cannot be cut into {shards} shards "
                         f"(each device needs at least one row)")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(shards)]
    dealt = 0  # rows dealt so far: the next class starts where the last one stopped, so sizes stay even
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))  # [n_label]
        for k in range(shards):
            parts[k].append(rows[(k - dealt) % shards::shards])
        dealt += len(rows)
    return [np.sort(np.concatenate(p)) for p in parts]


def shard_split(train: Split, indices: np.ndarray) -> Split:
    """The rows ``indices`` of ``train``."""
    return Split(train.input_ids[indices], train.lengths[indices], train.labels[indices])


def cut_shards(train: Split, shards: int, seed: int = 0) -> list[Split]:
    """``train`` cut into ``shards`` shards (:func:`shard_indices`); the k-th device takes the k-th.

    Raises:
        InputError: as :func:`shard_indices`.
    """
    return [shard_split(train, rows) for rows in shard_indices(train.labels, shards, seed=seed)]


def write_shard(path: Path, shard: Split) -> Path:
    """Write a shard as a task-data file holding one ``train`` split (what an agent trains on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_splits(path, {"train": (shard.input_ids, shard.lengths, shard.labels)})
    return path


def step_mix(splits: Sequence[Split], buckets: Sequence[int], batch_size: int, steps: int, *, seed: int = 0,
             batches: str = "shuffled") -> tuple[tuple[int, float], ...]:
    """The share of steps at each length bucket when each split is trained ``steps`` steps.

    Every device's trainer starts fresh on its split with the same seed and batch
    order (``Trainer.fresh``); its steps' lengths are counted in that order, and
    the shares are over all the devices' steps together.

    Args:
        splits: the data each device trains on (its shard), one per device.
        buckets: the programs' step lengths (shorter buckets and the full length).
        batch_size: the programs' batch size.
        steps: steps per device (rounds × local steps).
        seed: the trainers' seed.
        batches: their batch order.

    Returns:
        (length, share) for every bucket, ascending; shares sum to 1.

    Raises:
        InputError: no split, or no steps.
    """
    if not splits or steps < 1:
        raise InputError(f"step mix: need at least one split and one step, got {len(splits)} and {steps}")
    lengths = np.concatenate([step_lengths(split, buckets, batch_size, steps, seed=seed, batches=batches)
                              for split in splits])  # [devices · steps]
    return tuple((int(t), float(np.mean(lengths == t))) for t in sorted(buckets))


def job_buckets(manifest: Manifest) -> list[int]:
    """The lengths a job's steps run at, ascending, the last its full length.

    A step program's own buckets; for the job's eval program (the engine plans from
    it, before any block program exists) its eval buckets, which the exporter cuts
    at the same lengths; a manifest with neither: the full length only.
    """
    buckets = manifest.step_buckets or manifest.eval_buckets
    return sorted(int(t) for t in buckets) or [manifest.seq_len]


def run_step_mix(manifest: Manifest, splits: Sequence[Split], rounds: int, local_steps: int,
                 seed: int = 0) -> tuple[tuple[int, float], ...]:
    """The planner's ``Job.step_mix`` for a run: each device trains its split ``rounds × local_steps`` steps.

    Args:
        manifest: one of the job's program manifests (a block program, the whole-job or the eval program).
        splits: what each device trains on, one per device (its shard, or its own data).
        rounds: rounds of the run.
        local_steps: K, steps per device per round.
        seed: the run's seed (the trainers' batch order).

    Returns:
        (length, share) for every bucket of the job, ascending; shares sum to 1.

    Raises:
        InputError: no split, or fewer than one round or step.
    """
    if rounds < 1 or local_steps < 1:
        raise InputError(f"step mix: need at least one round and one local step, got {rounds} and {local_steps}")
    return step_mix(splits, job_buckets(manifest), manifest.batch_size, rounds * local_steps, seed=seed,
                    batches=manifest.batches)
