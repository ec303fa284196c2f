"""Exported programs: files, manifest, the lowering cache, weights shared across block sets, block programs."""
from __future__ import annotations

import json

import pytest

from export.program import DEFAULT_BATCHES, DEFAULT_EPS, DEFAULT_LR, ExportConfig, export_program
from shared.hashing import sha256_file
from shared.errors import InputError
from shared.manifest import Manifest
from shared.task_data import load_splits

PROGRAM_BYTES_TARGET = 5_000_000  # what a device holding the weights receives for a new block set


@pytest.fixture(scope="module")
def other_block(tiny_program, tmp_path_factory):
    """The same tiny model exported for a different block (layer 0), twice into one cache."""
    cache = tmp_path_factory.mktemp("cache-other-block")
    config = ExportConfig(model="tiny", layers="0-0", seq_len=32, methods=("step", "eval"))
    first = export_program(config, tmp_path_factory.mktemp("a") / "block0.pte", cache_dir=cache,
                           on_progress=OTHER_BLOCK_EVENTS["first"].append, loaded=tiny_program.loaded)
    again = export_program(config, tmp_path_factory.mktemp("b") / "block0.pte", cache_dir=cache,
                           on_progress=OTHER_BLOCK_EVENTS["again"].append, loaded=tiny_program.loaded)
    return first, again


OTHER_BLOCK_EVENTS: dict[str, list] = {"first": [], "again": []}  # the progress events of each export


def ended(events, stage: str) -> list:
    """The events that finished ``stage``."""
    return [e for e in events if e.stage == stage and e.state == "end"]


def test_manifest_describes_the_program(tiny_program) -> None:
    manifest = Manifest.load(tiny_program.export.manifest_path)
    assert manifest.trainable_layers == [1]
    assert manifest.methods == ["step", "eval", "step_t16", "eval_t16"]
    assert manifest.step_buckets == {"16": "step_t16", "32": "step"}
    assert manifest.eval_buckets == {"16": "eval_t16", "32": "eval"}
    assert (manifest.q, manifest.batch_size, manifest.seq_len) == (4, 4, 32)
    assert manifest.labels == ["rotten", "fresh"]
    assert manifest.b_size == sum(slot.size for slot in manifest.b_layout) > 0
    for role, name in manifest.files.items():
        path = tiny_program.export.manifest_path.parent / name
        assert manifest.sha256[name] == sha256_file(path), role
    assert manifest.peft_config["r"] == manifest.rank
    assert manifest.peft_config["layers_to_transform"] == [1]
    # a single-device program trains the block of every trainable layer, one file per method
    assert manifest.block == {"first_layer": 1, "last_layer": 1, "offset": 0, "size": manifest.b_size}
    assert sorted(manifest.method_files) == sorted(manifest.methods)
    assert len(set(manifest.method_files.values())) == len(manifest.methods) and len(manifest.job_key) == 24


def test_a_manifests_batch_order_is_checked_and_defaults_to_shuffled(tiny_program) -> None:
    data = json.loads(tiny_program.export.manifest_path.read_text())
    assert Manifest.from_json(json.dumps({**data, "batches": "stratified"})).batches == "stratified"
    with pytest.raises(InputError, match="batches 'sorted', expected one of shuffled, stratified"):
        Manifest.from_json(json.dumps({**data, "batches": "sorted"}))
    del data["batches"]
    assert Manifest.from_json(json.dumps(data)).batches == "shuffled"


def test_task_data_is_tokenised_for_the_device(tiny_program) -> None:
    manifest = tiny_program.export.manifest
    splits = load_splits(tiny_program.export.files["data"])
    assert set(splits) == {"train", "validation", "test"}
    train = splits["train"]
    assert train.input_ids.shape[1] == manifest.seq_len
    assert (train.lengths >= 1).all() and (train.lengths <= manifest.seq_len).all()
    assert set(train.labels.tolist()) == {0, 1}


