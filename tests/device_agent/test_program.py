"""The `.pte` program through `device_agent.program`: parity with the eager step, eval batching, file checks."""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.program import Program, resolve_manifest_path
from export.lora import AdapterTensors, LoraFaConfig
from export.prge import PrgeConfig, PrgeProgram
from shared.errors import InputError


def eager_program(tiny_program) -> PrgeProgram:
    """The eager P-RGE module the tiny program was exported from, rebuilt from its manifest."""
    m = tiny_program.export.manifest
    lora = LoraFaConfig(rank=m.rank, alpha=m.alpha, target_modules=tuple(m.target_modules),
                        layers=tuple(m.trainable_layers), seed=tiny_program.config.seed)
    model = tiny_program.loaded.model
    prge = PrgeConfig(q=m.q, batch_size=m.batch_size, seq_len=m.seq_len, loss=m.loss, prefix_sharing=m.prefix_sharing)
    program = PrgeProgram(model, AdapterTensors.build(model, lora), prge, m.verbalizer_token_ids)
    program.class_bias.copy_(torch.tensor(m.class_bias))  # the calibration measured at export
    return program


@pytest.fixture(scope="module")
def program(tiny_program) -> Program:
    return Program(tiny_program.pte)


def copy_program(tiny_program, target: Path) -> Path:
    """A private copy of the tiny program's files; returns its manifest path."""
    shutil.copytree(tiny_program.pte.parent, target)
    return target / tiny_program.export.manifest_path.name


