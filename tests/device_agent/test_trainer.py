"""The trainer: the round API (rounds, stop, save/restore, the clock, blocks) and the local
run over it (exact resume, metrics, checkpoints on interruption, the PEFT adapter)."""
from __future__ import annotations

import copy
import io
import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.numpy import load_file

from device_agent.program import Program
from device_agent.trainer import (BUCKET_WINDOW_BATCHES, CALIBRATION_FILE, LEGACY_BUCKET_WINDOW_BATCHES, TrainConfig,
                                  Trainer, class_interleaved, draw_z, epoch_order, initial_rng_state, lr_at,
                                  next_batch, run_training, step_lengths, truncate_metrics, write_adapter)
from shared.blocks import block_span, merge_b
from shared.errors import InputError
from shared.events import Event, Eval, Start, Step, Test, event_to_line, read_events
from shared.task_data import Split

# Small evaluations keep each run well under a second on the tiny program.
FAST = {"eval_limit": 16, "test_limit": 16}


def config(tiny_program, out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"program": tiny_program.pte, "out": out, "steps": 10, "eval_every": 5, **FAST, **changes})


def read_metrics(out: Path) -> list[Event]:
    return read_events(out / "metrics.jsonl")


def interrupt_at_step_7(event: Event) -> None:
    if isinstance(event, Step) and event.step == 7:
        raise KeyboardInterrupt


# -- pure pieces -----------------------------------------------------------------------


def test_schedules_start_at_the_base_rate_and_decay_to_zero() -> None:
    assert [lr_at(t, 0.1, "constant", 10) for t in (0, 9)] == [0.1, 0.1]
    assert lr_at(0, 0.1, "cosine", 10) == pytest.approx(0.1) and lr_at(5, 0.1, "cosine", 10) == pytest.approx(0.05)
    assert lr_at(0, 0.1, "linear", 10) == pytest.approx(0.1) and lr_at(10, 0.1, "linear", 10) == pytest.approx(0.0)
    with pytest.raises(InputError, match="schedule"):
        lr_at(0, 0.1, "step", 10)


def test_sampler_walks_seeded_epochs_without_repeats() -> None:
    n, bs, epoch, position, seen = 10, 3, 0, 0, []
    for _ in range(3):  # 3 batches of 3 from 10 examples: the 10th is skipped this epoch
        indices, epoch, position = next_batch(7, epoch, position, n, bs)
        seen.extend(indices.tolist())
    assert len(set(seen)) == 9 and epoch == 0
    indices, epoch, position = next_batch(7, epoch, position, n, bs)
    assert epoch == 1 and position == 3 and indices.tolist() == epoch_order(7, 1, n)[:3].tolist()
    assert epoch_order(7, 0, n).tolist() != epoch_order(7, 1, n).tolist()


# -- runs ------------------------------------------------------------------------------


def test_resume_continues_exactly(tiny_program, tmp_path: Path) -> None:
    # prepare: one straight run of 10 steps
    straight = run_training(config(tiny_program, tmp_path / "straight"))
    # execute: 5 steps, then resume to 10
    first = run_training(config(tiny_program, tmp_path / "split", steps=5))
    resumed = run_training(config(tiny_program, tmp_path / "split", resume=True))
    # assert: bit-identical b, and the metrics read as one run
    assert first.step == 5 and resumed.step == straight.step == 10
    assert np.array_equal(resumed.b, straight.b)
    assert not np.array_equal(first.b, straight.b)
    losses = [m.loss for m in read_metrics(tmp_path / "straight") if isinstance(m, Step)]
    assert [m.loss for m in read_metrics(tmp_path / "split") if isinstance(m, Step)] == losses


def test_interrupt_checkpoints_and_resume_is_exact_with_a_decaying_schedule(tiny_program, tmp_path: Path) -> None:
    # prepare
    straight = run_training(config(tiny_program, tmp_path / "straight", schedule="cosine"))
    out = tmp_path / "interrupted"
    # execute: Ctrl-C after step 7 (between checkpoints), then resume
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_program, out, schedule="cosine"), on_event=interrupt_at_step_7)
    saved = json.loads((out / "checkpoint.json").read_text())
    resumed = run_training(config(tiny_program, out, resume=True))  # schedule comes from the checkpoint
    # assert: the checkpoint held step 7, no temporary file was left, and the result is the straight run's
    assert saved["step"] == 7 and saved["schedule"] == "cosine"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert np.array_equal(resumed.b, straight.b)
    steps = [m.step for m in read_metrics(out) if isinstance(m, Step)]
    assert steps == list(range(1, 11))


