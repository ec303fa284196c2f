"""The planner's job from manifests and a probe measurement: payload, blocks, memory per depth, refusals."""
from __future__ import annotations

from dataclasses import replace

import pytest

from shared.blocks import block_span
from shared.errors import InputError
from shared.job_model import MemoryModel, job_from_manifests, memory_model
from shared.manifest import BSlot, Manifest
from shared.probe import ProbeManifest
from shared.profiles import DeviceFacts, Measurement, ProbeMemory

MIB = 2**20


def _manifest(layers=range(22, 30), block: tuple[int, int] | None = None, **over) -> Manifest:
    layout, offset = [], 0
    for layer in layers:
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            layout.append(BSlot(layer, module, f"model.layers.{layer}.self_attn.{module}", (out, 8), offset))
            offset += out * 8
    fields = dict(model_id="smollm2", task="rt", num_layers=30, trainable_layers=list(layers),
                  target_modules=["q_proj", "v_proj"], rank=8, alpha=16.0, q=4, batch_size=4, eval_batch_size=16,
                  seq_len=64, labels=["neg", "pos"], verbalizer_token_ids=[1, 2], class_bias=[0.0, 0.0],
                  loss="verbalizer", prefix_sharing=True, b_size=offset, b_layout=layout, methods=["step"],
                  step_buckets={"64": "step"}, lr=0.1, eps=0.01)
    fields.update(over)
    manifest = Manifest(**fields)
    if block is not None:
        manifest.block = block_span(layout, *block).to_dict()
    return manifest


PROBE = ProbeManifest(model_id="smollm2", model_fingerprint="f" * 64, base_weights="fp32", num_layers=30,
                      hidden_size=576, job_layers=tuple(range(22, 30)), target_modules=("q_proj", "v_proj"), rank=8,
                      q=4, batch_size=4, seq_len=64, layer_b_size=6144, b_size=8 * 6144, classes=2,
                      methods=("layer_bs", "layer_wide", "frozen_bs", "last_wide", "head"))
MEASUREMENT = Measurement(
    at="2026-12-01T07:00:00+00:00", probe=PROBE.probe_id, model_id="smollm2", repeats=5,
    method_s={m: 0.01 for m in PROBE.methods}, spread={m: 0.1 for m in PROBE.methods},
    memory=ProbeMemory(runtime_bytes=200 * MIB, open_bytes=18 * MIB,
                       load_bytes={"layer_bs": 14 * MIB, "layer_wide": 14 * MIB, "frozen_bs": 15 * MIB,
                                   "last_wide": 14 * MIB, "head": 1 * MIB},
                       run_bytes={"layer_bs": 5 * MIB, "layer_wide": 40 * MIB, "frozen_bs": 4 * MIB,
                                  "last_wide": 15 * MIB, "head": 10 * MIB}),
    facts=DeviceFacts("cpu", 2, 24e9, "1.5.1", ("avx2",)))
WEIGHTS = 30 * 14.2e6 + 113e6  # the job's .ptd: 30 layers and the embedding
PROBE_WEIGHTS = 14.2e6


def test_memory_model_adds_the_measured_terms() -> None:
    model = memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    assert model.runtime_bytes == 28 * MIB  # opening + the first (head) call
    assert model.weights_loaded_bytes == pytest.approx(113e6)
    # each single-layer method packs the same layer: their median load, not one method's allocator noise (15)
    assert model.packed_layer_bytes == 14 * MIB
    assert (model.workspace_bs_bytes, model.workspace_wide_bytes, model.workspace_last_bytes) == (5 * MIB, 40 * MIB,
                                                                                                15 * MIB)
    # top 8 of 30: the 22 layers below load as one partition, packed beside their source
    assert model.load_layers(22) == 44
    assert model.program_bytes(22) == pytest.approx(28 * MIB + 113e6 + 44 * 14 * MIB)
    # half way down, the widened partition is the larger transient; the workspace is one layer's
    assert model.load_layers(15) == 15 + 2 * 14
    # with little below the block the running method is the peak: all layers packed plus the workspace
    assert model.load_layers(2) == 2 + 2 * 27
    tiny = replace(model, packed_layer_bytes=1 * MIB)
    assert tiny.program_bytes(5) == pytest.approx(28 * MIB + 113e6 + 30 * MIB + 40 * MIB)
    assert tiny.program_bytes(29) == pytest.approx(28 * MIB + 113e6 + 58 * MIB)  # 2 x 29 bs layers load at once
    two = replace(tiny, resident_methods=2)
    assert two.program_bytes(5) - tiny.program_bytes(5) == pytest.approx(113e6 + 70 * MIB)


