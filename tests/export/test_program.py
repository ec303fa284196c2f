"""Exported programs: files, manifest, the lowering cache, weights shared across block sets."""
from __future__ import annotations

import json
from dataclasses import replace

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
                           progress=OTHER_BLOCK_MESSAGES["first"].append, loaded=tiny_program.loaded)
    again = export_program(config, tmp_path_factory.mktemp("b") / "block0.pte", cache_dir=cache,
                           progress=OTHER_BLOCK_MESSAGES["again"].append, loaded=tiny_program.loaded)
    return first, again


OTHER_BLOCK_MESSAGES: dict[str, list[str]] = {"first": [], "again": []}  # the progress lines of each export


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
    assert files["program"].stat().st_size < PROGRAM_BYTES_TARGET
    assert files["weights"].stat().st_size > 10 * files["program"].stat().st_size


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
    assert sha256_file(first.files["program"]) == sha256_file(again.files["program"])
    assert again.seconds < first.seconds


def test_the_calibration_is_measured_once_per_model_and_prompts(other_block) -> None:
    first, again = other_block
    # The first export measured the bias; the second read the same numbers from the cache.
    assert any("calibrating the verbalizer" in m for m in OTHER_BLOCK_MESSAGES["first"])
    assert not any("calibrating the verbalizer" in m for m in OTHER_BLOCK_MESSAGES["again"])
    assert any("calibration found in the cache" in m for m in OTHER_BLOCK_MESSAGES["again"])
    assert again.manifest.class_bias == first.manifest.class_bias and any(first.manifest.class_bias)


def test_an_unreadable_cached_calibration_is_measured_again(tiny_program, tmp_path) -> None:
    import torch

    from export.lora import AdapterTensors
    from export.prge import PrgeProgram
    from export.program import _cached_class_bias

    # prepare: the eager twin of the tiny program, its training prompts, and an empty cache
    config, model = tiny_program.config, tiny_program.loaded.model
    verbalizer = tiny_program.export.manifest.verbalizer_token_ids
    program = PrgeProgram(model, AdapterTensors.build(model, config.lora(model.config.num_hidden_layers)),
                          config.prge(), verbalizer)
    train = load_splits(tiny_program.export.files["data"])["train"]
    messages: list[str] = []

    def measure() -> list[float]:
        return _cached_class_bias(program, train, config, "fingerprint", verbalizer, tmp_path, messages.append)

    # execute: measure, spoil the cached file, measure again
    measured = measure()
    (cached,) = (tmp_path / "calibration").glob("*.json")
    cached.write_text("{not json")
    remeasured = measure()
    # assert: both were measured (not read), agree, and the cache holds a readable file again
    assert sum(m.strip().startswith("calibrating the verbalizer") and m.endswith("...") for m in messages) == 2
    assert remeasured == measured and len(measured) == len(program.class_bias)
    assert json.loads(cached.read_text())["class_bias"] == measured
    assert torch.isfinite(torch.tensor(measured)).all()


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
    from export.lora import AdapterTensors
    from export.prge import PrgeProgram
    from export.program import int8_base

    config = ExportConfig(model="tiny", layers="1-1", seq_len=32, methods=("step",), length_buckets=(),
                          calibrate="none", base_weights="int8")
    fp32_model = tiny_program.loaded.model
    # execute
    result = export_program(config, tmp_path / "int8.pte", cache_dir=tmp_path / "cache", progress=lambda _m: None,
                            loaded=tiny_program.loaded)
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
        int8_model, program_adapter = int8_base(fp32_model, AdapterTensors.build(fp32_model, lora), train, config)
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
    assert result.files["program"].stat().st_size < int8_bytes


def test_int8_row_embedding_rounds_each_row_to_within_half_its_step() -> None:
    import torch

    from export.program import Int8RowEmbedding

    weight = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 50).unsqueeze(1)  # rows of very different scale
    embedding = Int8RowEmbedding(weight)
    ids = torch.tensor([[0, 7, 49], [3, 3, 20]])
    got = embedding(ids)  # [2, 3, 16]
    step = weight.abs().amax(dim=1, keepdim=True) / 127  # [50, 1]
    assert got.shape == (2, 3, 16) and embedding.weight_int8.dtype == torch.int8
    assert ((got - weight[ids]).abs() <= step[ids] / 2 + 1e-7).all()


def test_unknown_base_weights_are_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="expected fp32 or int8"):
        export_program(ExportConfig(model="tiny", layers="1-1", base_weights="int4"), tmp_path / "x.pte", loaded=tiny_program.loaded,
                       progress=lambda _m: None)


def test_a_smoothing_strength_outside_0_to_1_is_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="--int8-smoothing 1.5: expected a value between 0 and 1"):
        export_program(ExportConfig(model="tiny", layers="1-1", base_weights="int8", int8_smoothing=1.5),
                       tmp_path / "x.pte", loaded=tiny_program.loaded, progress=lambda _m: None)


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
                       loaded=tiny_program.loaded, progress=lambda _m: None)


def test_an_unknown_delegate_is_refused(tiny_program, tmp_path) -> None:
    with pytest.raises(InputError, match="delegate 'gpu': expected one of xnnpack, portable"):
        export_program(replace(tiny_program.config, delegate="gpu"), tmp_path / "x.pte", loaded=tiny_program.loaded,
                       progress=lambda _m: None)


def test_a_portable_program_has_no_delegate_and_steps_as_the_xnnpack_one(tiny_program, tmp_path) -> None:
    import numpy as np

    from device_agent.program import Program

    cache = tmp_path / "cache"
    portable = export_program(replace(tiny_program.config, delegate="portable"), tmp_path / "portable" / "step.pte",
                              cache_dir=cache, loaded=tiny_program.loaded, progress=lambda _m: None)
    assert b"XnnpackBackend" in tiny_program.pte.read_bytes()
    assert b"XnnpackBackend" not in portable.files["program"].read_bytes()
    assert portable.manifest.cache_key != tiny_program.export.manifest.cache_key  # never served from its cache

    programs = [Program(tiny_program.pte), Program(portable.files["program"])]
    train = programs[0].load_data()["train"]
    bs, q, size = programs[0].batch_size, programs[0].q, programs[0].b_size
    z = np.random.default_rng(0).standard_normal((q, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal(size, dtype=np.float32) * 0.01
    (b_x, loss_x, g_x), (b_p, loss_p, g_p) = (p.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs],
                                                      b, z, 0.1, 0.01) for p in programs)
    assert loss_p == pytest.approx(loss_x, abs=1e-5)
    np.testing.assert_allclose(g_p, g_x, atol=1e-4)
    np.testing.assert_allclose(b_p, b_x, atol=1e-5)