def test_a_fault_while_writing_a_checkpoint_keeps_the_previous_one(tiny_program, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    run_training(config(tiny_program, out, steps=5))

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    # execute: the temporary file is written, then the write fails before the rename
    monkeypatch.setattr("shared.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        run_training(config(tiny_program, out, resume=True))
    monkeypatch.undo()
    # assert: the step-5 checkpoint is whole, nothing temporary is left, and it resumes
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 5
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert run_training(config(tiny_program, out, resume=True)).step == 10


def test_metrics_lines_hold_every_step_and_evaluation(tiny_program, tmp_path: Path) -> None:
    events: list[Event] = []
    result = run_training(config(tiny_program, tmp_path / "run", lr=0.02, schedule="linear"), on_event=events.append)
    metrics = read_metrics(tmp_path / "run")
    steps = [m for m in metrics if isinstance(m, Step)]
    evals = [m for m in metrics if isinstance(m, Eval)]
    assert [m.step for m in steps] == list(range(1, 11))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {tuple(line) for line in lines if line["kind"] == "step"} == {
        ("kind", "step", "loss", "g_abs_mean", "seconds", "seq_len", "rss_mb", "lr", "peak_rss_mb")}
    for m in steps:
        assert m.loss > 0 and m.g_abs_mean >= 0 and m.seconds > 0 and m.rss_mb > 10
        assert m.peak_rss_mb >= m.rss_mb * 0.99 and m.seq_len in (16, 32) and m.round is None
    assert [m.lr for m in steps] == pytest.approx([0.02 * (1 - t / 10) for t in range(10)])
    assert [(m.step, m.examples) for m in evals] == [(0, 16), (5, 16), (10, 16)]
    assert isinstance(metrics[-1], Test) and metrics[-1].accuracy == result.test_accuracy
    assert [e for e in events if isinstance(e, (Step, Eval, Test))] == metrics
    assert [type(e).__name__ for e in events if not isinstance(e, (Step, Eval, Test))] == [
        "Start", "Checkpoint", "Checkpoint", "Done"]
    assert result.best_val_accuracy == max(m.accuracy for m in evals)
    assert result.seconds_per_step == pytest.approx(np.mean([m.seconds for m in steps]))


def test_adapter_loads_in_peft_and_gives_the_programs_logits(tiny_program, tmp_path: Path) -> None:
    from peft import PeftModel

    # prepare: a b large enough that a wrong key, shape or scale would show
    program = Program(tiny_program.pte)
    b = (np.random.default_rng(5).standard_normal(program.b_size) * 0.2).astype(np.float32)
    write_adapter(program, b, tmp_path / "adapter")
    validation = program.load_data()["validation"]
    ids, lengths = validation.input_ids[:8], validation.lengths[:8]
    # execute
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_program.loaded.model), tmp_path / "adapter")
    with torch.no_grad():
        logits = peft_model(input_ids=torch.from_numpy(ids)).logits  # [n, T, V]
    answer = logits[torch.arange(len(ids)), torch.from_numpy(lengths) - 1][:, program.manifest.verbalizer_token_ids]
    calibration = json.loads((tmp_path / "adapter" / CALIBRATION_FILE).read_text())
    # assert: PEFT's verbalizer logits plus the calibration bias are the program's class logits
    assert calibration["class_bias"] == program.manifest.class_bias and any(calibration["class_bias"])
    np.testing.assert_allclose(answer.numpy() + np.array(calibration["class_bias"], dtype=np.float32),
                               program.class_logits(ids, lengths, b), atol=1e-4, rtol=1e-4)