@pytest.mark.parametrize("rows", ["short", "long"])
def test_step_matches_the_eager_step_for_the_same_z(tiny_program, program: Program, rows: str) -> None:
    # prepare: a real batch (all rows within the 16-token bucket, or some longer), a
    # non-zero b and fixed directions; the eager reference always runs at the full T
    train = program.load_data()["train"]
    bs, q, P = program.batch_size, program.q, program.b_size
    rng = np.random.default_rng(3)
    b = (rng.standard_normal(P) * 0.05).astype(np.float32)
    z = rng.standard_normal((q, P), dtype=np.float32)
    short = train.lengths <= 16
    pick = np.flatnonzero(short)[:bs] if rows == "short" else np.flatnonzero(~short)[:bs]
    ids, lengths, labels = train.input_ids[pick], train.lengths[pick], train.labels[pick]
    assert program.bucket_for(int(lengths.max())) == (16 if rows == "short" else 32)
    # execute
    b_new, loss, g = program.step(ids, lengths, labels, b, z, lr=0.05, eps=1e-2)
    with torch.no_grad():
        ref_b, ref_loss, ref_g = eager_program(tiny_program).step(
            torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(labels), torch.from_numpy(b),
            torch.from_numpy(z), torch.tensor([0.05]), torch.tensor([1e-2]))
    # assert: the parity bounds
    assert loss == pytest.approx(ref_loss.item(), rel=1e-4)
    np.testing.assert_allclose(b_new, ref_b.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(g, ref_g.numpy(), rtol=1e-2, atol=1e-3)
    assert b_new.dtype == np.float32 and b_new.shape == (P,) and g.shape == (q,)


@pytest.fixture(scope="module")
def q1_program(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Program:
    """A tiny program with one direction per step and the in-graph-noise method."""
    from export.models import tiny_llama
    from export.program import ExportConfig, export_program

    config = ExportConfig(model="tiny", layers="1-1", q=1, seq_len=32, methods=("step", "step_rng"),
                          length_buckets=(), calibrate="none")
    out = tmp_path_factory.mktemp("q1-program") / "step.pte"
    export_program(config, out, cache_dir=tmp_path_factory.mktemp("q1-cache"),
                   loaded=tiny_llama(num_layers=2, hidden_size=64, tokenizer=smollm2_tokenizer))
    return Program(out)


def test_in_graph_noise_step_is_the_step_with_a_fresh_standard_normal_z(q1_program: Program) -> None:
    # prepare: with q = 1 the update is b_new = b - lr * g * z, so z can be read back off it
    train = q1_program.load_data()["train"]
    ids, lengths, labels = (a[:q1_program.batch_size] for a in (train.input_ids, train.lengths, train.labels))
    b = (np.random.default_rng(5).standard_normal(q1_program.b_size) * 0.05).astype(np.float32)
    lr, eps = 0.5, 1e-2
    # execute
    # z is read back as (b - b1) / (lr g), which needs |g| well above rounding; g is the slope
    # along a fresh random z, so now and then it is near 0 (a run failed here on |g| = 6.8e-4):
    # take the first of a few fresh draws whose g is readable.
    for _ in range(20):
        b1, loss1, g1 = q1_program.step_in_graph_noise(ids, lengths, labels, b, lr, eps)
        if abs(g1[0]) > 1e-3:
            break
    assert abs(g1[0]) > 1e-3, "20 fresh directions all had |g| < 1e-3"
    b2, _, _ = q1_program.step_in_graph_noise(ids, lengths, labels, b, lr, eps)
    z = (b - b1) / (lr * g1[0])  # [P]
    b_ref, loss_ref, g_ref = q1_program.step(ids, lengths, labels, b, z[None, :].astype(np.float32), lr, eps)
    # assert: z is N(0, 1), fresh on every call, and the step with it is the same step
    assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15, (z.mean(), z.std(), z.size)
    assert not np.allclose(b1, b2)
    assert loss1 == pytest.approx(loss_ref, rel=1e-4)
    np.testing.assert_allclose(g1, g_ref, rtol=1e-3, atol=1e-4)
    # The two methods are different compiled graphs: g agrees to float rounding (|g1 - g_ref| up
    # to 6e-6 over 300 fresh z), and each method applies b - lr * g * z with its own g, so the
    # new b's differ by exactly lr * (g_ref - g1) * z, up to ~1.2e-5 where |z_i| is large (an
    # absolute 1e-5 on b failed on one such z). Check that identity, to rounding.
    np.testing.assert_allclose(b1 - b_ref, lr * (g_ref[0] - g1[0]) * z, atol=1e-6, rtol=0)


def test_class_logits_pad_the_last_batch_and_match_eager(tiny_program, program: Program) -> None:
    validation = program.load_data()["validation"]
    n = program.eval_batch_size + 5  # two calls, the second padded
    b = (np.random.default_rng(4).standard_normal(program.b_size) * 0.05).astype(np.float32)
    logits = program.class_logits(validation.input_ids[:n], validation.lengths[:n], b)
    with torch.no_grad():
        reference = eager_program(tiny_program).class_logits(
            torch.from_numpy(validation.input_ids[:n]), torch.from_numpy(validation.lengths[:n]), torch.from_numpy(b))
    assert logits.shape == (n, len(program.manifest.labels))
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-4, rtol=1e-4)
    # the padded call gives the same rows as an unpadded one
    np.testing.assert_array_equal(program.class_logits(validation.input_ids[n - 5:n], validation.lengths[n - 5:n], b),
                                  logits[n - 5:])


def test_class_logits_run_short_rows_at_the_short_bucket_in_the_callers_order(tiny_program) -> None:
    # prepare: short and long rows interleaved, more than one eval batch of each
    program = Program(tiny_program.pte)
    validation = program.load_data()["validation"]
    ebs = program.eval_batch_size
    short, long = np.flatnonzero(validation.lengths <= 16)[:ebs + 3], np.flatnonzero(validation.lengths > 16)[:ebs + 2]
    assert len(short) == ebs + 3 and len(long) == ebs + 2
    rows = np.concatenate([np.ravel(np.column_stack([long, short[:len(long)]])), short[len(long):]])  # long, short, ...
    b = (np.random.default_rng(6).standard_normal(program.b_size) * 0.05).astype(np.float32)
    # execute
    logits = program.class_logits(validation.input_ids[rows], validation.lengths[rows], b)
    # assert: both buckets ran, and every row's logits are the eager model's at the full length
    assert set(program.resident_methods) == {"eval_t16", "eval"}
    with torch.no_grad():
        reference = eager_program(tiny_program).class_logits(
            torch.from_numpy(validation.input_ids[rows]), torch.from_numpy(validation.lengths[rows]),
            torch.from_numpy(b))
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-4, rtol=1e-4)