def test_program_is_small_and_weights_live_outside(tiny_program) -> None:
    files = tiny_program.export.files
    program_bytes = sum(path.stat().st_size for path in tiny_program.export.method_files.values())
    assert program_bytes < PROGRAM_BYTES_TARGET
    assert files["weights"].stat().st_size > 10 * program_bytes


def test_a_new_block_set_reuses_the_same_weights_file(tiny_program, other_block) -> None:
    first, _ = other_block
    # Same base model, different trainable layers: the weights file is byte-identical,
    # so a device that holds it receives only the small .pte.
    assert first.files["weights"].name == tiny_program.export.files["weights"].name
    assert sha256_file(first.files["weights"]) == sha256_file(tiny_program.export.files["weights"])
    assert first.manifest.cache_key != tiny_program.export.manifest.cache_key


def test_the_same_export_is_never_lowered_twice(other_block) -> None:
    first, again = other_block
    assert not first.from_cache and again.from_cache
    for method in first.method_files:
        assert sha256_file(first.method_files[method]) == sha256_file(again.method_files[method])
    assert ended(OTHER_BLOCK_EVENTS["first"], "lower") and not ended(OTHER_BLOCK_EVENTS["again"], "lower")
    assert again.seconds < first.seconds


def test_the_calibration_is_measured_once_per_model_and_prompts(other_block) -> None:
    first, again = other_block
    # The first export measured the bias; the second read the same numbers from the cache.
    (measured,) = ended(OTHER_BLOCK_EVENTS["first"], "calibrate")
    (read,) = ended(OTHER_BLOCK_EVENTS["again"], "calibrate")
    assert measured.message.startswith("class bias") and read.message.startswith("calibration found in the cache")
    assert again.manifest.class_bias == first.manifest.class_bias and any(first.manifest.class_bias)


def test_an_unreadable_cached_calibration_is_measured_again(tiny_program, tmp_path) -> None:
    import numpy as np

    from export.cache import cached_class_bias

    # prepare: training prompts, an empty cache, and a measurement that counts its calls
    train = load_splits(tiny_program.export.files["data"])["train"]
    calls: list[int] = []

    def measure() -> list[float]:
        calls.append(1)
        return [0.25, -0.25]

    def cached() -> tuple[list[float], bool]:
        return cached_class_bias(measure, tmp_path, ["fingerprint", "fp32"], train.input_ids[:8], train.lengths[:8],
                                 classes=2)

    # execute: measure, read, spoil the cached file, measure again
    first, second = cached(), cached()
    (path,) = (tmp_path / "calibration").glob("*.json")
    path.write_text("{not json")
    third = cached()
    # assert: measured twice (the spoilt file was not read), read once, and readable again
    assert (first, second, third) == (([0.25, -0.25], False), ([0.25, -0.25], True), ([0.25, -0.25], False))
    assert len(calls) == 2 and json.loads(path.read_text())["class_bias"] == [0.25, -0.25]
    # other prompts are another key
    other = cached_class_bias(measure, tmp_path, ["fingerprint", "fp32"], np.flip(train.input_ids[:8], 0),
                              train.lengths[:8][::-1], classes=2)
    assert other == ([0.25, -0.25], False) and len(calls) == 3


def test_out_must_be_a_pte(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="must end in .pte"):
        export_program(ExportConfig(model="tiny"), tmp_path / "step.bin", loaded=tiny_program.loaded)