def test_the_run_writes_its_trained_b_as_the_adapter(tiny_program, tmp_path: Path) -> None:
    result = run_training(config(tiny_program, tmp_path / "run", steps=3, eval_every=0))
    tensors = load_file(result.adapter_dir / "adapter_model.safetensors")
    manifest = tiny_program.export.manifest
    for slot in manifest.b_layout:
        np.testing.assert_array_equal(tensors[slot.peft_b_key], result.b[slot.offset:slot.offset + slot.size].reshape(slot.shape))
        assert tensors[slot.peft_a_key].shape == (manifest.rank, tiny_program.loaded.model.config.hidden_size)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text()) == manifest.peft_config
    assert np.abs(result.b).sum() > 0


def test_resume_refuses_a_missing_checkpoint_or_another_programs(tiny_program, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run_training(config(tiny_program, tmp_path / "none", resume=True))
    run_training(config(tiny_program, tmp_path / "run", steps=2, eval_every=0))
    # the same files under another program identity
    other = tmp_path / "other"
    shutil.copytree(tiny_program.pte.parent, other)
    manifest_path = other / tiny_program.export.manifest_path.name
    manifest_path.write_text(manifest_path.read_text().replace(tiny_program.export.manifest.cache_key, "0" * 24))
    with pytest.raises(InputError, match="another program"):
        run_training(config(tiny_program, tmp_path / "run", program=manifest_path, resume=True))


def test_a_fresh_run_refuses_to_overwrite_a_checkpoint(tiny_program, tmp_path: Path) -> None:
    run_training(config(tiny_program, tmp_path / "run", steps=2, eval_every=0))
    with pytest.raises(InputError, match="--resume"):
        run_training(config(tiny_program, tmp_path / "run", steps=2, eval_every=0))


def test_batches_group_examples_of_one_length_bucket() -> None:
    # prepare: 1,000 examples, 70 % short (bucket 0), shuffled
    rng = np.random.default_rng(0)
    bucket_ids = (rng.random(1000) > 0.7).astype(np.int64)
    # execute
    order = epoch_order(5, 0, 1000, bucket_ids, batch_size=4)
    plain = epoch_order(5, 0, 1000)
    wide = epoch_order(5, 0, 1000, bucket_ids, batch_size=4, window_batches=LEGACY_BUCKET_WINDOW_BATCHES)
    # assert: the same examples, and nearly every batch is of one bucket (not so without
    # grouping): a window sorted by bucket holds at most one batch of both
    assert sorted(order.tolist()) == sorted(wide.tolist()) == list(range(1000))

    def homogeneous(o: np.ndarray) -> float:
        return float(np.mean([len(set(bucket_ids[o[i:i + 4]])) == 1 for i in range(0, 1000, 4)]))

    assert homogeneous(order) >= 1 - 1 / BUCKET_WINDOW_BATCHES > 0.5 > homogeneous(plain)
    assert homogeneous(wide) >= 1 - 1 / LEGACY_BUCKET_WINDOW_BATCHES


def test_class_interleaving_keeps_every_prefix_at_the_class_shares() -> None:
    # prepare: 10 examples, 6 of class 1 and 4 of class 0, each class in a known order
    examples = np.arange(10)
    labels = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    # execute
    order = class_interleaved(examples, labels)
    # assert: a permutation, each class in its own order, every prefix within one of its share
    assert sorted(order.tolist()) == examples.tolist()
    assert [e for e in order if labels[e] == 1] == [0, 1, 2, 3, 4, 5]
    assert [e for e in order if labels[e] == 0] == [6, 7, 8, 9]
    ones = np.cumsum(labels[order])  # class-1 count in each prefix
    assert np.all(np.abs(ones - 0.6 * np.arange(1, 11)) < 1)


def test_stratified_batches_hold_each_class_at_its_share_and_stay_grouped_by_length() -> None:
    # prepare: 1,000 examples, 58 % of class 1 and 70 % short, independently, shuffled
    rng = np.random.default_rng(1)
    labels = (rng.random(1000) < 0.58).astype(np.int64)
    bucket_ids = (rng.random(1000) > 0.7).astype(np.int64)
    # execute
    order = epoch_order(5, 0, 1000, bucket_ids, batch_size=4, labels=labels)
    plain = epoch_order(5, 0, 1000, bucket_ids, batch_size=4)
    # assert: the same examples; class 1 counts of 1 to 3 in every batch, 2 or 3 in
    # nearly all (a plain order also has 0 and 4; a window of 8 batches holds 32
    # examples, whose class share wanders a little from the split's); still mostly one
    # length bucket per batch
    assert sorted(order.tolist()) == list(range(1000))
    counts = labels[order].reshape(-1, 4).sum(axis=1)  # [250]
    plain_counts = labels[plain].reshape(-1, 4).sum(axis=1)
    assert set(counts.tolist()) <= {1, 2, 3} and np.isin(counts, [2, 3]).mean() > 0.95
    assert set(plain_counts.tolist()) >= {0, 1, 2, 3, 4}
    homogeneous = np.mean([len(set(bucket_ids[order[i:i + 4]])) == 1 for i in range(0, 1000, 4)])
    assert homogeneous > 0.75  # 0.80 with windows of 8 batches (0.97 with 64), against 0.24 ungrouped
    # three classes in equal shares over one window of 64 batches of 6: two of each per batch
    three = np.arange(384) % 3
    order3 = epoch_order(2, 0, 384, batch_size=6, labels=three, window_batches=64)
    assert all(np.bincount(three[order3[i:i + 6]], minlength=3).tolist() == [2, 2, 2] for i in range(0, 384, 6))


def test_stratified_runs_record_their_order_and_resume_exactly(tiny_program, tmp_path: Path) -> None:
    # prepare
    events: list[Event] = []
    straight = run_training(config(tiny_program, tmp_path / "straight", batches="stratified"), on_event=events.append)
    shuffled = run_training(config(tiny_program, tmp_path / "shuffled", batches="shuffled"))
    # execute: 5 stratified steps, then a resume that names no order (the checkpoint's holds)
    run_training(config(tiny_program, tmp_path / "split", steps=5, batches="stratified"))
    saved = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    resumed = run_training(config(tiny_program, tmp_path / "split", resume=True))
    # assert
    assert isinstance(events[0], Start) and events[0].batches == "stratified"
    assert saved["batches"] == "stratified"
    assert np.array_equal(resumed.b, straight.b) and not np.array_equal(straight.b, shuffled.b)
    with pytest.raises(InputError, match="batches 'sorted': choose from shuffled, stratified"):
        run_training(config(tiny_program, tmp_path / "bad", batches="sorted"))


# -- tail averaging ---------------------------------------------------------------------


def test_tail_averaging_delivers_the_mean_of_the_iterates_after_its_start(tiny_program, tmp_path: Path) -> None:
    # prepare: the last b after each of steps 7..10 of a plain run
    iterates = [run_training(config(tiny_program, tmp_path / f"plain{n}", steps=n, eval_every=0)).b for n in (7, 8, 9, 10)]
    events: list[Event] = []
    # execute: the same run, averaging after step 6
    averaged = run_training(config(tiny_program, tmp_path / "averaged", average_from=6), on_event=events.append)
    # assert: the result and the adapter are the mean of those four b's, not the last one
    np.testing.assert_allclose(averaged.b, np.mean(iterates, axis=0), rtol=0, atol=1e-7)
    assert not np.allclose(averaged.b, iterates[-1])
    tensors = load_file(averaged.adapter_dir / "adapter_model.safetensors")
    slot = tiny_program.export.manifest.b_layout[0]
    np.testing.assert_array_equal(tensors[slot.peft_b_key], averaged.b[slot.offset:slot.offset + slot.size].reshape(slot.shape))
    # evaluations before the tail report one accuracy; after it, the mean's and the last b's
    evals = {e.step: e for e in events if isinstance(e, Eval)}
    assert evals[5].averaged_steps is None and evals[5].last_iterate_accuracy is None
    assert evals[10].averaged_steps == 4 and 0.0 <= evals[10].last_iterate_accuracy <= 1.0


def test_tail_averaging_resumes_exactly_from_an_interrupt(tiny_program, tmp_path: Path) -> None:
    straight = run_training(config(tiny_program, tmp_path / "straight", average_from=3))
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_program, out, average_from=3), on_event=interrupt_at_step_7)
    saved = json.loads((out / "checkpoint.json").read_text())
    resumed = run_training(config(tiny_program, out, resume=True))  # the averaging comes from the checkpoint
    assert saved["average_from"] == 3 and saved["averaged_steps"] == 4
    assert np.array_equal(resumed.b, straight.b)


