"""Measured planner inputs from files: profiles, a probe measurement of this machine, a job from its programs.

The I/O around `shared.job_model` and `device_agent.profile`: read manifests and
profile records, stat the weights files, and run the probe in a fresh process
(as a device does when its agent starts: a process that has run programs before
hides the runtime's set-up and reuses freed memory, so its memory terms would be low).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from device_agent.profile import resolve_probe_path
from shared.errors import InputError
from shared.job_model import job_from_manifests, memory_model
from shared.manifest import Manifest
from shared.probe import ProbeManifest
from shared.profiles import DeviceProfile, Job, profile_from_plain
from shared.task_data import Split, load_splits


def load_profile(path: Path) -> DeviceProfile:
    """A profile record written by `device_agent.profile` (or `deftly profile`).

    Raises:
        InputError: a missing file, bad JSON, or a bad field (named).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return profile_from_plain(data, where=path.name)


def measure_in_fresh_process(probe: Path, name: str, link_mbit_s: float, out: Path, repeats: int = 20,
                             timeout_s: float = 600.0, one_thread: bool = False) -> DeviceProfile:
    """Measure this machine with `python -m device_agent.profile` in a new process; the profile it wrote.

    Raises:
        InputError: the measurement failed (its message), or took longer than ``timeout_s``.
    """
    command = [sys.executable, "-m", "device_agent.profile", str(probe), "--name", name,
               "--link-mbit-s", str(link_mbit_s), "--repeats", str(repeats), "--out", str(out)]
    if one_thread:  # the runtime's kernels on one thread, as a simulated agent runs them
        command.append("--one-thread")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InputError(f"measuring {probe} took longer than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        raise InputError(lines[-1][len("error: "):] if lines else f"measuring {probe} failed:\n{done.stderr[-2000:]}")
    return load_profile(out)


def load_measured_job(programs: Sequence[Path], probe: Path, reference: DeviceProfile, devices: int,
                      rounds: int | None = None, local_steps: int | None = None, seed: int = 0,
                      resident_methods: int = 1, name: str = "") -> Job:
    """The planner's job for exported programs, its memory from a probe measurement, its length mix
    counted as the engine counts it.

    The job's training split is cut into one shard per device as the engine cuts it
    (``desktop.engine.shards.cut_shards``), and the share of steps at each length bucket
    is counted on the shards for ``rounds × local_steps`` steps in the trainer's batch
    order (``desktop.engine.shards.run_step_mix``): a run of these programs on this many
    devices, with this seed, is priced at the lengths its steps will run at.

    Args:
        programs: the job's program manifests (or their ``.pte``s): one whole-job program, or its block programs.
        probe: the probe the reference profile was measured with (directory, ``.pte`` or manifest).
        reference: a measured profile whose memory terms stand for every device.
        devices: devices the run's data is cut for (the fleet's).
        rounds: rounds of the run (None: the engine's default).
        local_steps: K_local (None: the engine's default).
        seed: the run's seed (shards and batch order; the engine's default is 0).
        resident_methods: methods a device keeps loaded at once (the trainer's bound).
        name: the job's name.

    Raises:
        InputError: as `shared.job_model.job_from_manifests`, a reference that is not measured, fewer than
            one round or local step, programs that name no task data, or more devices than training rows.
    """
    from desktop.engine.engine import DEFAULT_LOCAL_STEPS, DEFAULT_ROUNDS
    from desktop.engine.shards import cut_shards, run_step_mix
    from device_agent.program import resolve_manifest_path

    rounds = DEFAULT_ROUNDS if rounds is None else rounds
    local_steps = DEFAULT_LOCAL_STEPS if local_steps is None else local_steps
    if rounds < 1:
        raise InputError(f"--rounds must be at least 1, got {rounds}")
    if local_steps < 1:
        raise InputError(f"--local-steps must be at least 1, got {local_steps}")
    if reference.measurement is None:
        raise InputError(f"profile {reference.name!r} is an estimate; the job's memory needs a measured profile")
    paths = [resolve_manifest_path(Path(p)) for p in programs]
    manifests = [Manifest.load(p) for p in paths]
    mix = run_step_mix(manifests[0], cut_shards(_training_split(manifests, paths), devices, seed=seed), rounds,
                       local_steps, seed=seed)
    probe_path = resolve_probe_path(probe)
    probe_manifest = ProbeManifest.load(probe_path)
    weights = {m.file("weights", p).stat().st_size for m, p in zip(manifests, paths) if "weights" in m.files}
    if len(weights) != 1:
        raise InputError(f"the programs {', '.join(p.name for p in paths)} do not share one weights file "
                         f"(sizes {sorted(weights)}); a job's programs share the model's .ptd")
    memory = memory_model(probe_manifest, reference.measurement, float(weights.pop()),
                          float(probe_manifest.file("weights", probe_path).stat().st_size), resident_methods)
    return job_from_manifests(manifests, memory, local_steps, name=name, probe=probe_manifest,
                              sources=[str(p) for p in paths], step_mix=mix)


def _training_split(manifests: Sequence[Manifest], paths: Sequence[Path]) -> Split:
    """The job's training split, from the task data its programs name (the first that names one).

    Raises:
        InputError: no program names its task data, or the file has no training split.
    """
    for manifest, path in zip(manifests, paths):
        if "data" in manifest.files:
            data = manifest.file("data", path)
            splits = load_splits(data)
            if "train" not in splits:
                raise InputError(f"{data}: no 'train' split (it holds {', '.join(sorted(splits)) or 'nothing'}); "
                                 f"the step mix is counted on the job's training data")
            return splits["train"]
    raise InputError(f"{', '.join(str(p) for p in paths)}: no program names the job's task data (a 'data' file); "
                     f"the step mix is counted on its training split")
