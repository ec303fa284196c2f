"""The `.pte` program through `device_agent.program`: parity with the eager step, eval batching, file checks."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("role", ["program", "weights", "data", "lora_a"])
def test_a_changed_file_is_an_input_error_naming_it(tiny_program, tmp_path: Path, role: str) -> None:
    manifest_path = copy_program(tiny_program, tmp_path / "prog")
    name = tiny_program.export.manifest.files[role]
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
    manifest_path.write_text(json.dumps(data))
    program = Program(manifest_path)
    with pytest.raises(InputError, match="no 'eval' method"):
        program.class_logits(np.zeros((1, program.seq_len), np.int64), np.ones(1, np.int64), np.zeros(program.b_size))