def test_tail_averaging_refuses_a_bad_start_or_a_change_midway(tiny_program, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="average_from 10"):
        run_training(config(tiny_program, tmp_path / "late", average_from=10))
    run_training(config(tiny_program, tmp_path / "run", steps=6, average_from=3))
    with pytest.raises(InputError, match="averages from step 3"):
        run_training(config(tiny_program, tmp_path / "run", resume=True, average_from=4))


def test_a_checkpoint_without_the_averaging_or_batch_order_fields_still_resumes(tiny_program, tmp_path: Path) -> None:
    # prepare: a checkpoint as the trainer wrote it before tail averaging existed
    out = tmp_path / "old"
    run_training(config(tiny_program, out, steps=5))
    with np.load(out / "checkpoint.npz") as data:
        b = data["b"]
        meta = json.loads(str(data["meta"]))
    for key in ("average_from", "averaged_steps", "batches"):
        del meta[key]
    np.savez(out / "checkpoint.npz", b=b, meta=np.array(json.dumps(meta)))
    # execute + assert: it continues to the same b as a straight run
    resumed = run_training(config(tiny_program, out, resume=True))
    assert np.array_equal(resumed.b, run_training(config(tiny_program, tmp_path / "straight")).b)


# -- the round API ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tiny_program) -> Program:
    return Program(tiny_program.pte)


