"""A measured profile of this machine and an exported job planned from its manifests (`deftly plan --programs`)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
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


def test_a_one_thread_measurement_tells_the_runtime_so_and_writes_the_profile(tiny_probe, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "one.json"
    done = subprocess.run([sys.executable, "-m", "device_agent.profile", str(tiny_probe.manifest_path), "--name", "one",
                           "--link-mbit-s", "100", "--repeats", "2", "--out", str(out), "--one-thread"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resetting threadpool to 1 threads" in done.stderr  # ExecuTorch's own line
    assert load_profile(out).measured and load_profile(out).name == "one"


def test_the_job_comes_from_the_manifest_and_the_probe(measured, tiny_probe, tiny_program) -> None:
    profile, _ = measured
    job = load_measured_job([tiny_program.export.manifest_path], tiny_probe.manifest_path, profile, devices=2,
                            local_steps=3)
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
    # the run's steps take both lengths: the hand-written phone has times at the full length only, which stand in
    assert rows == {"this-machine": profile.source, "phone": "estimated, at T=32 only (no times at T=16)"}
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
        load_measured_job([path], tiny_probe.manifest_path, profile, devices=1, local_steps=3)


def test_plan_programs_prices_the_length_mix_the_engine_plans_with(measured, tiny_probe, tiny_program,
                                                                    tmp_path: Path, capsys) -> None:
    from desktop.engine import Engine, EngineConfig, JobSpec
    from desktop.engine.engine import _Device
    from shared.manifest import Manifest
    from shared.probe import ProbeManifest

    # prepare: a fleet of two devices measured like this machine; a run of 3 rounds x 4 steps, seed 1 (the data
    # favours the full length: with seed 0, 1 step in 24 runs at 16 tokens; with seed 1, 3 do)
    profile, profile_path = measured
    names = ("lab-a", "lab-b")
    fleet = tmp_path / "fleet.json"
    fleet.write_text(json.dumps({"name": "pair",
                                 "device": [profile_to_plain(replace(profile, name=n)) for n in names]}))
    manifest_path = tiny_program.export.manifest_path
    argv = ["plan", "--fleet", str(fleet), "--programs", str(manifest_path), "--probe", str(tiny_probe.manifest_path),
            "--profile", str(profile_path), "--rounds", "3", "--local-steps", "4", "--seed", "1", "--seeds", "3"]
    # ... and the engine as it stands when it plans that run: the job's eval program (no step method, its
    # eval buckets), the probe, the two devices profiled, their shards cut and written to the run directory
    engine = Engine(EngineConfig(job=JobSpec(), out=tmp_path / "run", rounds=3, local_steps=4, seed=1,
                                 agents=("127.0.0.1:1",), cache_dir=tmp_path / "cache"))
    whole = Manifest.load(manifest_path)
    engine.eval_manifest_path = manifest_path
    engine.manifest = replace(whole, methods=[m for m in whole.methods if m.startswith("eval")], step_buckets={})
    engine.probe_path, engine.probe = tiny_probe.manifest_path, ProbeManifest.load(tiny_probe.manifest_path)
    devices = [_Device(key=n, name=n, host="127.0.0.1", port=1, token=None, via="address", agent_id=n, label=n,
                       profile=replace(profile, name=n)) for n in names]
    engine._devices = {d.key: d for d in devices}
    # execute
    assert main(argv + ["--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    engine._cut_shards(devices)
    job = engine._planner_job(devices)
    # assert: one mix, and the table says it
    assert [tuple(pair) for pair in planned["step_mix"]] == list(job.step_mix)
    assert job.step_mix == ((16, 3 / 24), (32, 21 / 24))  # both lengths run: not the every-step-at-T default
    assert main(argv) == 0
    shares = ", ".join(f"T={t} {100 * w:.0f} %" for t, w in job.step_mix)
    assert f"steps priced at each length: {shares}" in capsys.readouterr().out


def test_plan_programs_runs_as_the_engine_does_unless_told(measured, tiny_probe, tiny_program, capsys) -> None:
    from desktop.engine.engine import DEFAULT_LOCAL_STEPS, DEFAULT_ROUNDS

    profile, _ = measured
    given = load_measured_job([tiny_program.export.manifest_path], tiny_probe.manifest_path, profile, devices=2,
                              rounds=DEFAULT_ROUNDS, local_steps=DEFAULT_LOCAL_STEPS)
    default = load_measured_job([tiny_program.export.manifest_path], tiny_probe.manifest_path, profile, devices=2)
    assert default == given and default.local_steps == DEFAULT_LOCAL_STEPS
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"engine's, {DEFAULT_ROUNDS})" in help_text and f"engine's, {DEFAULT_LOCAL_STEPS})" in help_text
    with pytest.raises(InputError, match="--rounds must be at least 1, got 0"):
        load_measured_job([tiny_program.export.manifest_path], tiny_probe.manifest_path, profile, devices=2, rounds=0)
