"""`deftly plan`: match blocks to devices and split the link (CRUNCH + joint bandwidth).

Parses, calls `shared.planner.plan`, prints.  Example:

    deftly plan --fleet assets/fleets/lab3.toml --job assets/jobs/smollm2.toml [--json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from shared.fleet_io import load_fleet, load_job
from shared.planner import PlannerConfig, plan, summary_rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="match blocks to devices and split bandwidth (CRUNCH)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True, help="fleet file (.toml or .json)")
    parser.add_argument("--job", type=Path, required=True, help="job file (.toml or .json)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--solver", choices=("exact", "dual"), default="exact",
                        help="joint solver: exact T-search (default) or dual ascent")
    parser.add_argument("--equal-blocks", action="store_true",
                        help="for jobs without blocks: use equal-size blocks, do not search boundaries")
    parser.add_argument("--seeds", type=int, default=100, help="random baseline: matchings averaged (default 100)")
    parser.set_defaults(func=run)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return "infeasible" if not math.isfinite(value) else f"{value:.2f} s"


def run(args: argparse.Namespace) -> int:
    fleet, job = load_fleet(args.fleet), load_job(args.job)
    config = PlannerConfig(solver=args.solver, choose_boundaries=not args.equal_blocks, random_seeds=args.seeds)
    result = plan(fleet, job, config)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"plan for job {result.job!r} on fleet {result.fleet!r}  ({result.solver} solver)")
    print(_table(summary_rows(result)))
    print(f"\nround latency: {result.round_s:.2f} s")
    if result.dual_round_s is not None and result.dual_gap is not None:
        print(f"dual ascent: {result.dual_round_s:.2f} s, gap to exact {100 * result.dual_gap:.2f} %")
    if result.boundaries_chosen and result.boundary_saving is not None:
        how = {"exact": "the fastest contiguous split", "heuristic": "local search"}[result.boundary_method]
        print(f"block boundaries ({how}): {len(result.blocks)} blocks, {_seconds(result.round_s)} vs "
              f"{_seconds(result.equal_blocks_round_s)} with equal-size blocks "
              f"({100 * result.boundary_saving:.1f} % saved)")
    for note in result.notes:
        print(f"note: {note}")
    if result.baselines:
        print("\nbaselines (round latency):")
        print(_table([["baseline", "round", "vs plan"]] + [
            [name, _seconds(value), f"{value / result.round_s:.2f}x" if math.isfinite(value) else "-"]
            for name, value in result.baselines.items()]))
    return 0