@pytest.fixture(scope="module")
def train(program: Program) -> Split:
    return program.load_data()["train"]


def global_b(program: Program, seed: int = 11) -> np.ndarray:
    """[P] a non-zero global b, as a round after the first receives it."""
    return (np.random.default_rng(seed).standard_normal(program.b_size) * 0.05).astype(np.float32)


def test_two_rounds_of_k_steps_are_one_run_of_2k_that_carries_b_over(tiny_program, program: Program,
                                                                     train: Split, tmp_path: Path) -> None:
    lr, eps, k = program.manifest.lr, program.manifest.eps, 3
    # prepare: `deftly train`'s own run of 2k steps from b = 0
    local = run_training(config(tiny_program, tmp_path / "local", steps=2 * k, eval_every=0))
    # execute: two rounds of k from b = 0, the coordinator merging the block's slice in between
    trainer = Trainer.fresh(program, train)
    b = np.zeros(program.b_size, dtype=np.float32)
    for round_number in (1, 2):
        trainer.start_round(b, lr=lr, eps=eps, round=round_number, steps=k)
        events = trainer.run()
        assert [e.step for e in events] == [k * (round_number - 1) + i for i in range(1, k + 1)]
        assert {e.round for e in events} == {round_number} and trainer.steps_left == 0
        b = merge_b(b, program.manifest.b_layout, {trainer.span: trainer.block_b})
    # and from a given non-zero b: two rounds of k, and one round of 2k
    b0 = global_b(program)
    in_rounds = Trainer.fresh(program, train, seed=4)
    in_rounds.start_round(b0, lr=lr, eps=eps, round=0, steps=k)
    in_rounds.run()
    in_rounds.start_round(in_rounds.b, lr=lr, eps=eps, round=1, steps=k)
    in_rounds.run()
    at_once = Trainer.fresh(program, train, seed=4)
    at_once.start_round(b0, lr=lr, eps=eps, round=0, steps=2 * k)
    at_once.run()
    # assert: bit-identical, and the given b mattered
    assert trainer.span.size == program.b_size  # today's programs: the block is every trainable layer
    assert np.array_equal(b, local.b)
    assert np.array_equal(in_rounds.block_b, at_once.block_b)
    assert not np.array_equal(at_once.block_b, trainer.block_b)