def test_a_bounded_program_releases_the_least_recently_used_method_and_computes_the_same(
        tiny_program, program: Program) -> None:
    # prepare: one short-bucket and one full-length batch, and an unbounded program to compare with
    bounded = Program(tiny_program.pte, max_resident_methods=1)
    train = program.load_data()["train"]
    rng = np.random.default_rng(4)
    b = (rng.standard_normal(program.b_size) * 0.05).astype(np.float32)
    z = rng.standard_normal((program.q, program.b_size), dtype=np.float32)
    short, long = np.flatnonzero(train.lengths <= 16)[:4], np.flatnonzero(train.lengths > 16)[:4]
    calls = [
        ("step_t16", lambda p: p.step(train.input_ids[short], train.lengths[short], train.labels[short], b, z, 0.05, 1e-2)),
        ("step", lambda p: p.step(train.input_ids[long], train.lengths[long], train.labels[long], b, z, 0.05, 1e-2)),
        ("eval", lambda p: p.class_logits(train.input_ids[long], train.lengths[long], b)),
        ("eval_t16", lambda p: p.class_logits(train.input_ids[short], train.lengths[short], b)),
        ("step_t16", lambda p: p.step(train.input_ids[short], train.lengths[short], train.labels[short], b, z, 0.05, 1e-2)),
    ]
    for method, call in calls:
        # execute
        got, want = call(bounded), call(program)
        # assert: one method at a time, the one just called, and the same numbers
        assert bounded.resident_methods == [method]
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("budget, most_resident", [(125.0, 2), (115.0, 1), (1e9, 3)])
def test_a_memory_budget_keeps_methods_resident_while_one_more_fits(tiny_program, budget, most_resident) -> None:
    # prepare: a resident-memory reading of 100 bytes plus 10 per loaded method
    holder: list[Program] = []
    bounded = Program(tiny_program.pte, memory_budget_bytes=budget,
                      resident_bytes=lambda: 100.0 + 10.0 * len(holder[0].resident_methods))
    holder.append(bounded)
    data = bounded.load_data()
    train = data["train"]
    b = np.zeros(bounded.b_size, dtype=np.float32)
    short, long = np.flatnonzero(train.lengths <= 16)[:4], np.flatnonzero(train.lengths > 16)[:4]
    seen = []
    # execute: three methods in turn, then the first again
    for method, rows in [("eval_t16", short), ("eval", long), ("eval_t16", short)]:
        bounded.class_logits(train.input_ids[rows], train.lengths[rows], b)
        seen.append(list(bounded.resident_methods))
    z = np.zeros((bounded.q, bounded.b_size), dtype=np.float32)
    bounded.step(train.input_ids[long], train.lengths[long], train.labels[long], b, z, 0.05, 1e-2)
    seen.append(list(bounded.resident_methods))
    # assert: a method stays while one more (10 bytes) fits the budget; the least recently used goes first
    assert max(len(s) for s in seen) == min(most_resident, 3)
    assert seen[-1][-1] == "step" and seen[2][-1] == "eval_t16"
    if most_resident == 2:
        assert seen == [["eval_t16"], ["eval_t16", "eval"], ["eval", "eval_t16"], ["eval_t16", "step"]]
    if most_resident == 1:
        assert seen == [["eval_t16"], ["eval"], ["eval_t16"], ["step"]]


def test_a_memory_budget_without_a_resident_reading_is_refused(tiny_program) -> None:
    with pytest.raises(InputError, match="needs a way to read resident memory"):
        Program(tiny_program.pte, memory_budget_bytes=1e9)


def test_a_resident_bound_below_one_is_refused(tiny_program) -> None:
    with pytest.raises(InputError, match="max_resident_methods must be at least 1"):
        Program(tiny_program.pte, max_resident_methods=0)


def test_outputs_do_not_alias_the_methods_memory(program: Program) -> None:
    train = program.load_data()["train"]
    bs, q, P = program.batch_size, program.q, program.b_size
    args = (train.input_ids[:bs], train.lengths[:bs], train.labels[:bs])
    z = np.random.default_rng(0).standard_normal((q, P), dtype=np.float32)
    first, _, _ = program.step(*args, np.zeros(P, np.float32), z, 0.1, 1e-2)
    kept = first.copy()
    program.step(*args, first, -z, 0.1, 1e-2)
    np.testing.assert_array_equal(first, kept)


