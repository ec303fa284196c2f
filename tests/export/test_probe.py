"""The probe program: its methods run the programs' own layer code, it holds one layer, it is cached."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agent.program import open_et_program
from device_agent.profile import probe_inputs
from export.cache import weights_entries
from export.probe import export_probe, probe_methods, probe_modules, split_units
from shared.errors import InputError
from shared.probe import ProbeManifest, check_probe_matches


JOB = ("layer_bs", "layer_bs_x2", "layer_bs_x4", "layer_wide", "layer_wide_x2")  # a job layer and its chains
BELOW = ("frozen_bs", "frozen_bs_x4", "frozen_bs_x8")
ABOVE = ("frozen_wide", "frozen_wide_x2")
SHORT = ("layer_bs", "layer_wide", "frozen_bs", "last_wide")  # at a shorter bucket: single calls, no chains


def load_probe_method(tiny_probe, method: str):
    """``method`` of the tiny probe, from whichever of its units (``.pte`` files) holds it."""
    probe, where = tiny_probe.manifest, tiny_probe.manifest_path.parent
    return open_et_program(where / probe.method_file(method), where / probe.files["weights"]).load_method(method)


def test_methods_follow_the_job_layers() -> None:
    assert probe_methods(30, tuple(range(22, 30))) == (*JOB, *BELOW, "last_wide", "head")
    assert probe_methods(30, tuple(range(0, 30))) == (*JOB, "last_wide", "head")
    assert probe_methods(30, (10, 11)) == (*JOB, *BELOW, *ABOVE, "last_wide", "head")
    # each shorter length bucket repeats the single-call layer methods; the head does not depend on T
    assert probe_methods(30, tuple(range(22, 30)), (32,)) == (
        *JOB, *BELOW, "last_wide", *(f"{m}_t32" for m in SHORT), "head")


def test_the_probe_has_every_layer_method_at_each_length_bucket(tiny_probe, tiny_program) -> None:
    # The tiny job runs T=32 with a bucket at 16: the probe times both lengths, and its
    # methods at 16 run on rows of 16 tokens.
    probe = tiny_probe.manifest
    assert probe.length_buckets == tiny_program.config.buckets() == (16,)
    assert probe.methods == (*JOB, *BELOW, "last_wide", *(f"{m}_t16" for m in SHORT), "head")
    for method, rows, T in (("layer_wide_t16", probe.wide_rows, 16), ("frozen_bs_t16", probe.batch_size, 16),
                            ("frozen_bs_x4", probe.batch_size, 32)):
        inputs = probe_inputs(probe, method)
        assert tuple(inputs[0].shape) == (rows, T, probe.hidden_size)
        (out,) = load_probe_method(tiny_probe, method)(inputs)
        assert tuple(out.shape) == (rows, T, probe.hidden_size)
    (last,) = load_probe_method(tiny_probe, "last_wide_t16")(probe_inputs(probe, "last_wide_t16"))
    assert tuple(last.shape) == (probe.wide_rows, probe.hidden_size)


def test_a_probe_of_the_older_format_is_refused_with_the_way_out(tiny_probe, tmp_path: Path) -> None:
    import json

    data = json.loads(tiny_probe.manifest_path.read_text())
    data["format"] = 1
    del data["length_buckets"]
    old = tmp_path / "probe.probe.json"
    old.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"probe format 1, this deftly reads 4 .*export the probe again and "
                                         r"re-profile the devices"):
        ProbeManifest.load(old)


def test_manifest_names_the_model_and_the_job_shapes(tiny_probe, tiny_program) -> None:
    probe, program = tiny_probe.manifest, tiny_program.export.manifest
    assert probe.model_id == program.model_id and len(probe.model_fingerprint) == 64
    assert (probe.num_layers, probe.q, probe.batch_size, probe.seq_len) == (
        program.num_layers, program.q, program.batch_size, program.seq_len)
    assert probe.job_layers == tuple(program.trainable_layers) == (1,)
    assert probe.layer_b_size * len(probe.job_layers) == probe.b_size == program.b_size
    # one layer's weights, not the model's: the program's weights file holds both layers and the embedding
    probe_weights = (tiny_probe.manifest_path.parent / probe.files["weights"]).stat().st_size
    program_weights = tiny_program.export.files["weights"].stat().st_size
    assert probe_weights < program_weights / 10
    assert ProbeManifest.load(tiny_probe.manifest_path) == probe
    check_probe_matches(probe, model_id=program.model_id, num_layers=program.num_layers, q=program.q,
                        batch_size=program.batch_size, seq_len=program.seq_len,
                        base_weights=program.base_weights, job_layers=program.trainable_layers)


def test_probe_for_another_model_or_shape_is_refused_by_name(tiny_probe) -> None:
    probe = tiny_probe.manifest
    shapes = dict(model_id=probe.model_id, num_layers=probe.num_layers, q=probe.q, batch_size=probe.batch_size,
                  seq_len=probe.seq_len, base_weights=probe.base_weights, job_layers=probe.job_layers)
    with pytest.raises(InputError, match=rf"probes model '{probe.model_id}', but the job trains 'smollm2-135m'"):
        check_probe_matches(probe, **{**shapes, "model_id": "smollm2-135m"})
    with pytest.raises(InputError, match=r"built for seq_len = 32, but the job has 64"):
        check_probe_matches(probe, **{**shapes, "seq_len": 64})


def test_each_layer_method_is_the_program_layer_it_stands_for(tiny_probe, tiny_program) -> None:
    # The runtime's answer equals the eager PrgeProgram's own layer code on the probed layer.
    from export.lora import AdapterTensors, LoraFaConfig
    from export.prge import PrgeProgram, _LayerB
    from export.probe import PROBED, _OneLayerModel

    probe = tiny_probe.manifest
    config = tiny_program.config
    stand_in = _OneLayerModel(tiny_program.loaded.model, max(probe.job_layers))
    lora = LoraFaConfig(rank=config.rank, alpha=config.alpha, target_modules=config.target_modules, layers=(PROBED,),
                        seed=config.seed)
    eager = PrgeProgram(stand_in, AdapterTensors.build(stand_in, lora), config.prge(),
                        tiny_program.export.manifest.verbalizer_token_ids)
    h, b = probe_inputs(probe, "layer_wide")
    (got,) = load_probe_method(tiny_probe, "layer_wide")([h, b])
    with torch.no_grad():
        expected = eager._decoder_layer(h, PROBED, _LayerB(b, 0))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    # a chain is the layer run k times in one call (what a program's consecutive layers are)
    for method, lora in (("layer_bs_x4", True), ("frozen_bs_x8", False)):
        inputs = probe_inputs(probe, method)
        (got,) = load_probe_method(tiny_probe, method)(inputs)
        with torch.no_grad():
            expected = inputs[0]
            for _ in range(int(method.rpartition("_x")[2])):
                expected = eager._decoder_layer(expected, PROBED, _LayerB(inputs[1], 0) if lora else None)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_a_second_export_comes_from_the_cache(tiny_probe, tiny_program, tmp_path: Path) -> None:
    again = export_probe(tiny_program.config, tmp_path, cache_dir=tiny_probe.cache_dir,
                         loaded=tiny_program.loaded)
    assert not tiny_probe.export.from_cache and tiny_probe.manifest.lower_seconds > 0
    assert again.from_cache and again.manifest.lower_seconds == 0
    assert replace(again.manifest, lower_seconds=tiny_probe.manifest.lower_seconds) == tiny_probe.manifest


def test_the_units_share_the_lowering_and_each_method_is_in_one() -> None:
    methods = probe_methods(30, tuple(range(22, 30)), (32,))  # the default job's: 28 layer copies and the head
    copies = {m: int(m.split("_x")[1].split("_")[0]) if "_x" in m else 1 for m in methods}
    for units in (1, 2, 3, 4):
        groups = split_units(methods, units)
        assert len(groups) == units and "head" in groups[0]
        assert sorted(m for g in groups for m in g) == sorted(methods)
        for group in groups:  # each keeps the manifest's order
            assert list(group) == [m for m in methods if m in group]
        loads = [sum(copies[m] for m in g if m != "head") for g in groups]
        assert max(loads) - min(loads) <= 1 if units <= 2 else max(loads) <= 28 / units + 8
    assert split_units(("layer_bs", "head"), 4) == [("head",), ("layer_bs",)]  # never an empty unit


def test_a_probe_in_two_units_answers_as_the_probe_in_one(tiny_probe, tiny_program, tmp_path: Path) -> None:
    probe = tiny_probe.manifest
    assert sorted(probe.files) == ["program", "program_2", "weights"]
    assert probe.method_file("head") == probe.files["program"] == "probe.pte"
    assert set(probe.method_files.values()) == {"probe.pte", "probe-2.pte"} and set(probe.method_files) == set(
        probe.methods)
    one = export_probe(tiny_program.config, tmp_path / "one", cache_dir=tmp_path / "cache", loaded=tiny_program.loaded,
                       workers=1)
    assert one.manifest.methods == probe.methods and set(one.manifest.method_files.values()) == {"probe.pte"}
    # the same layer's tensors (each unit writes them in the order its methods read them)
    assert weights_entries(tmp_path / "one" / one.manifest.files["weights"]) == weights_entries(
        tiny_probe.manifest_path.parent / probe.files["weights"])
    assert not list((tmp_path / "one").glob("probe-*.pte"))
    method = next(m for m in probe.methods if probe.method_file(m) == "probe-2.pte")
    inputs = probe_inputs(probe, method)
    (split,) = load_probe_method(tiny_probe, method)(inputs)
    whole = open_et_program(tmp_path / "one" / "probe.pte", tmp_path / "one" / one.manifest.files["weights"])
    (single,) = whole.load_method(method)(inputs)
    np.testing.assert_allclose(split.numpy(), single.numpy(), rtol=1e-6, atol=1e-6)


def test_a_manifest_whose_methods_are_in_no_program_file_is_refused(tiny_probe) -> None:
    import json

    data = json.loads(tiny_probe.manifest_path.read_text())
    one_less = dict(data, method_files={m: f for m, f in data["method_files"].items() if m != "head"})
    with pytest.raises(InputError, match=r"method_files must name every method once: missing \['head'\]"):
        ProbeManifest.from_json(json.dumps(one_less))
    stranger = dict(data, method_files={**data["method_files"], "head": "other.pte"})
    with pytest.raises(InputError, match=r"method_files names \['other.pte'\], which are not among its program"):
        ProbeManifest.from_json(json.dumps(stranger))
    no_program = dict(data, files={k: v for k, v in data["files"].items() if k != "program"})
    with pytest.raises(InputError, match="names no program"):
        ProbeManifest.from_json(json.dumps(no_program))


def test_unknown_weights_are_an_input_error(tiny_program) -> None:
    with pytest.raises(InputError, match="--weights 'int4'"):
        probe_modules(tiny_program.loaded.model, replace(tiny_program.config, base_weights="int4"), [1, 2])


@pytest.mark.slow
def test_an_int8_probe_quantises_its_layer_like_int8_programs(tiny_program, tmp_path: Path) -> None:
    # ~1 min on 2 cores: the int8 layer is flattened before lowering, as in int8 programs.
    from device_agent.profile import measure_profile

    config = replace(tiny_program.config, base_weights="int8")
    result = export_probe(config, tmp_path / "probe", cache_dir=tmp_path / "cache",
                          loaded=tiny_program.loaded)
    assert result.manifest.base_weights == "int8"
    weights = (tmp_path / "probe" / result.manifest.files["weights"]).stat().st_size
    layer = sum(p.numel() for p in tiny_program.loaded.model.model.layers[1].parameters())
    assert weights < 2 * layer  # int8 weights (+ scales), not 4 bytes a weight
    profile = measure_profile(tmp_path / "probe", "d", 1e6, repeats=2)
    assert profile.measurement.probe == result.manifest.probe_id