def test_manifest_round_trips_and_rejects_garbage(tiny_program, tmp_path) -> None:
    manifest = tiny_program.export.manifest
    assert Manifest.from_json(manifest.to_json()) == manifest
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 999}))
    with pytest.raises(InputError, match="manifest version 999"):
        Manifest.load(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Manifest.load(bad)


def test_int8_base_weights_run_in_executorch_as_in_eager_and_close_to_fp32(tiny_program, tmp_path) -> None:
    # prepare: the tiny model's layer-1 program with int8 frozen linears, and its eager twins
    import numpy as np
    import torch

    from device_agent.program import Program
    from export.int8 import int8_base
    from export.lora import AdapterTensors
    from export.prge import PrgeProgram

    config = ExportConfig(model="tiny", layers="1-1", seq_len=32, methods=("step",), length_buckets=(),
                          calibrate="none", base_weights="int8")
    fp32_model = tiny_program.loaded.model
    # execute
    result = export_program(config, tmp_path / "int8.pte", cache_dir=tmp_path / "cache", loaded=tiny_program.loaded)
    program = Program(result.manifest_path)
    train = program.load_data()["train"]
    rng = np.random.default_rng(6)
    b = (rng.standard_normal(program.b_size) * 0.05).astype(np.float32)
    z = rng.standard_normal((program.q, program.b_size), dtype=np.float32)
    rows = np.flatnonzero(train.lengths > 16)[:program.batch_size]
    args = (train.input_ids[rows], train.lengths[rows], train.labels[rows], b, z)
    b_et, loss_et, g_et = program.step(*args, lr=0.05, eps=1e-2)
    lora = config.lora(fp32_model.config.num_hidden_layers)
    torch_args = [torch.from_numpy(a) for a in args] + [torch.tensor([0.05]), torch.tensor([1e-2])]
    with torch.no_grad():
        # the eager twin of the program: the same smoothed int8 model and scaled A's
        int8_model, program_adapter = int8_base(fp32_model, AdapterTensors.build(fp32_model, lora), train,
                                                config.int8_smoothing, config.smoothing_examples)
        b_int8, loss_int8, g_int8 = PrgeProgram(int8_model, program_adapter, config.prge(),
                                                result.manifest.verbalizer_token_ids).step(*torch_args)
        _, loss_fp32, _ = PrgeProgram(fp32_model, AdapterTensors.build(fp32_model, lora), config.prge(),
                                      result.manifest.verbalizer_token_ids).step(*torch_args)
    # assert: recorded, keyed apart from fp32, the same numbers as eager int8, near fp32;
    # the caller's model stays fp32
    assert result.manifest.base_weights == "int8" and tiny_program.export.manifest.base_weights == "fp32"
    # int8 programs suggest their own perturbation scale (their activations round under ±eps)
    assert result.manifest.eps == DEFAULT_EPS["int8"] and tiny_program.export.manifest.eps == DEFAULT_EPS["fp32"]
    # ... and their own learning rate and batch order (chosen on validation, session 12)
    assert (result.manifest.lr, result.manifest.batches) == (DEFAULT_LR["int8"], DEFAULT_BATCHES["int8"])
    assert (tiny_program.export.manifest.lr, tiny_program.export.manifest.batches) == (DEFAULT_LR["fp32"], "shuffled")
    assert result.manifest.cache_key != tiny_program.export.manifest.cache_key
    assert loss_et == pytest.approx(loss_int8.item(), rel=3e-4)
    # Not fp32's 1e-4 on the loss and 1e-5 on b: XNNPACK and torchao round the per-token
    # activation scales differently (measured: loss 1.0e-4 relative apart with the int8
    # embedding), and g = (L+ - L-) / (2 eps) turns a 1e-6 loss difference into 5e-5.
    np.testing.assert_allclose(g_et, g_int8.numpy(), rtol=0, atol=0.05 * float(np.abs(g_int8.numpy()).max()))
    np.testing.assert_allclose(b_et, b_int8.numpy(), atol=2e-3, rtol=0)  # the update itself is ~1.5e-2
    assert loss_et == pytest.approx(loss_fp32.item(), rel=2e-2)
    assert type(fp32_model.model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter
    # the int8 layers and int8 embedding travel in the shared weights file, not inside the
    # per-device program, and the embedding is no longer fp32 there
    int8_bytes = sum(m.weight.numel() for name, m in fp32_model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}")
    vocab, hidden = fp32_model.model.embed_tokens.weight.shape
    weights_bytes = result.files["weights"].stat().st_size
    assert vocab * hidden + int8_bytes <= weights_bytes < vocab * hidden * 4
    assert result.method_files["step"].stat().st_size < int8_bytes


def test_int8_row_embedding_rounds_each_row_to_within_half_its_step() -> None:
    import torch

    from export.int8 import Int8RowEmbedding

    weight = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 50).unsqueeze(1)  # rows of very different scale
    embedding = Int8RowEmbedding(weight)
    ids = torch.tensor([[0, 7, 49], [3, 3, 20]])
    got = embedding(ids)  # [2, 3, 16]
    step = weight.abs().amax(dim=1, keepdim=True) / 127  # [50, 1]
    assert got.shape == (2, 3, 16) and embedding.weight_int8.dtype == torch.int8
    assert ((got - weight[ids]).abs() <= step[ids] / 2 + 1e-7).all()


def test_unknown_base_weights_are_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="expected fp32 or int8"):
        export_program(ExportConfig(model="tiny", layers="1-1", base_weights="int4"), tmp_path / "x.pte", loaded=tiny_program.loaded)


