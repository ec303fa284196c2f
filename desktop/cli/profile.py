"""`deftly profile`: export the probe for a job's model and shapes, and measure this machine with it.

Writes ``DIR/probe.pte`` (and ``probe-2.pte``, ...: the units lowered side by side),
its weights and ``DIR/probe.probe.json`` (the probe a device runs), and ``DIR/profile.json``: this machine's measured profile (a
`shared.profiles.DeviceProfile` record), measured in a fresh process.  Example:

    deftly profile --out runs/probe-fp32 --layers top:8 --weights fp32 --name build-machine
"""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from export.program import ExportConfig

    d = ExportConfig()
    parser = subparsers.add_parser("profile", help="export the probe and measure this machine's profile",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the probe and profile.json")
    parser.add_argument("--model", default=d.model, help="'smollm2' (embedded), a local HF directory or a hub id")
    parser.add_argument("--task", default=d.task, help="the task whose answer words the head holds")
    parser.add_argument("--layers", default=d.layers, help="the job's trainable layers: all | top:K | a-b | a,b,c")
    parser.add_argument("--q", type=int, default=d.q)
    parser.add_argument("--bs", type=int, default=d.batch_size)
    parser.add_argument("--seq", type=int, default=d.seq_len)
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--targets", default=",".join(d.target_modules), help="comma-separated target linears")
    parser.add_argument("--weights", choices=("fp32", "int8"), default=d.base_weights)
    parser.add_argument("--name", default="this-machine", help="the device's name in a fleet")
    parser.add_argument("--link-mbit-s", type=float, default=100.0, help="its link rate (default 100 Mbit/s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per probe method (default 20)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $DEFTLY_CACHE or ~/.cache/deftly")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from desktop.cli.export import ProgressLine
    from desktop.measured import measure_in_fresh_process
    from export.probe import export_probe
    from export.program import ExportConfig

    for name in ("q", "bs", "seq", "rank", "repeats"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1")
    cfg = ExportConfig(model=args.model, task=args.task, layers=args.layers, q=args.q, batch_size=args.bs,
                       seq_len=args.seq, rank=args.rank, base_weights=args.weights,
                       target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    line = ProgressLine()
    try:
        probe = export_probe(cfg, args.out, cache_dir=args.cache_dir, on_progress=line)
    finally:
        line.close()
    print(f"probe: {probe.manifest_path} ({'from the cache' if probe.from_cache else f'lowered in {probe.manifest.lower_seconds:.1f} s'})")
    profile = measure_in_fresh_process(probe.manifest_path, args.name, args.link_mbit_s, args.out / "profile.json",
                                       repeats=args.repeats)
    m = profile.measurement
    print(f"profile: {args.out / 'profile.json'} ({profile.source}, {m.facts.cpu}, {m.facts.cores} cores)")
    for method, seconds in m.method_s.items():
        print(f"  {method:12s} {1e3 * seconds:9.3f} ms  spread {100 * m.spread[method]:5.1f} %  "
              f"load {m.memory.load_bytes[method] / 2**20:6.1f} MiB  run {m.memory.run_bytes[method] / 2**20:6.1f} MiB")
    return 0
