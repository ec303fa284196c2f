"""planner: exactness vs brute force, dual-ascent gap, planning time, gain over baselines.

Measures, in one run (`deftly bench plan`):

* `exactness`: on random instances up to 8 blocks x 8 devices (real cost model,
  random profiles, random block splits so payloads differ, duplicated devices
  for ties, tight memory), CRUNCH under a random fixed split against brute
  force, and the exact joint solver against brute force.  A mismatch is an
  instance where either differs (CRUNCH exactly, joint beyond 1e-9 relative).
* `exactness.boundaries`: on random jobs without blocks (up to 6 devices x 8
  layers), `plan` against brute force over every contiguous split, and the
  boundary heuristic (forced) against the same: worst excess, bound violations.
* `dual_ascent_gap`: the worst relative excess of dual ascent over the exact
  joint optimum on the same instances.
* `time_s`: wall time of `plan()` (boundary choice, exact and dual solves,
  no baselines) for synthetic fleets of 8, 64 and 256 devices x 30 layers;
  the median of `--repeats` runs.
* `gain_vs_equal_random`: 1 - plan / (mean round latency of random blocks with
  equal bandwidth) on the 10-device classroom fleet with the SmolLM2 job.
* `baselines`: every baseline's round latency (s) beside the plan's, on every
  example fleet, for each example job it can run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from shared.bandwidth import brute_force_joint, joint_dual_ascent, joint_exact
from shared.costmodel import block_costs, latency
from shared.crunch import brute_force_minmax, crunch
from shared.errors import InputError
from shared.fleet_io import fleet_from_dict, load_fleet, load_job
from shared.planner import PlannerConfig, brute_force_round, plan
from shared.profiles import Block, DeviceProfile, Fleet, Job

ROOT = Path(__file__).resolve().parents[2]
FLEETS = ("lab3", "classroom10", "synthetic256")
JOBS = ("smollm2", "smollm2_blocks")

# The synthetic fleets draw their devices from this hypothetical fleet (its header says where
# its numbers come from): no timing is written here.
PROTOTYPES = ROOT / "assets/fleets/classroom10.toml"


def synthetic_devices(n: int, seed: int, prototypes: Fleet) -> list[dict]:
    """n devices, each a random prototype with its compute, memory and link jittered by up to ±25 %.

    Returns:
        Device tables as a fleet file holds them.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = prototypes.devices[int(rng.integers(len(prototypes.devices)))]
        speed, memory, link = rng.uniform(0.75, 1.25, 3)
        out.append({"name": f"{base.name}-{i:03d}",
                    "layer_s_bs": [round(t * speed, 6) for t in base.layer_s_bs],
                    "layer_s_wide": [round(t * speed, 6) for t in base.layer_s_wide],
                    "head_s": round(base.head_s * speed, 6), "memory_gib": round(base.memory_bytes * memory / 2**30, 3),
                    "link_mbit_s": round(base.link_bytes_per_s * link * 8 / 1e6, 1)})
    return out


def synthetic_fleet(n: int, seed: int) -> Fleet:
    """The synthetic fleet as profiles (the same draw `write_synthetic` puts in a file)."""
    return fleet_from_dict({"name": f"synthetic{n}", "device": synthetic_devices(n, seed, load_fleet(PROTOTYPES))},
                           f"synthetic{n}")


def write_synthetic(n: int, path: Path, seed: int | None = None) -> None:
    """Write assets/fleets/synthetic<n>.toml (seed defaults to n)."""
    seed = n if seed is None else seed
    lines = [
        f"# deftly plan --fleet assets/fleets/synthetic{n}.toml --job assets/jobs/smollm2.toml",
        "#",
        f"# A HYPOTHETICAL fleet of {n} devices for planner scaling: no device here was measured, and",
        "# the plan marks every one 'estimated'.  Generated:",
        f"#   .venv/bin/python -c \"from desktop.bench.plan import write_synthetic; "
        f"write_synthetic({n}, 'assets/fleets/synthetic{n}.toml')\"",
        f"# Each device is a random device of classroom10.toml (numpy seed {seed}; see its header for",
        "# where those numbers come from) with its compute, memory and link each jittered",
        "# uniformly by up to +-25 %.",
        "",
        f'name = "synthetic{n}"',
        "",
    ]
    for d in synthetic_devices(n, seed, load_fleet(PROTOTYPES)):
        lines.append("[[device]]")
        lines += [f"{k} = {json.dumps(v[0] if isinstance(v, list) and len(v) == 1 else v)}" for k, v in d.items()]
        lines.append("")
    Path(path).write_text("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instances", type=int, default=1000, help="random instances for exactness (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timing runs per fleet size, median kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")


