"""The local training loop: exact resume, metrics, checkpoints on interruption, the PEFT adapter."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from device_agent.program import Program
from device_agent.trainer import (CALIBRATION_FILE, TrainConfig, class_interleaved, epoch_order, lr_at, next_batch,
                                  run_training, write_adapter)
from shared.errors import InputError

# Small evaluations keep each run well under a second on the tiny program.
FAST = {"eval_limit": 16, "test_limit": 16}


def config(tiny_program, out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"program": tiny_program.pte, "out": out, "steps": 10, "eval_every": 5, **FAST, **changes})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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
    losses = [m["loss"] for m in read_metrics(tmp_path / "straight") if m["kind"] == "step"]
    assert [m["loss"] for m in read_metrics(tmp_path / "split") if m["kind"] == "step"] == losses


def test_interrupt_checkpoints_and_resume_is_exact_with_a_decaying_schedule(tiny_program, tmp_path: Path) -> None:
    # prepare
    straight = run_training(config(tiny_program, tmp_path / "straight", schedule="cosine"))
    out = tmp_path / "interrupted"

    def interrupt_at_step_7(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == 7:
            raise KeyboardInterrupt

    # execute: Ctrl-C after step 7 (between checkpoints), then resume
    with pytest.raises(KeyboardInterrupt):
        run_training(config(tiny_program, out, schedule="cosine"), on_event=interrupt_at_step_7)
    saved = json.loads((out / "checkpoint.json").read_text())
    resumed = run_training(config(tiny_program, out, resume=True))  # schedule comes from the checkpoint
    # assert: the checkpoint held step 7, no temporary file was left, and the result is the straight run's
    assert saved["step"] == 7 and saved["schedule"] == "cosine"
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert np.array_equal(resumed.b, straight.b)
    steps = [m["step"] for m in read_metrics(out) if m["kind"] == "step"]
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
    events: list[dict] = []
    result = run_training(config(tiny_program, tmp_path / "run", lr=0.02, schedule="linear"), on_event=events.append)
    metrics = read_metrics(tmp_path / "run")
    steps = [m for m in metrics if m["kind"] == "step"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in steps] == list(range(1, 11))
    for m in steps:
        assert set(m) == {"kind", "step", "loss", "g_abs_mean", "seconds", "seq_len", "rss_mb", "lr"}
        assert m["loss"] > 0 and m["g_abs_mean"] >= 0 and m["seconds"] > 0 and m["rss_mb"] > 10
        assert m["seq_len"] in (16, 32)
    assert [m["lr"] for m in steps] == pytest.approx([0.02 * (1 - t / 10) for t in range(10)])
    assert [(m["step"], m["examples"]) for m in evals] == [(0, 16), (5, 16), (10, 16)]
    assert metrics[-1]["kind"] == "test" and metrics[-1]["accuracy"] == result.test_accuracy
    assert [e for e in events if e["kind"] in ("step", "eval", "test")] == metrics
    assert events[0]["kind"] == "start" and events[-1]["kind"] == "done"
    assert result.best_val_accuracy == max(m["accuracy"] for m in evals)


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
    # assert: the same examples, and nearly every batch is of one bucket (not so without grouping)
    assert sorted(order.tolist()) == list(range(1000))
    homogeneous = np.mean([len(set(bucket_ids[order[i:i + 4]])) == 1 for i in range(0, 1000, 4)])
    homogeneous_plain = np.mean([len(set(bucket_ids[plain[i:i + 4]])) == 1 for i in range(0, 1000, 4)])
    assert homogeneous > 0.95 > 0.5 > homogeneous_plain


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
    # assert: the same examples; class 1 counts of 2 or 3 in every batch (a plain order
    # also has 0, 1 and 4); still mostly one length bucket per batch
    assert sorted(order.tolist()) == list(range(1000))
    counts = labels[order].reshape(-1, 4).sum(axis=1)  # [250]
    plain_counts = labels[plain].reshape(-1, 4).sum(axis=1)
    assert set(counts.tolist()) == {2, 3} and set(plain_counts.tolist()) >= {0, 1, 2, 3, 4}
    homogeneous = np.mean([len(set(bucket_ids[order[i:i + 4]])) == 1 for i in range(0, 1000, 4)])
    assert homogeneous > 0.9
    # three classes in equal shares over one window of 64 batches of 6: two of each per batch
    three = np.arange(384) % 3
    order3 = epoch_order(2, 0, 384, batch_size=6, labels=three)
    assert all(np.bincount(three[order3[i:i + 6]], minlength=3).tolist() == [2, 2, 2] for i in range(0, 384, 6))


def test_stratified_runs_record_their_order_and_resume_exactly(tiny_program, tmp_path: Path) -> None:
    # prepare
    events: list[dict] = []
    straight = run_training(config(tiny_program, tmp_path / "straight", batches="stratified"), on_event=events.append)
    shuffled = run_training(config(tiny_program, tmp_path / "shuffled", batches="shuffled"))
    # execute: 5 stratified steps, then a resume that names no order (the checkpoint's holds)
    run_training(config(tiny_program, tmp_path / "split", steps=5, batches="stratified"))
    saved = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    resumed = run_training(config(tiny_program, tmp_path / "split", resume=True))
    # assert
    assert events[0]["kind"] == "start" and events[0]["batches"] == "stratified"
    assert saved["batches"] == "stratified"
    assert np.array_equal(resumed.b, straight.b) and not np.array_equal(straight.b, shuffled.b)
    with pytest.raises(InputError, match="batches 'sorted': choose from shuffled, stratified"):
        run_training(config(tiny_program, tmp_path / "bad", batches="sorted"))


# -- tail averaging ---------------------------------------------------------------------


def test_tail_averaging_delivers_the_mean_of_the_iterates_after_its_start(tiny_program, tmp_path: Path) -> None:
    # prepare: the last b after each of steps 7..10 of a plain run
    iterates = [run_training(config(tiny_program, tmp_path / f"plain{n}", steps=n, eval_every=0)).b for n in (7, 8, 9, 10)]
    events: list[dict] = []
    # execute: the same run, averaging after step 6
    averaged = run_training(config(tiny_program, tmp_path / "averaged", average_from=6), on_event=events.append)
    # assert: the result and the adapter are the mean of those four b's, not the last one
    np.testing.assert_allclose(averaged.b, np.mean(iterates, axis=0), rtol=0, atol=1e-7)
    assert not np.allclose(averaged.b, iterates[-1])
    tensors = load_file(averaged.adapter_dir / "adapter_model.safetensors")
    slot = tiny_program.export.manifest.b_layout[0]
    np.testing.assert_array_equal(tensors[slot.peft_b_key], averaged.b[slot.offset:slot.offset + slot.size].reshape(slot.shape))
    # evaluations before the tail report one accuracy; after it, the mean's and the last b's
    evals = {e["step"]: e for e in events if e["kind"] == "eval"}
    assert "averaged_steps" not in evals[5]
    assert evals[10]["averaged_steps"] == 4 and 0.0 <= evals[10]["last_iterate_accuracy"] <= 1.0


def test_tail_averaging_resumes_exactly_from_an_interrupt(tiny_program, tmp_path: Path) -> None:
    straight = run_training(config(tiny_program, tmp_path / "straight", average_from=3))
    out = tmp_path / "interrupted"

    def interrupt_at_step_7(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == 7:
            raise KeyboardInterrupt

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
