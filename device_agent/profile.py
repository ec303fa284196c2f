"""Measure this device for the planner: run the probe program, read memory and the device's facts.

`measure_profile(probe, name, link_bytes_per_s)` is the whole job: it checks the
probe's files against its manifest (`shared.probe.ProbeManifest`), opens it
with the ExecuTorch runtime (the same loader as training programs,
`device_agent.program.open_et_program`), and for every probe method

1. loads it, reading the process's resident memory before and after (XNNPACK
   packs the layer's weights when a method loads);
2. calls it once, reading resident memory again (XNNPACK sizes its workspace
   for the activations at the first call), then `warmup` more times; the
   ``head`` goes first, so that the runtime's one-time set-up lands on it;
3. times `repeats` calls, the methods interleaved round by round so that a
   change in the machine's load falls on every method alike (``between`` runs
   after each round: `deftly bench profile` times a block program's step there,
   so that the program and the probe that predicts it share the machine's drift);

Memory is read as resident-set increments, the heap trimmed before each
(``malloc_trim``), so that what an earlier method freed does not hide what the
next one takes.  The runtime's one-time set-up is seen only in a process that
has not run a program yet: measure when the agent starts.

It returns the planner's `DeviceProfile` with the median time of each method
laid out per layer (`shared.probe.layer_times`), at the full length and at each
of the probe's shorter length buckets (``DeviceProfile.at_lengths``), marked measured: when, with
which probe, the spread of each method's times, the memory terms and the
device's facts (CPU, cores, RAM, ExecuTorch version, SIMD flags).  M_k is the
memory available once the probe is released and the heap trimmed (``psutil``'s
``available``), which already leaves out what the agent itself holds.

Imports: shared, the runtime through `device_agent.program`, numpy, psutil, and
torch only as the runtime's tensor type.  Never the exporter.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch

from device_agent.program import open_et_program, return_freed_memory, verify_files
from shared.errors import InputError
from shared.probe import PROBE_SUFFIX, ProbeManifest, profile_from_probe, split_method
from shared.profiles import DeviceFacts, DeviceProfile, Measurement, ProbeMemory

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "neon", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")  # what XNNPACK's kernels dispatch on


def resolve_probe_path(path: Path) -> Path:
    """The manifest of a probe given as its directory, its ``.pte`` or its manifest.

    Raises:
        InputError: none of those exists.
    """
    path = Path(path)
    if path.is_dir():
        path = path / f"probe{PROBE_SUFFIX}"
    elif path.suffix == ".pte":
        path = path.with_name(path.name[:-len(".pte")] + PROBE_SUFFIX)
    if not path.name.endswith(PROBE_SUFFIX) or not path.exists():
        raise InputError(f"{path}: no probe manifest (*{PROBE_SUFFIX}); export the probe with `deftly profile`")
    return path


def probe_inputs(probe: ProbeManifest, method: str, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of the right shapes for one probe method (values do not change its time).

    Raises:
        InputError: a method the probe does not have.
    """
    if method not in probe.methods:
        raise InputError(f"the probe has no method {method!r} (it has {list(probe.methods)})")
    rng = np.random.default_rng(seed)
    method, _, at_length = split_method(method)  # "layer_bs_x4_t32" -> ("layer_bs", 4, 32): a chain takes its layer's inputs
    T = probe.seq_len if at_length is None else at_length
    bs, wide, H, q = probe.batch_size, probe.wide_rows, probe.hidden_size, probe.q

    def floats(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    rows = bs if method in ("layer_bs", "frozen_bs") else wide
    b = floats(1 if method == "layer_bs" else 2 * q, probe.layer_b_size, scale=1e-3)
    arrays: list[np.ndarray]
    if method in ("layer_bs", "layer_wide"):
        arrays = [floats(rows, T, H), b]
    elif method in ("frozen_bs", "frozen_wide"):
        arrays = [floats(rows, T, H)]
    elif method == "last_wide":
        arrays = [floats(wide, T, H), rng.integers(T // 2, T, wide).astype(np.int64), b]
    else:  # head
        arrays = [floats(wide, H), rng.integers(0, probe.classes, bs).astype(np.int64),
                  floats(probe.b_size, scale=1e-3), floats(q, probe.b_size), np.array([1e-3], np.float32),
                  np.array([1e-2], np.float32)]
    return [torch.from_numpy(a) for a in arrays]


def device_facts() -> DeviceFacts:
    """CPU model, logical cores, RAM, ExecuTorch version and SIMD flags of this machine."""
    names: dict[str, str] = {}  # "model name" (x86), "hardware" / "cpu part" (Arm): first value of each
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if key in ("flags", "features"):
                flags.update(value.split())
            elif value:
                names.setdefault(key, value)
    except OSError:
        pass  # no /proc (macOS, Windows): the flags stay unknown
    cpu = names.get("model name") or names.get("hardware") or platform.processor()
    try:
        executorch = metadata.version("executorch")
    except metadata.PackageNotFoundError:
        executorch = "unknown"
    return DeviceFacts(cpu=cpu, cores=os.cpu_count() or 1, ram_bytes=float(psutil.virtual_memory().total),
                       executorch=executorch, simd=tuple(f for f in SIMD_FLAGS if f in flags),
                       system=f"{platform.system()} {platform.machine()}")


def _spread(times: list[float]) -> float:
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return float((p90 - p10) / p50) if p50 > 0 else 0.0


def measure_profile(probe_path: Path, name: str, link_bytes_per_s: float, repeats: int = 20, warmup: int = 2,
                    clock: Callable[[], float] = time.perf_counter,
                    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
                    between: Callable[[], None] | None = None) -> DeviceProfile:
    """Time the probe on this device and return its measured `DeviceProfile`.

    Args:
        probe_path: the probe's directory, ``.pte`` or manifest.
        name: the device's name in the fleet.
        link_bytes_per_s: R_k, this device's link rate on the whole band (the
            desktop measures it; the device alone cannot).
        repeats: timed calls per method, after `warmup` calls.
        warmup: untimed calls per method after the first.
        clock: seconds, monotonic (tests may inject one).
        now: the time the measurement is stamped with.
        between: called after each round of timed calls (not timed here).

    Returns:
        The profile; ``profile.measurement`` holds the method times, their
        spread, the memory terms and the device's facts.

    Raises:
        InputError: a missing or altered probe file, a probe ExecuTorch cannot
            load, or bad arguments.
    """
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    manifest_path = resolve_probe_path(probe_path)
    probe = ProbeManifest.load(manifest_path)
    verify_files(probe, manifest_path)
    process = psutil.Process()
    return_freed_memory()  # memory freed earlier would be reused unseen and hide what the probe takes
    runtime = process.memory_info().rss
    weights = probe.file("weights", manifest_path)
    programs: dict[str, object] = {}  # .pte name -> the opened program; the head's first
    opened = runtime
    for pte in probe.program_files():
        try:
            programs[pte] = open_et_program(manifest_path.parent / pte, weights)
        except RuntimeError as exc:
            raise InputError(f"{manifest_path}: ExecuTorch could not load the probe's {pte} ({exc})") from None
        if len(programs) == 1:
            # what a program costs to open (its weights file with it) is what the first one took:
            # a program opens one .pte; the probe's others are units lowered side by side
            opened = process.memory_info().rss
    methods, inputs, load_bytes, run_bytes = {}, {}, {}, {}
    # The head first: the runtime's first call sets up its thread pool and XNNPACK, and the
    # head's own work is tiny, so its run_bytes is that one-time cost and the layers' are clean.
    for method in sorted(probe.methods, key=lambda m: m != "head"):
        return_freed_memory()
        before = process.memory_info().rss
        try:
            methods[method] = programs[probe.method_file(method)].load_method(method)
        except RuntimeError as exc:
            raise InputError(f"{manifest_path}: ExecuTorch could not load probe method {method!r} ({exc})") from None
        loaded = process.memory_info().rss
        inputs[method] = probe_inputs(probe, method)
        methods[method](inputs[method])
        load_bytes[method], run_bytes[method] = float(loaded - before), float(process.memory_info().rss - loaded)
        for _ in range(warmup):
            methods[method](inputs[method])
    times: dict[str, list[float]] = {method: [] for method in probe.methods}
    for _ in range(repeats):
        for method, run in methods.items():
            start = clock()
            run(inputs[method])
            times[method].append(clock() - start)
        if between is not None:
            between()
    measurement = Measurement(
        at=now().isoformat(timespec="seconds"), probe=probe.probe_id, model_id=probe.model_id, repeats=repeats,
        method_s={m: float(np.median(t)) for m, t in times.items()},
        spread={m: _spread(t) for m, t in times.items()},
        memory=ProbeMemory(runtime_bytes=float(runtime), open_bytes=float(opened - runtime),
                           load_bytes=load_bytes, run_bytes=run_bytes),
        facts=device_facts(), probe_format=probe.format)
    # Hand the probe's packed layers, workspaces and freed heap back before M_k is read: glibc
    # keeps them otherwise, and an agent that profiled carried them into training (SmolLM2,
    # format 4: 343 -> 233 MiB resident for int8, 480 -> 232 for fp32, once trimmed).
    del methods, inputs, programs
    return_freed_memory()
    return profile_from_probe(probe, name, measurement, float(psutil.virtual_memory().available), link_bytes_per_s)


def main(argv: list[str] | None = None) -> int:
    """``python -m device_agent.profile PROBE --name N --link-mbit-s R --out profile.json``.

    Measures in this fresh process (what a device does when its agent starts) and
    writes the profile as its record; ``error: ...`` and exit 2 on bad input.
    """
    import argparse
    import json
    import sys

    from shared.files import write_bytes_atomic
    from shared.profiles import profile_to_plain

    parser = argparse.ArgumentParser(prog="python -m device_agent.profile", description=main.__doc__.splitlines()[0])
    parser.add_argument("probe", type=Path, help="the probe's directory, .pte or manifest")
    parser.add_argument("--name", required=True, help="the device's name in the fleet")
    parser.add_argument("--link-mbit-s", type=float, required=True, help="the device's link rate, Mbit/s")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per method (default 20)")
    parser.add_argument("--out", type=Path, required=True, help="the profile record (.json) to write")
    parser.add_argument("--one-thread", action="store_true",
                        help="run the runtime's kernels on one thread, as a simulated agent does")
    args = parser.parse_args(argv)
    if args.one_thread:
        from device_agent.program import use_one_compute_thread

        use_one_compute_thread()
    try:
        if not args.link_mbit_s > 0:
            raise InputError(f"--link-mbit-s must be > 0, got {args.link_mbit_s}")
        profile = measure_profile(args.probe, args.name, args.link_mbit_s * 1e6 / 8, repeats=args.repeats)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out, (json.dumps(profile_to_plain(profile), indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