def test_a_state_saved_mid_round_and_restored_repeats_the_same_steps(program: Program, train: Split,
                                                                     tmp_path: Path) -> None:
    # prepare: a round of 6 steps, saved after step 3 (as bytes and as a file)
    trainer = Trainer.fresh(program, train, seed=2, batches="stratified")
    trainer.start_round(global_b(program), lr=0.02, eps=0.01, round=5, steps=6)
    trainer.run(3)
    saved = trainer.to_bytes()
    trainer.save(tmp_path / "round.npz")
    rest = trainer.run()
    # execute: as an agent killed after step 3 and started again would
    from_bytes = Trainer.restore(Program(program.manifest_path), train, saved)
    from_file = Trainer.restore(program, train, tmp_path / "round.npz")
    assert from_bytes.steps_left == from_file.steps_left == 3
    again = from_bytes.run()
    from_file.run()
    # assert: the same steps, bit for bit
    assert [(e.step, e.loss, e.g_abs_mean, e.lr, e.round) for e in again] == \
        [(e.step, e.loss, e.g_abs_mean, e.lr, e.round) for e in rest]
    assert np.array_equal(from_bytes.block_b, trainer.block_b) and np.array_equal(from_file.b, trainer.b)
    # another data shard does not restore this state
    other = Split(train.input_ids[::-1].copy(), train.lengths[::-1].copy(), train.labels[::-1].copy())
    with pytest.raises(InputError, match="train_sha256"):
        Trainer.restore(program, other, saved)
    with pytest.raises(InputError, match="not a readable deftly checkpoint"):
        Trainer.restore(program, train, saved[:100])


def test_a_state_saved_before_the_window_was_recorded_resumes_to_the_legacy_order(program: Program,
                                                                                   train: Split) -> None:
    # prepare: 12 steps straight with the legacy window of 64 batches, and 6 saved without the field
    assert program.buckets == [16, 32] and len(set(np.searchsorted([16, 32], train.lengths))) == 2
    legacy = Trainer.fresh(program, train, seed=3)
    legacy.state.bucket_window = LEGACY_BUCKET_WINDOW_BATCHES
    legacy.start_round(global_b(program), lr=0.02, eps=0.01, round=1, steps=12)
    legacy_steps = legacy.run()
    old = Trainer.fresh(program, train, seed=3)
    old.state.bucket_window = LEGACY_BUCKET_WINDOW_BATCHES
    old.start_round(global_b(program), lr=0.02, eps=0.01, round=1, steps=12)
    old.run(6)
    with np.load(io.BytesIO(old.to_bytes())) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop("meta")))
    del meta["bucket_window"]
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    # execute: restore it, and a fresh trainer with today's window
    restored = Trainer.restore(program, train, buffer.getvalue())
    resumed_steps = restored.run()
    fresh = Trainer.fresh(program, train, seed=3)
    fresh.start_round(global_b(program), lr=0.02, eps=0.01, round=1, steps=12)
    fresh_steps = fresh.run()
    # assert: the restored state continues the legacy order bit for bit; a fresh one takes
    # today's window, whose batches run at other lengths
    assert restored.state.bucket_window == LEGACY_BUCKET_WINDOW_BATCHES != fresh.state.bucket_window
    assert fresh.state.bucket_window == BUCKET_WINDOW_BATCHES
    assert [(e.loss, e.seq_len) for e in resumed_steps] == [(e.loss, e.seq_len) for e in legacy_steps[6:]]
    assert np.array_equal(restored.b, legacy.b)
    assert [e.seq_len for e in fresh_steps] != [e.seq_len for e in legacy_steps]


@pytest.mark.parametrize("batches", ["shuffled", "stratified"])
def test_step_lengths_are_the_lengths_the_trainer_runs(program: Program, train: Split, batches: str) -> None:
    # the desktop predicts a run's mix of lengths with step_lengths; a trainer running it agrees
    trainer = Trainer.fresh(program, train, seed=6, batches=batches)
    trainer.start_round(global_b(program), lr=0.02, eps=0.01, round=1, steps=12)
    ran = [e.seq_len for e in trainer.run()]
    predicted = step_lengths(train, program.buckets, program.batch_size, 12, seed=6, batches=batches)
    assert predicted.tolist() == ran and set(ran) == {16, 32}


def test_should_stop_stops_after_the_step_it_answers_and_keeps_every_completed_step(program: Program,
                                                                                    train: Split) -> None:
    # prepare: the reference of 3 steps, and of the whole round
    b0, j, k = global_b(program), 3, 5
    reference = Trainer.fresh(program, train)
    reference.start_round(b0, lr=0.02, eps=0.01, round=1, steps=k)
    reference.run(j)
    b_after_j = reference.b
    reference.run()
    # execute: stop asked once step j is done
    seen: list[Step] = []
    trainer = Trainer.fresh(program, train)
    trainer.start_round(b0, lr=0.02, eps=0.01, round=1, steps=k)
    events = trainer.run(should_stop=lambda: len(seen) == j, on_step=seen.append)
    # assert: j steps done and kept; the round continues from there to the same end
    assert [e.step for e in events] == [e.step for e in seen] == list(range(1, j + 1))
    assert trainer.state.step == j and trainer.steps_left == k - j
    assert np.array_equal(trainer.b, b_after_j)
    trainer.run()
    assert np.array_equal(trainer.block_b, reference.block_b)