def test_the_chains_do_not_move_the_packed_layer() -> None:
    # a format-4 probe also loads chains of its layers (XNNPACK packs the one layer up to k times
    # there): they are left out of the packed layer, which stays the single calls' median
    chains = {"layer_bs_x2": 28 * MIB, "layer_bs_x4": 56 * MIB, "frozen_bs_x4": 56 * MIB,
              "frozen_bs_x8": 112 * MIB, "layer_wide_x2": 28 * MIB}
    probe = replace(PROBE, methods=(*PROBE.methods, *chains))
    memory = replace(MEASUREMENT.memory, load_bytes={**MEASUREMENT.memory.load_bytes, **chains},
                     run_bytes={**MEASUREMENT.memory.run_bytes, **{m: 90 * MIB for m in chains}})
    measurement = replace(MEASUREMENT, probe=probe.probe_id, memory=memory,
                          method_s={m: 0.01 for m in probe.methods}, spread={m: 0.1 for m in probe.methods})
    model = memory_model(probe, measurement, WEIGHTS, PROBE_WEIGHTS)
    assert model == memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    assert model.packed_layer_bytes == 14 * MIB and model.workspace_bs_bytes == 5 * MIB


def test_job_from_one_manifest_lets_the_planner_choose_blocks() -> None:
    model = memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    job = job_from_manifests([_manifest()], model, local_steps=5, probe=PROBE)
    assert (job.layers, job.trainable_first, job.trainable_last, job.q, job.bs) == (30, 22, 29, 4, 4)
    assert job.layer_payload_bytes == 4 * (576 + 192) * 8 and job.blocks == ()
    assert job.memory_at_depth_bytes == model.at_depths()


def test_block_manifests_give_the_blocks() -> None:
    model = memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    parts = [_manifest(block=(22, 25)), _manifest(block=(26, 28)), _manifest(block=(29, 29)),
             _manifest(block=(22, 29), methods=["eval"])]  # the job's eval program is passed over
    assert job_from_manifests([_manifest(block=(22, 29))], model, local_steps=5).blocks == ()
    # the whole job's eval program alone describes the job as well (the engine plans from it)
    assert job_from_manifests([_manifest(block=(22, 29), methods=["eval"])], model, local_steps=5).blocks == ()
    job = job_from_manifests(parts[::-1], model, local_steps=5)
    assert [(b.first_layer, b.last_layer, b.payload_bytes) for b in job.blocks] == [
        (22, 25, 4 * 4 * 6144), (26, 28, 3 * 4 * 6144), (29, 29, 4 * 6144)]


@pytest.mark.parametrize("manifests, message", [
    ([_manifest(block=(22, 25)), _manifest(block=(25, 29))], "overlap at layer 25"),
    ([_manifest(block=(22, 25)), _manifest(block=(27, 29))], "no block holds trainable layers 26"),
    ([_manifest(block=(22, 25)), _manifest(block=(26, 29), model_id="other")], "manifest\\[1\\]: a program of another job"),
    ([_manifest(block=(22, 25)), _manifest(block=(22, 29))], "mix of block programs"),
    ([_manifest(block=(22, 25), methods=["eval"])], "no step method"),
    ([_manifest(layers=[22, 24])], "not contiguous"),
    ([], "no program manifests"),
])
def test_bad_programs_are_named(manifests, message: str) -> None:
    model = memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    with pytest.raises(InputError, match=message):
        job_from_manifests(manifests, model, local_steps=5)


def test_a_probe_of_another_model_is_refused_by_name() -> None:
    model = memory_model(PROBE, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
    with pytest.raises(InputError, match=r"probes model 'smollm2', but job\.json trains 'llama-1b'"):
        job_from_manifests([_manifest(model_id="llama-1b")], model, 5, probe=PROBE, sources=["job.json"])
    other = replace(PROBE, model_id="llama-1b")
    with pytest.raises(InputError, match=r"measurement is of probe .* \(model 'smollm2'\), not of probe .* "
                                         r"\(model 'llama-1b'\)"):
        memory_model(other, MEASUREMENT, WEIGHTS, PROBE_WEIGHTS)