def test_a_smoothing_strength_outside_0_to_1_is_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="--int8-smoothing 1.5: expected a value between 0 and 1"):
        export_program(ExportConfig(model="tiny", layers="1-1", base_weights="int8", int8_smoothing=1.5),
                       tmp_path / "x.pte", loaded=tiny_program.loaded)


def test_explicit_eps_lr_and_batches_override_the_weights_defaults() -> None:
    assert ExportConfig(base_weights="int8").suggested_eps() == DEFAULT_EPS["int8"] > DEFAULT_EPS["fp32"]
    assert ExportConfig(base_weights="int8", eps=0.05).suggested_eps() == 0.05
    assert ExportConfig().suggested_eps() == DEFAULT_EPS["fp32"]
    assert ExportConfig(base_weights="int8").suggested_lr() == DEFAULT_LR["int8"]
    assert ExportConfig(base_weights="int8", lr=0.05).suggested_lr() == 0.05
    assert ExportConfig().suggested_lr() == DEFAULT_LR["fp32"]
    assert ExportConfig(base_weights="int8", batches="shuffled").suggested_batches() == "shuffled"
    assert ExportConfig(batches="stratified").suggested_batches() == "stratified"


def test_an_unknown_batch_order_is_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="--batches 'sorted': choose from shuffled, stratified"):
        export_program(ExportConfig(model="tiny", layers="1-1", batches="sorted"), tmp_path / "x.pte",
                       loaded=tiny_program.loaded)


def test_an_unknown_delegate_is_refused() -> None:
    with pytest.raises(InputError, match="delegate 'gpu': expected one of xnnpack, portable"):
        ExportConfig(delegate="gpu").check()


def test_a_portable_program_has_no_delegate_and_steps_as_the_xnnpack_one(tiny_program, tmp_path) -> None:
    import numpy as np
    from dataclasses import replace

    from device_agent.program import Program

    # The step method only (no buckets, no eval), lowered in this process: what an emulated device runs.
    # Both exported here, one after the other from the same model, so only the delegate differs.
    config = replace(tiny_program.config, delegate="portable", methods=("step",), length_buckets=())
    portable = export_program(config, tmp_path / "portable" / "step.pte", cache_dir=tmp_path / "cache",
                              loaded=tiny_program.loaded, workers=1)
    xnnpack = export_program(replace(config, delegate="xnnpack"), tmp_path / "xnnpack" / "step.pte",
                             cache_dir=tmp_path / "cache", loaded=tiny_program.loaded, workers=1)
    assert b"XnnpackBackend" in xnnpack.method_files["step"].read_bytes()
    assert b"XnnpackBackend" not in portable.method_files["step"].read_bytes()
    # the frozen weights still go to the shared .ptd: the step file holds only the program's own constants
    assert portable.method_files["step"].stat().st_size < portable.files["weights"].stat().st_size / 2
    # never served from the XNNPACK program's cache entries, but the same job
    assert not xnnpack.from_cache
    assert portable.manifest.cache_key != xnnpack.manifest.cache_key
    assert portable.manifest.job_key == xnnpack.manifest.job_key

    programs = [Program(xnnpack.manifest_path), Program(portable.manifest_path)]
    train = programs[0].load_data()["train"]
    bs, q, size = programs[0].batch_size, programs[0].q, programs[0].b_size
    z = np.random.default_rng(0).standard_normal((q, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal(size, dtype=np.float32) * 0.01
    (b_x, loss_x, g_x), (b_p, loss_p, g_p) = (p.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs],
                                                      b, z, 0.1, 0.01) for p in programs)
    assert loss_p == pytest.approx(loss_x, abs=1e-5)
    np.testing.assert_allclose(g_p, g_x, atol=1e-4)
    np.testing.assert_allclose(b_p, b_x, atol=1e-5)