def _random_devices(rng: np.random.Generator, n_dev: int) -> tuple[DeviceProfile, ...]:
    """Heterogeneous devices: per-layer times over two decades, memory 0.4-1.2 GiB, links 0.06-6 MB/s,
    and (30 % of fleets) half the devices identical to the first, for ties."""
    speeds = 10 ** rng.uniform(-3, -1, n_dev)
    if n_dev > 1 and rng.random() < 0.3:
        speeds[rng.integers(n_dev, size=n_dev // 2)] = speeds[0]
    return tuple(DeviceProfile(f"d{k}", (float(s),), (float(s * rng.uniform(2, 10)),), float(s * rng.uniform(1, 4)),
                               float(rng.uniform(0.4, 1.2) * 2**30),
                               float(rng.uniform(5, 50) * 1e6 / 8 * rng.choice([1e-2, 1.0])))
                 for k, s in enumerate(speeds))


def _random_job(rng: np.random.Generator, layers: int, blocks: tuple[Block, ...] = ()) -> Job:
    return Job("bench", layers, 0, layers - 1, float(rng.uniform(1e4, 4e5)), 4, 4, int(rng.integers(1, 6)),
               0.3 * 2**30, float(rng.uniform(0.01, 0.08)) * 2**30, blocks=blocks)


def random_instance(rng: np.random.Generator):
    """A random planning instance with fixed blocks, through the real cost model: (costs, shares)."""
    n_dev = int(rng.integers(1, 9))
    n_blocks = int(rng.integers(1, min(n_dev, 8) + 1))
    layers = int(rng.integers(n_blocks, 17))
    devices = _random_devices(rng, n_dev)
    cuts = np.sort(rng.choice(np.arange(1, layers), n_blocks - 1, replace=False)) if n_blocks > 1 else []
    bounds = [0, *[int(c) for c in cuts], layers]
    job = _random_job(rng, layers)
    blocks = tuple(Block(f"b{i}", lo, hi - 1, job.layer_payload_bytes * (hi - lo))
                   for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])))
    shares = rng.dirichlet(np.ones(n_dev))
    return block_costs(Fleet("bench", devices), job, blocks), shares


def exactness(instances: int, seed: int) -> tuple[dict, float]:
    """CRUNCH and the exact joint solver vs brute force; worst dual-ascent gap."""
    rng = np.random.default_rng(seed)
    mismatches, worst_gap = 0, 0.0
    for _ in range(instances):
        costs, shares = random_instance(rng)
        lat = latency(costs, shares)
        match, expected = crunch(lat), brute_force_minmax(lat)
        if (match.round_s if match else math.inf) != expected:
            mismatches += 1
        exact, reference = joint_exact(costs), brute_force_joint(costs)
        got = exact.round_s if exact else math.inf
        if not _same(got, reference):
            mismatches += 1
        if exact is not None:
            dual = joint_dual_ascent(costs)
            worst_gap = max(worst_gap, dual.round_s / exact.round_s - 1.0)
    return {"instances": instances, "mismatches": mismatches}, worst_gap


def _same(got: float, reference: float) -> bool:
    return got == reference or abs(got - reference) <= 1e-9 * reference


def boundary_exactness(instances: int, seed: int) -> dict:
    """`plan` on jobs without blocks against brute force over every contiguous split.

    Up to 6 devices and 8 trainable layers (tight memory, so some jobs fit only in
    uneven splits and some in none).  A mismatch is a plan whose round latency differs
    from the brute force's beyond 1e-9 relative, or an error where a split fits.  The
    same jobs are planned again with the heuristic forced wherever more than 3 devices
    can hold a block (exact limit 3): its worst excess over the optimum, and any
    instance where its lower bound lies above the optimum.
    """
    rng = np.random.default_rng(seed)
    mismatches, bound_violations, worst_excess = 0, 0, 0.0
    heuristic = PlannerConfig(baselines=False, exact_max_devices=3)
    for _ in range(instances):
        n_dev = int(rng.integers(1, 7))
        fleet, job = Fleet("bench", _random_devices(rng, n_dev)), _random_job(rng, int(rng.integers(1, 9)))
        reference = brute_force_round(fleet, job)
        got = _planned(fleet, job, PlannerConfig(baselines=False))
        if not _same(got.round_s if got else math.inf, reference):
            mismatches += 1
        forced = _planned(fleet, job, heuristic)
        if forced is not None and math.isfinite(reference):
            worst_excess = max(worst_excess, forced.round_s / reference - 1.0)
            if forced.boundary_lower_bound_s is not None and forced.boundary_lower_bound_s > reference * (1 + 1e-9):
                bound_violations += 1
    return {"instances": instances, "mismatches": mismatches,
            "heuristic_worst_excess": worst_excess, "heuristic_bound_violations": bound_violations}


