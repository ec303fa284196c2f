"""A measured profile of this machine and an exported job planned from its manifests (`deftly plan --programs`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from desktop.cli import main
from desktop.measured import load_measured_job, load_profile, measure_in_fresh_process
from shared.errors import InputError
from shared.profiles import profile_to_plain


@pytest.fixture(scope="module")
def measured(tiny_probe, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("measured") / "profile.json"
    return measure_in_fresh_process(tiny_probe.manifest_path, "this-machine", 100.0, out, repeats=3), out


def test_a_fresh_process_measures_and_writes_the_profile(measured, tiny_probe) -> None:
    profile, path = measured
    assert load_profile(path) == profile and profile.measured
    assert profile.measurement.probe == tiny_probe.manifest.probe_id
    assert profile.link_bytes_per_s == pytest.approx(100e6 / 8)


def test_the_job_comes_from_the_manifest_and_the_probe(measured, tiny_probe, tiny_program) -> None:
    profile, _ = measured
    job = load_measured_job([tiny_program.export.manifest_path], tiny_probe.manifest_path, profile, local_steps=3)
    manifest = tiny_program.export.manifest
    assert (job.layers, job.trainable_first, job.trainable_last) == (2, 1, 1)
    assert job.layer_payload_bytes == 4 * manifest.b_size and (job.q, job.bs) == (manifest.q, manifest.batch_size)
    assert len(job.memory_at_depth_bytes) == 2 and all(m > 0 for m in job.memory_at_depth_bytes)


def test_plan_programs_says_which_devices_were_measured(measured, tiny_probe, tiny_program, tmp_path: Path,
                                                        capsys) -> None:
    profile, profile_path = measured
    fleet = tmp_path / "fleet.json"
    estimate = {"name": "phone", "layer_s_bs": 0.01, "layer_s_wide": 0.05, "head_s": 0.01, "memory_gib": 4,
                "link_mbit_s": 100}
    fleet.write_text(json.dumps({"name": "mixed", "device": [profile_to_plain(profile), estimate]}))
    argv = ["plan", "--fleet", str(fleet), "--programs", str(tiny_program.export.manifest_path),
            "--probe", str(tiny_probe.manifest_path.parent), "--profile", str(profile_path), "--seeds", "3"]
    assert main(argv + ["--json"]) == 0
    rows = {row["device"]: row["profile"] for row in json.loads(capsys.readouterr().out)["devices"]}
    assert rows == {"this-machine": profile.source, "phone": "estimated"}
    assert main(argv) == 0
    assert profile.source in capsys.readouterr().out
    assert main(["plan", "--fleet", str(fleet), "--programs", str(tiny_program.export.manifest_path)]) == 2
    assert "--programs needs --probe and --profile" in capsys.readouterr().err


def test_a_probe_for_another_model_is_refused_by_name(measured, tiny_probe, tiny_program, tmp_path: Path) -> None:
    profile, _ = measured
    shutil.copytree(tiny_program.pte.parent, tmp_path / "job")
    path = tmp_path / "job" / tiny_program.export.manifest_path.name
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "model_id": "another-model"}))
    with pytest.raises(InputError, match=rf"probes model '{tiny_probe.manifest.model_id}', but .* trains 'another-model'"):
        load_measured_job([path], tiny_probe.manifest_path, profile, local_steps=3)