def test_an_older_manifest_is_refused_with_a_message_to_export_again(tiny_program, tmp_path) -> None:
    data = json.loads(tiny_program.export.manifest_path.read_text())
    old = tmp_path / "old.manifest.json"
    old.write_text(json.dumps({**data, "version": 1}))
    with pytest.raises(InputError, match=r"manifest version 1, written by an older deftly.*export the program again"):
        Manifest.load(old)


def test_embedded_weights_are_cached_too(tiny_program, tmp_path) -> None:
    # The weights inside the .pte: no .ptd anywhere, and the second export finds the program lowered.
    config = ExportConfig(model="tiny", layers="1-1", seq_len=32, methods=("step", "eval"), length_buckets=(),
                          external_weights=False, calibrate="none")
    first = export_program(config, tmp_path / "a" / "embedded.pte", cache_dir=tmp_path / "cache",
                           loaded=tiny_program.loaded)
    again = export_program(config, tmp_path / "b" / "embedded.pte", cache_dir=tmp_path / "cache",
                           loaded=tiny_program.loaded)
    assert not first.from_cache and again.from_cache
    assert "weights" not in again.files and not list((tmp_path / "b").glob("*.ptd"))
    assert set(again.method_files.values()) == {tmp_path / "b" / "embedded.pte"}  # one file, both methods
    assert again.method_files["step"].stat().st_size > tiny_program.export.files["weights"].stat().st_size / 2


# -- block programs --------------------------------------------------------------------------


def _programs(tiny_plan):
    from device_agent.program import Program

    blocks = {name: Program(result.manifest_path) for name, result in tiny_plan.plan.blocks.items()}
    return blocks, Program(tiny_plan.plan.eval.manifest_path), Program(tiny_plan.whole.manifest_path)


def _batch(program, seed: int):
    import numpy as np

    train = program.load_data()["train"]
    rows = np.flatnonzero(train.lengths > 8)[seed * program.batch_size:(seed + 1) * program.batch_size]
    return train.input_ids[rows], train.lengths[rows], train.labels[rows]


