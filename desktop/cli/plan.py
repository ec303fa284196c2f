"""`deftly plan`: match blocks to devices and split the link (CRUNCH + joint bandwidth).

Parses, calls `shared.planner.plan`, prints.  Examples:

    deftly plan --fleet assets/fleets/lab3.toml --job assets/jobs/smollm2.toml [--json]
    deftly plan --fleet fleet.json --programs runs/demo/step.manifest.json \
                --probe runs/probe-fp32 --profile runs/probe-fp32/profile.json [--rounds 5 --local-steps 10]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from shared.errors import InputError
from shared.fleet_io import load_fleet, load_job
from shared.planner import PlannerConfig, plan, summary_rows


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="match blocks to devices and split bandwidth (CRUNCH)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True, help="fleet file (.toml or .json)")
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--job", type=Path, help="a hypothetical job file (.toml or .json)")
    job.add_argument("--programs", type=Path, nargs="+", metavar="MANIFEST",
                     help="an exported job: its program manifests (one whole-job program, or its block programs); "
                          "needs --probe and --profile for the memory")
    parser.add_argument("--probe", type=Path, help="with --programs: the probe the --profile was measured with")
    parser.add_argument("--profile", type=Path, help="with --programs: a measured profile (deftly profile) whose "
                                                     "memory terms stand for every device")
    parser.add_argument("--rounds", type=int, help="with --programs: rounds of the run the length mix is counted "
                                                   "for (default: deftly run's engine's, 5)")
    parser.add_argument("--local-steps", type=int, help="with --programs: steps per device per round "
                                                        "(default: the engine's, 10)")
    parser.add_argument("--seed", type=int, default=0, help="with --programs: the run's seed, which cuts the data "
                                                            "shards and orders the batches (default 0, as deftly run)")
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


def _job(args: argparse.Namespace, devices: int):
    if args.job is not None:
        return load_job(args.job)
    from desktop.measured import load_measured_job, load_profile

    if args.probe is None or args.profile is None:
        raise InputError("--programs needs --probe and --profile (the job's memory is measured, not written)")
    return load_measured_job(args.programs, args.probe, load_profile(args.profile), devices, rounds=args.rounds,
                             local_steps=args.local_steps, seed=args.seed)


def _mix(step_mix) -> str:
    return ", ".join(f"T={length} {100 * share:.0f} %" for length, share in step_mix)


def run(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    job = _job(args, len(fleet.devices))
    config = PlannerConfig(solver=args.solver, choose_boundaries=not args.equal_blocks, random_seeds=args.seeds)
    result = plan(fleet, job, config)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"plan for job {result.job!r} on fleet {result.fleet!r}  ({result.solver} solver)")
    print(_table(summary_rows(result)))
    print(f"\nround latency: {result.round_s:.2f} s")
    if result.step_mix:
        print(f"steps priced at each length: {_mix(result.step_mix)}")
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