def test_pte_and_manifest_paths_name_the_same_program(tiny_program) -> None:
    manifest = tiny_program.export.manifest_path
    assert resolve_manifest_path(tiny_program.pte) == manifest == resolve_manifest_path(manifest)
    with pytest.raises(InputError, match="expected a program"):
        resolve_manifest_path(manifest.with_name("step.txt"))
    with pytest.raises(InputError, match="no such program"):
        resolve_manifest_path(manifest.with_name("absent.pte"))


@pytest.mark.parametrize("role", ["step", "eval_t16", "weights", "data", "lora_a"])
def test_a_changed_file_is_an_input_error_naming_it(tiny_program, tmp_path: Path, role: str) -> None:
    manifest_path = copy_program(tiny_program, tmp_path / "prog")
    manifest = tiny_program.export.manifest
    name = manifest.files[role] if role in manifest.files else manifest.method_files[role]
    path = manifest_path.parent / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=f"{name}: sha256 .* does not match"):
        Program(manifest_path)


def test_a_missing_file_is_an_input_error_naming_it(tiny_program, tmp_path: Path) -> None:
    manifest_path = copy_program(tiny_program, tmp_path / "prog")
    weights = tiny_program.export.manifest.files["weights"]
    (manifest_path.parent / weights).unlink()
    with pytest.raises(InputError, match=f"{weights}: missing"):
        Program(manifest_path)


def test_a_method_the_program_lacks_is_an_input_error(tiny_program, tmp_path: Path) -> None:
    manifest_path = copy_program(tiny_program, tmp_path / "prog")
    data = json.loads(manifest_path.read_text())
    data["methods"] = ["step"]
    data["method_files"] = {"step": data["method_files"]["step"]}
    manifest_path.write_text(json.dumps(data))
    program = Program(manifest_path)
    with pytest.raises(InputError, match="no 'eval(_t16)?' method"):
        program.class_logits(np.zeros((1, program.seq_len), np.int64), np.ones(1, np.int64), np.zeros(program.b_size))