def _planned(fleet: Fleet, job: Job, config: PlannerConfig):
    try:
        return plan(fleet, job, config)
    except InputError:
        return None


def planning_times(repeats: int) -> dict[str, float]:
    job = load_job(ROOT / "assets/jobs/smollm2.toml")
    config = PlannerConfig(baselines=False)
    out = {}
    for n in (8, 64, 256):
        fleet = synthetic_fleet(n, seed=n)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan(fleet, job, config)
            runs.append(time.perf_counter() - start)
        out[str(n)] = statistics.median(runs)
    return out


def baselines_table() -> dict[str, dict[str, dict[str, float | None]]]:
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for fleet_name in FLEETS:
        fleet = load_fleet(ROOT / f"assets/fleets/{fleet_name}.toml")
        table[fleet_name] = {}
        for job_name in JOBS:
            job = load_job(ROOT / f"assets/jobs/{job_name}.toml")
            try:
                result = plan(fleet, job, PlannerConfig())
            except InputError as exc:  # e.g. more blocks than devices: say so in the results
                table[fleet_name][job_name] = {"error": str(exc)}
                continue
            row = {"plan": result.round_s, **result.baselines}
            table[fleet_name][job_name] = {k: (v if math.isfinite(v) else None) for k, v in row.items()}
    return table


def draw(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.3, 1]})
    names = ["plan", "equal_bandwidth", "random", "fastest_first", "memory_proportional",
             "lowest_throughput_window", "all_on_fastest"]
    fleets = list(results["baselines"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["baselines"][f]["smollm2"].get(name) for f in fleets]
        xs = [j + (i - len(names) / 2 + 0.5) * width for j in range(len(fleets))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = left.bar(xs, heights, width, label=name.replace("_", " "),
                        color="black" if name == "plan" else None)
        for bar, v in zip(bars, values):
            if v is None:
                left.text(bar.get_x() + width / 2, 0.5, "x", ha="center", color="red")
    left.set_xticks(range(len(fleets)), [f"{f}\n({results['baselines'][f]['smollm2'].get('plan', 0):.1f} s plan)"
                                          for f in fleets])
    left.set_ylabel("round latency (s), lower is better")
    left.set_title(f"SmolLM2 job: plan vs baselines  (gain vs equal-bw random on classroom10: "
                   f"{100 * results['gain_vs_equal_random']:.0f} %)", fontsize=10)
    left.legend(fontsize=8, ncol=2)
    sizes = list(results["time_s"])
    right.plot([int(s) for s in sizes], [results["time_s"][s] for s in sizes], "o-", label="plan() with boundary choice")
    right.axhline(1.0, color="red", linestyle="--", label="target for 256: 1 s")
    right.set_xscale("log", base=2)
    right.set_xticks([int(s) for s in sizes], sizes)
    right.set_ylim(0, max(1.1, 1.1 * max(results["time_s"].values())))
    right.set_xlabel("devices (x 30 layers)")
    right.set_ylabel("planning time (s)")
    ex = results["exactness"]
    bx = ex["boundaries"]
    right.set_title(f"exact: {ex['mismatches']} mismatches / {ex['instances']} instances,\n"
                    f"boundaries {bx['mismatches']} / {bx['instances']}; "
                    f"dual-ascent worst gap {100 * results['dual_ascent_gap']:.2f} %", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    exact, gap = exactness(args.instances, args.seed)
    exact["boundaries"] = boundary_exactness(max(1, args.instances // 4), args.seed)
    times = planning_times(args.repeats)
    table = baselines_table()
    room = table["classroom10"]["smollm2"]
    results = {
        "exactness": exact,
        "dual_ascent_gap": gap,
        "time_s": times,
        "gain_vs_equal_random": 1.0 - room["plan"] / room["random"],
        "baselines": table,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out_dir / "plan.png")
    print(json.dumps({k: v for k, v in results.items() if k != "baselines"}, indent=2))
    return results