def test_a_failing_step_callback_keeps_the_step(program: Program, train: Split) -> None:
    trainer = Trainer.fresh(program, train)
    trainer.start_round(global_b(program), lr=0.02, eps=0.01, round=1, steps=4)

    def link_down(event: Step) -> None:
        if event.step == 2:
            raise ConnectionError("link down")

    with pytest.raises(ConnectionError):
        trainer.run(on_step=link_down)
    assert trainer.state.step == 2 and trainer.steps_left == 2


def test_step_seconds_are_the_trainers_clocks(program: Program, train: Split) -> None:
    # prepare: a clock that advances 0.25 s each time it is read (a simulated device's)
    ticks = itertools.count(start=100.0, step=0.25)
    trainer = Trainer.fresh(program, train, clock=lambda: next(ticks))
    trainer.start_round(global_b(program), lr=0.02, eps=0.01, round=3, steps=3)
    # execute
    events = trainer.run()
    # assert: each step read the clock at its start and its end
    assert [e.seconds for e in events] == [0.25, 0.25, 0.25]


def test_the_trainer_draws_z_of_its_blocks_size_and_writes_back_only_its_slice(program: Program,
                                                                                train: Split) -> None:
    # The block programs (the `step` contract of shared.blocks) take the global b and z of
    # the block's size and return the block's slice. Until they exist, this numpy program
    # keeps that contract over the tiny program's manifest, cut into two blocks.
    manifest = program.manifest
    slots = manifest.b_layout
    assert len(slots) >= 2
    first = slots[0].layer
    layout = [replace(slot, layer=first if i < len(slots) // 2 else first + 1) for i, slot in enumerate(slots)]
    block = block_span(layout, first + 1, first + 1)

    class BlockProgram:
        """The block program's contract in numpy: b_blk_new = b_blk - lr · mean_i(g_i z_i), g_i = z_i · b_blk."""

        def __init__(self) -> None:
            self.manifest = replace(manifest, b_layout=layout, block=block.to_dict())
            self.batch_size, self.q, self.seq_len = program.batch_size, program.q, program.seq_len
            self.buckets, self.bucket_for, self.identity = program.buckets, program.bucket_for, program.identity
            self.calls: list[tuple[np.ndarray, np.ndarray]] = []

        def step(self, input_ids, lengths, labels, b, z, lr, eps):
            self.calls.append((b.copy(), z))
            b_blk = b[block.offset:block.stop]
            g = z @ b_blk  # [q]
            return b_blk - lr * (g @ z) / len(g), float(np.mean(b_blk ** 2)), g

    block_program = BlockProgram()
    b0 = global_b(program)
    trainer = Trainer(block_program, train, Trainer.fresh(program, train, seed=9).state)
    trainer.start_round(b0, lr=0.1, eps=0.01, round=1, steps=2)
    trainer.run()
    # assert: z [q, P_blk] from the seeded stream, the global b given each step, only the slice moved
    (b_first, z_first), (b_second, _) = block_program.calls
    expected_z, _ = draw_z(initial_rng_state(9), program.q, block.size)
    assert block.size < program.b_size and z_first.shape == (program.q, block.size)
    assert np.array_equal(z_first, expected_z) and np.array_equal(b_first, b0)
    assert not np.array_equal(b_second[block.offset:block.stop], b0[block.offset:block.stop])
    outside = np.ones(program.b_size, dtype=bool)
    outside[block.offset:block.stop] = False
    assert np.array_equal(trainer.b[outside], b0[outside]) and np.array_equal(b_second[outside], b0[outside])
    assert np.array_equal(trainer.block_b, trainer.b[block.offset:block.stop])


def test_a_round_refuses_a_global_b_of_the_wrong_size_or_bad_numbers(program: Program, train: Split) -> None:
    trainer = Trainer.fresh(program, train)
    with pytest.raises(InputError, match=rf"round 2: b: shape \(3,\), this job's adapter needs \[{program.b_size}\]"):
        trainer.start_round(np.zeros(3, np.float32), lr=0.01, eps=0.01, round=2, steps=4)
    with pytest.raises(InputError, match="round 2: eps 0"):
        trainer.start_round(global_b(program), lr=0.01, eps=0.0, round=2, steps=4)
    with pytest.raises(InputError, match="steps -1"):
        trainer.start_round(global_b(program), lr=0.01, eps=0.01, round=2, steps=-1)
    with pytest.raises(InputError, match="no round in progress"):
        trainer.run()
    with pytest.raises(InputError, match="fewer than the program's batch size"):
        Trainer.fresh(program, Split(train.input_ids[:1], train.lengths[:1], train.labels[:1]))


# -- evaluation and settings --------------------------------------------------------------


def test_a_program_without_eval_methods_trains_only_without_evaluation(tiny_program, tmp_path: Path) -> None:
    # prepare: the tiny program's files, its manifest saying step methods only (a device's block program)
    shutil.copytree(tiny_program.pte.parent, tmp_path / "prog")
    manifest_path = tmp_path / "prog" / tiny_program.export.manifest_path.name
    data = json.loads(manifest_path.read_text())
    data["methods"] = [name for name in data["methods"] if name.startswith("step")]
    data["method_files"] = {name: file for name, file in data["method_files"].items() if name.startswith("step")}
    manifest_path.write_text(json.dumps(data))
    # execute + assert: evaluation asked of it is refused before anything is written
    with pytest.raises(InputError, match="cannot evaluate.*--no-eval"):
        run_training(config(tiny_program, tmp_path / "refused", program=manifest_path))
    assert not (tmp_path / "refused").exists()
    events: list[Event] = []
    result = run_training(config(tiny_program, tmp_path / "run", program=manifest_path, evaluate=False, steps=4,
                                 eval_every=2), on_event=events.append)
    assert result.test_accuracy is None and result.val_accuracy is None and result.step == 4
    assert [e.step for e in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert not [e for e in events if isinstance(e, (Eval, Test))]
    assert load_file(result.adapter_dir / "adapter_model.safetensors")


@pytest.mark.parametrize("changes, message", [
    ({"eval_limit": 0}, "eval_limit 0: must be at least 1"),
    ({"test_limit": -2}, "test_limit -2: must be at least 1"),
    ({"resident_methods": -1}, "resident_methods -1"),
    ({"seed": -1}, "seed -1"),
    ({"eps": 0.0}, "eps 0.0: must be a finite number above 0"),
    ({"lr": float("nan")}, "lr nan"),
    ({"steps": -1}, "must not be negative"),
    ({"schedule": "step"}, "schedule 'step'"),
])
def test_bad_settings_are_refused_before_anything_is_loaded(tmp_path: Path, changes: dict, message: str) -> None:
    cfg = TrainConfig(program=tmp_path / "absent.pte", out=tmp_path / "run", **changes)
    with pytest.raises(InputError, match=message):
        cfg.check()
    with pytest.raises(InputError, match=message):  # run_training checks first: the program is never looked at
        run_training(cfg)
    assert not (tmp_path / "run").exists()


def test_keeping_every_method_resident_is_zero_or_none(tiny_program, tmp_path: Path) -> None:
    result = run_training(config(tiny_program, tmp_path / "run", steps=2, eval_every=0, resident_methods=0))
    assert result.step == 2


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    steps = [Step(step=s, loss=0.7, g_abs_mean=1.0, seconds=0.1, seq_len=16, rss_mb=100.0, lr=0.01) for s in (1, 2, 3)]
    path.write_text("".join(event_to_line(e) + "\n" for e in steps) + event_to_line(steps[0])[:20])
    truncate_metrics(path, 2)
    assert path.read_text() == "".join(event_to_line(e) + "\n" for e in steps[:2])
    path.write_text("not an event\n" + event_to_line(steps[0]) + "\n")
    with pytest.raises(InputError, match="metrics.jsonl:1"):
        truncate_metrics(path, 2)
