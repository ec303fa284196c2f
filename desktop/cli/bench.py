"""`deftly bench NAME`: run one benchmark and write bench/results/NAME.json (+ PNG)."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

# benchmark name -> (module with `add_arguments(parser)` and `run(args) -> dict`, help).
# Modules are imported only for the benchmark chosen: `bench plan` must not pay for torch.
BENCHMARKS = {
    "plan": ("desktop.bench.plan", "planner exactness, dual-ascent gap, speed, gain over baselines"),
    "profile": ("desktop.bench.profile", "the cost model from the probe against block programs: step time, peak RSS"),
    "prge": ("desktop.bench.prge", "P-RGE in ExecuTorch vs MeZO, eager P-RGE and first-order LoRA"),
    "agent": ("desktop.bench.agent", "the device agent: transfers, resume, metric latency, memory, fuzz, faults"),
    "coop": ("desktop.bench.coop", "does cooperation learn? blocks trained in rounds and merged, beside one device"),
    "e2e": ("desktop.bench.e2e", "a simulated 3-device lab trains SmolLM2 with the engine: prediction error, gain"),
    "scale": ("desktop.bench.scale", "one engine drives 10, 30 and 100 agents: its overhead per round"),
    "lowering": ("desktop.bench.lowering", "a plan's programs from a cold and a warm cache, and where lowering time goes"),
    "ui": ("desktop.bench.ui", "100 devices streaming into the dashboard: worst frame, dropped points"),
    "install": ("desktop.bench.install", "the device agent's install, built the documented way, per platform"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and write bench/results/")
    names = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = names.add_parser(name, help=help_text)
        sub.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                         help="where NAME.json and NAME.png go (default: bench/results)")
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(func=lambda args, module=module: _run(module, args))


def _run(module, args: argparse.Namespace) -> int:
    results = module.run(args)
    print(json.dumps(results, indent=2, default=str)[:4000])
    return 0