def test_a_plan_gives_each_device_its_step_and_the_coordinator_one_eval(tiny_plan) -> None:
    from shared.blocks import BlockSpan, spans_for

    plan, layout = tiny_plan.plan, tiny_plan.whole.manifest.b_layout
    assert list(plan.blocks) == ["L1", "L2", "L3"]
    spans = [BlockSpan.from_dict(r.manifest.block) for r in plan.blocks.values()]
    # the blocks of the plan cover the job's layout exactly once
    assert spans == spans_for(layout, [(1, 1), (2, 2), (3, 3)])
    assert sum(s.size for s in spans) == tiny_plan.whole.manifest.b_size
    for result in plan.blocks.values():
        manifest = result.manifest
        assert manifest.methods == ["step"] and manifest.b_layout == layout and manifest.b_size == sum(
            slot.size for slot in layout)
        assert "lora_a" not in manifest.files  # a device does not write the adapter
    assert plan.eval.manifest.methods == ["eval"] and "lora_a" in plan.eval.manifest.files
    # one job: every manifest carries the same key, the single-device program's too
    keys = {r.manifest.job_key for r in (*plan.blocks.values(), plan.eval, tiny_plan.whole)}
    assert len(keys) == 1 and plan.job_key in keys
    # shared: one weights file and one data file for all four programs
    assert len({r.files["weights"] for r in (*plan.blocks.values(), plan.eval)}) == 1
    assert len({r.files["data"] for r in (*plan.blocks.values(), plan.eval)}) == 1
    assert (plan.lowered, plan.cached, plan.workers) == (4, 0, 2)
    # the single-device program found the plan's eval lowered and lowered only its step
    assert sha256_file(tiny_plan.whole.method_files["eval"]) == sha256_file(plan.eval.method_files["eval"])
    # progress: every method's lowering was reported with its time, the fraction only grows
    lowered = {(e.program, e.method) for e in tiny_plan.events if e.stage == "lower" and e.state == "end"}
    assert lowered == {("L1", "step"), ("L2", "step"), ("L3", "step"), ("eval", "eval")}
    fractions = [e.fraction for e in tiny_plan.events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and tiny_plan.events[-1].stage == "done"


def test_a_block_program_fed_the_global_b_computes_the_all_layers_programs_step(tiny_plan) -> None:
    import numpy as np

    # prepare: a global b with every block non-zero (as after a round), z on each block
    blocks, _, whole = _programs(tiny_plan)
    rng = np.random.default_rng(11)
    b = (rng.standard_normal(whole.b_size) * 0.05).astype(np.float32)
    for seed, (name, program) in enumerate(blocks.items()):
        span = program.block
        ids, lengths, labels = _batch(program, seed)
        z = rng.standard_normal((program.q, span.size), dtype=np.float32)
        z_whole = np.zeros((whole.q, whole.b_size), np.float32)
        z_whole[:, span.offset:span.stop] = z  # the same directions, zero outside the block
        # execute
        b_blk, loss, g = program.step(ids, lengths, labels, b, z, lr=0.05, eps=1e-2)
        b_all, loss_all, g_all = whole.step(ids, lengths, labels, b, z_whole, lr=0.05, eps=1e-2)
        zero_blk, zero_loss, _ = program.step(ids, lengths, labels, b, np.zeros_like(z), lr=0.05, eps=1e-2)
        _, zero_loss_all, _ = whole.step(ids, lengths, labels, b, np.zeros_like(z_whole), lr=0.05, eps=1e-2)
        # assert: the same loss (at b itself too), the same g, the same new slice
        assert b_blk.shape == (span.size,), name
        assert loss == pytest.approx(loss_all, rel=1e-4), name
        assert zero_loss == pytest.approx(zero_loss_all, rel=1e-4), name
        np.testing.assert_allclose(g, g_all, rtol=1e-2, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(b_blk, b_all[span.offset:span.stop], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_array_equal(zero_blk, b[span.offset:span.stop])
        # the all-layers update with z zero outside the block leaves the rest of b where it was
        outside = np.ones(whole.b_size, bool)
        outside[span.offset:span.stop] = False
        np.testing.assert_allclose(b_all[outside], b[outside], atol=1e-7, rtol=0)


def test_a_block_programs_update_is_its_eager_twins_at_a_fixed_z(tiny_plan) -> None:
    import numpy as np
    import torch

    from export.lora import AdapterTensors
    from export.prge import PrgeProgram

    blocks, _, _ = _programs(tiny_plan)
    model, config = tiny_plan.loaded.model, tiny_plan.config
    adapter = AdapterTensors.build(model, config.lora(model.config.num_hidden_layers))
    rng = np.random.default_rng(12)
    b = (rng.standard_normal(adapter.b_size) * 0.05).astype(np.float32)
    for name, program in blocks.items():
        span = program.block
        eager = PrgeProgram(model, adapter, config.prge(), program.manifest.verbalizer_token_ids,
                            block=(span.first_layer, span.last_layer))
        ids, lengths, labels = _batch(program, 0)
        z = rng.standard_normal((program.q, span.size), dtype=np.float32)
        b_blk, loss, g = program.step(ids, lengths, labels, b, z, lr=0.05, eps=1e-2)
        with torch.no_grad():
            ref_b, ref_loss, ref_g = eager.step(*(torch.from_numpy(a) for a in (ids, lengths, labels, b, z)),
                                                torch.tensor([0.05]), torch.tensor([1e-2]))
        assert loss == pytest.approx(ref_loss.item(), rel=1e-4), name
        np.testing.assert_allclose(b_blk, ref_b.numpy(), atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(g, ref_g.numpy(), rtol=1e-2, atol=1e-3, err_msg=name)


def test_the_adapter_of_a_merged_b_loads_in_peft_and_gives_the_eval_programs_logits(tiny_plan, tmp_path) -> None:
    import copy

    import numpy as np
    import torch
    from peft import PeftModel

    from device_agent.trainer import write_adapter
    from shared.blocks import merge_b

    # prepare: one step of every block from b = 0, merged into the global b
    blocks, evaluator, _ = _programs(tiny_plan)
    rng = np.random.default_rng(13)
    b0 = np.zeros(evaluator.b_size, np.float32)
    updates = {}
    for seed, program in enumerate(blocks.values()):
        ids, lengths, labels = _batch(program, seed)
        z = rng.standard_normal((program.q, program.block_size), dtype=np.float32)
        updates[program.block] = program.step(ids, lengths, labels, b0, z, lr=2.0, eps=1e-2)[0]
    merged = merge_b(b0, evaluator.manifest.b_layout, updates)
    assert all(np.abs(merged[span.offset:span.stop]).max() > 0 for span in updates)
    # execute: the coordinator writes the adapter and evaluates the merged b
    write_adapter(evaluator, merged, tmp_path / "adapter")
    validation = evaluator.load_data()["validation"]
    ids, lengths = validation.input_ids[:6], validation.lengths[:6]
    logits = evaluator.class_logits(ids, lengths, merged)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_plan.loaded.model), tmp_path / "adapter").eval()
    with torch.no_grad():
        full = peft_model(input_ids=torch.from_numpy(ids)).logits  # [n, T, V]
    answer = full[torch.arange(len(ids)), torch.from_numpy(lengths) - 1][:, evaluator.manifest.verbalizer_token_ids]
    # assert: PEFT's logits plus the calibration bias are the eval program's
    served = answer.numpy() + np.asarray(evaluator.manifest.class_bias, np.float32)
    np.testing.assert_allclose(logits, served, atol=1e-4, rtol=1e-4)


def test_a_second_export_of_the_plan_is_warm(tiny_plan, tmp_path) -> None:
    from export.program import export_plan

    events: list = []
    again = export_plan(tiny_plan.config, [(1, 1), (2, 2), (3, 3)], tmp_path / "again", cache_dir=tiny_plan.cache_dir,
                        on_progress=events.append, loaded=tiny_plan.loaded)
    assert (again.lowered, again.cached, again.workers) == (0, 4, 0) and not ended(events, "lower")
    assert all(result.from_cache for result in (*again.blocks.values(), again.eval))
    for name, result in again.blocks.items():
        assert sha256_file(result.method_files["step"]) == sha256_file(tiny_plan.plan.blocks[name].method_files["step"])


@pytest.mark.parametrize("blocks,message", [
    ([(1, 2), (2, 3)], "blocks L1-2 and L2-3 overlap at layer 2"),
    ([(1, 1), (3, 3)], "no block holds trainable layers 2"),
    ([(0, 1), (2, 3)], "layer 0 is not a trainable layer of this job"),
    ([], "a plan needs at least one block"),
])
def test_a_plan_whose_blocks_do_not_cover_the_job_once_is_refused(tiny_plan, tmp_path, blocks, message) -> None:
    from export.program import export_plan

    with pytest.raises(InputError, match=message):
        export_plan(tiny_plan.config, blocks, tmp_path, cache_dir=tiny_plan.cache_dir, loaded=tiny_plan.loaded)


def test_a_block_outside_the_jobs_layers_is_refused(tiny_plan, tmp_path) -> None:
    from dataclasses import replace

    with pytest.raises(InputError, match=r"block 0-1: layer 0 is not a trainable layer of this job \(trainable: 1-3\)"):
        export_program(replace(tiny_plan.config, block=(0, 1)), tmp_path / "x.pte", cache_dir=tiny_plan.cache_dir,
                       loaded=tiny_plan.loaded)
