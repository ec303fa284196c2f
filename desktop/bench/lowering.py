"""lowering: where a plan's export time goes, and how long its programs take cold and warm.

Measures, in one run (`deftly bench lowering`):

* `plan_programs_cold_s`: wall time of `export.program.export_plan` for the default
  3-device plan of the top-8-layer job (3 block programs of `step` + `step_t32`, and
  the job's eval program of `eval` + `eval_t32`: 8 methods) from an empty cache, with
  `--workers` worker processes (default: one per core, as memory allows);
* `plan_programs_warm_s`: the same call again, every method found in the cache;
* `breakdown`: per program and method, the seconds of each lowering stage as the
  worker measured it (export: torch.export and tagging the weights; lower: the edge
  dialect and XNNPACK partitioning; emit: to_executorch; store: the .pte and the .ptd
  written into the cache, with the weights' sha256), and
  `stage_share`, each stage's share of their sum;
* `serial_s`: the sum of every method's stages, what one process lowering the same
  methods one after the other spends (the parallel speed-up is `serial_s / cold`);
* `load_average` before and after, and the cores: the machine this ran on may be shared,
  and its load inflates every figure (ratios hold better than seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from shared.errors import InputError

TARGETS = {"plan_programs_cold_s": 600.0}  # issue 19: a 3-device plan's programs in <= 10 minutes, cold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="model spec (default: embedded SmolLM2; 'tiny' for a smoke run)")
    parser.add_argument("--layers", default="top:8", help="the job's trainable layers (default top:8)")
    parser.add_argument("--blocks", default="22-24,25-27,28-29",
                        help="the plan's blocks (default: the top 8 layers of SmolLM2 in three)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core, as memory allows)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the model is cached (default: deftly's)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the fresh export cache and the programs go (default: a temporary directory)")


def run(args: argparse.Namespace) -> dict:
    from desktop.cli.export import ProgressLine
    from export.models import load_model, load_tokenizer, tiny_llama
    from export.program import ExportConfig, export_plan, parse_blocks
    from export.progress import METHOD_STAGES

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected 1 or more")
    blocks = parse_blocks(args.blocks)
    load_before = os.getloadavg()
    say = ProgressLine(plain=True)
    if args.model == "tiny":  # the smoke test's model: a 4-layer random Llama with SmolLM2's tokenizer
        loaded = tiny_llama(num_layers=4, hidden_size=64, tokenizer=load_tokenizer("smollm2", args.cache_dir, print))
        cfg = ExportConfig(model="tiny", layers=args.layers, seq_len=32, length_buckets=(16,), calibrate="none")
    else:
        loaded = load_model(args.model, cache_dir=args.cache_dir, progress=print)
        cfg = ExportConfig(model=args.model, layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="deftly-bench-lowering-") as tmp:
        work = Path(args.work_dir or tmp)
        cache = work / "cache"  # empty: the cold run lowers everything
        if cache.exists() and any(cache.iterdir()):
            raise InputError(f"--work-dir {work}: its cache/ is not empty, so the first export would not be cold")
        cold_events: list = []
        cold = export_plan(cfg, blocks, work / "cold", cache_dir=cache, loaded=loaded, workers=args.workers,
                           on_progress=lambda e: (cold_events.append(e), say(e)))
        warm = export_plan(cfg, blocks, work / "warm", cache_dir=cache, loaded=loaded, workers=args.workers,
                           on_progress=say)
    say.close()

    breakdown: dict[str, dict[str, float]] = {}
    for event in cold_events:
        if event.state == "end" and event.method and event.seconds is not None:
            breakdown.setdefault(f"{event.program}/{event.method}", {})[event.stage] = event.seconds
    stage_totals = {stage: sum(stages.get(stage, 0.0) for stages in breakdown.values()) for stage in METHOD_STAGES}
    serial = sum(stage_totals.values())
    preparation = {e.stage: e.seconds for e in cold_events
                   if e.state == "end" and not e.method and e.stage in ("load", "tokenise", "quantise", "calibrate")}
    results = {
        "model": loaded.model_id, "layers": args.layers, "blocks": [list(b) for b in blocks],
        "methods_lowered": cold.lowered, "methods_cached_on_warm": warm.cached,
        "workers": cold.workers, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "plan_programs_cold_s": round(cold.seconds, 1),
        "plan_programs_warm_s": round(warm.seconds, 2),
        "serial_s": round(serial, 1),
        "parallel_speedup": round(serial / max(cold.seconds, 1e-9), 2),
        "stage_share": {stage: round(total / serial, 3) for stage, total in stage_totals.items()} if serial else {},
        "stage_seconds": {stage: round(total, 1) for stage, total in stage_totals.items()},
        "preparation_s": preparation,
        "breakdown": breakdown,
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "targets": TARGETS,
        "meets_cold_target": cold.seconds <= TARGETS["plan_programs_cold_s"],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "lowering.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(breakdown, results, args.out_dir / "lowering.png")
    return results


def _plot(breakdown: dict[str, dict[str, float]], results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(breakdown)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.8))
    left = [0.0] * len(names)
    for stage, colour in (("export", "#8fb3d9"), ("lower", "#2f6db3"), ("emit", "#f0a04b"), ("store", "#b0b0b0")):
        values = [breakdown[n].get(stage, 0.0) for n in names]
        ax.barh(names, values, left=left, color=colour, label=stage)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds (as each worker measured them)")
    ax.set_title(f"lowering {results['model']}: cold {results['plan_programs_cold_s']:.0f} s wall "
                 f"({results['serial_s']:.0f} s of stages), warm {results['plan_programs_warm_s']:.1f} s")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
