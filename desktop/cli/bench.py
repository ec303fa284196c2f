"""`deftly bench NAME`: run one benchmark and write bench/results/NAME.json (+ PNG)."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# benchmark name -> module with `add_arguments(parser)` and `run(args) -> dict`.
BENCHMARKS = {
    "plan": "desktop.bench.plan",
    "prge": "desktop.bench.prge",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and write bench/results/")
    names = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = names.add_parser(name, help=(module.__doc__ or name).splitlines()[0])
        sub.add_argument("--out-dir", type=Path, default=Path("bench/results"),
                         help="where NAME.json and NAME.png go (default: bench/results)")
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