def test_running_a_program_does_not_import_the_exporter(tiny_program) -> None:
    # A device runs programs only: executorch.runtime's import chain would load
    # executorch.exir and torchao (136 MB resident on this machine), so the agent must not take it.
    import subprocess
    import sys

    script = f"""
import sys
import numpy as np
from device_agent.program import Program
program = Program({str(tiny_program.pte)!r})
test = program.load_data()["test"]
accuracy = program.accuracy(test, np.zeros(program.b_size, dtype=np.float32), limit=program.eval_batch_size)
heavy = sorted(m for m in ("executorch.exir", "executorch.runtime", "torchao", "transformers") if m in sys.modules)
print(accuracy, ",".join(heavy) or "none")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    accuracy, heavy = done.stdout.split()[-2:]
    assert 0.0 <= float(accuracy) <= 1.0
    assert heavy == "none"


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not (Path("/proc/self/status").exists() and platform.libc_ver()[0] == "glibc"),
                    reason="glibc on Linux: elsewhere return_freed_memory does nothing")
def test_freed_heap_goes_back_to_the_os_between_methods() -> None:
    from device_agent.program import return_freed_memory

    # 64 MiB in heap-sized pieces (below glibc's mmap threshold), all freed but the last,
    # which pins the heap's top so glibc cannot shrink it by itself: a released method's
    # packed weights leave the heap in this state.
    pieces = [bytearray(b"x" * (64 * 1024)) for _ in range(1024)]
    pinned = pieces[-1]
    del pieces
    before = _rss_anon_kib()
    return_freed_memory()
    after = _rss_anon_kib()
    assert before - after > 32 * 1024, (before, after)
    assert pinned[0] == ord("x")


def test_accuracy_with_another_calibration_bias(tiny_program) -> None:
    # An adapter served with the calibration another program measured: its bias replaces the program's.
    program = Program(tiny_program.pte)
    split = program.load_data()["validation"]
    n = 2 * program.eval_batch_size
    b = np.random.default_rng(0).normal(0, 0.1, program.b_size).astype(np.float32)
    own = np.asarray(program.manifest.class_bias, dtype=np.float32)
    assert program.accuracy(split, b, limit=n, class_bias=own) == program.accuracy(split, b, limit=n)
    for favoured in range(len(own)):
        bias = np.zeros_like(own)
        bias[favoured] = 1e4  # every row answers this class
        expected = float((split.labels[:n] == favoured).mean())
        assert program.accuracy(split, b, limit=n, class_bias=bias) == pytest.approx(expected)
    with pytest.raises(ValueError, match="class_bias"):
        program.accuracy(split, b, limit=n, class_bias=np.zeros(len(own) + 1, np.float32))


# -- block programs: what a program refuses ---------------------------------------------------


@pytest.fixture(scope="module")
def block_program(tiny_plan) -> Program:
    return Program(tiny_plan.plan.blocks["L2"].manifest_path)


def _step_args(program: Program):
    train = program.load_data()["train"]
    bs = program.batch_size
    return train.input_ids[:bs], train.lengths[:bs], train.labels[:bs]


def test_a_block_program_knows_its_block_and_takes_the_global_b(block_program: Program) -> None:
    assert (block_program.block.first_layer, block_program.block.last_layer) == (2, 2)
    assert 0 < block_program.block_size < block_program.b_size
    assert block_program.block.offset == block_program.block_size  # layer 1's block comes first
    b = np.zeros(block_program.b_size, np.float32)
    z = np.random.default_rng(0).standard_normal((block_program.q, block_program.block_size), dtype=np.float32)
    b_blk, loss, g = block_program.step(*_step_args(block_program), b, z, 0.1, 1e-2)
    assert b_blk.shape == (block_program.block_size,) and g.shape == (block_program.q,) and loss > 0


def test_a_global_b_of_the_wrong_size_is_an_input_error(block_program: Program) -> None:
    z = np.zeros((block_program.q, block_program.block_size), np.float32)
    block_slice = np.zeros(block_program.block_size, np.float32)  # the block's slice where the global b belongs
    with pytest.raises(InputError, match=rf"b \(the job's global b, .*\): shape \({block_program.block_size},\), "
                                         rf"this job's adapter needs \[{block_program.b_size}\]"):
        block_program.step(*_step_args(block_program), block_slice, z, 0.1, 1e-2)


def test_a_z_over_the_whole_b_is_an_input_error_naming_the_block(block_program: Program) -> None:
    b = np.zeros(block_program.b_size, np.float32)
    z = np.zeros((block_program.q, block_program.b_size), np.float32)
    with pytest.raises(InputError, match=rf"z: shape .*block L2 takes \[{block_program.q}, {block_program.block_size}\]"):
        block_program.step(*_step_args(block_program), b, z, 0.1, 1e-2)


def test_a_manifest_from_another_job_is_refused(tiny_plan, tiny_program) -> None:
    job = tiny_plan.plan.job_key
    Program(tiny_plan.plan.blocks["L1"].manifest_path, job_key=job)  # the same job: accepted
    with pytest.raises(InputError, match=rf"belongs to job {tiny_program.export.manifest.job_key[:12]}, not to job {job[:12]}"):
        Program(tiny_program.export.manifest_path, job_key=job)


def test_a_block_outside_the_layout_is_refused(tiny_plan, tmp_path: Path) -> None:
    source = tiny_plan.plan.blocks["L3"].manifest_path
    shutil.copytree(source.parent, tmp_path / "plan")
    manifest_path = tmp_path / "plan" / source.name
    data = json.loads(manifest_path.read_text())
    for block, message in [({**data["block"], "first_layer": 0, "last_layer": 0}, "layer 0 is not a trainable layer"),
                           ({**data["block"], "offset": data["block"]["offset"] + 1}, "do not match the manifest's layout")]:
        manifest_path.write_text(json.dumps({**data, "block": block}))
        with pytest.raises(InputError, match=message):
            Program(manifest_path)
