"""profile: the cost model, fed by the probe, against block programs run in the runtime.

Measures, in one run (`deftly bench profile` → `bench/results/profile.json` + PNG),
for fp32 and int8 programs of the default job (the top 8 layers of SmolLM2):

* the probe, lowered into an empty cache (`probe_lower_s`: its `probe_units` side by
  side, one per core, as a user gets it), and beside it the same probe lowered as
  one unit in one process (`probe_lower_one_process_s`); this machine measured with
  the first in a fresh process (`device_agent.profile`);
* for every block start s of the job, the block program of layers s..last (1 to 8
  layers; ``step`` at the full sequence length), each run in a fresh process:
  its peak resident memory above the idle process (VmHWM, read before anything
  else loads) beside the memory model's M(s) + 2q·S_b (`shared.job_model.MemoryModel`);
  then its step timed side by side with the probe in that process, one step after
  each round of probe calls (`device_agent.profile.measure_profile`'s ``between``),
  the median step beside the cost model's t_step(s) from those probe times
  (`shared.costmodel.step_times`).  Side by side, because this machine is shared:
  a probe timed minutes before a program measured its own minute's load (block
  25-29's step took 0.56, 0.68 and 0.62 s alone in three runs within the hour).  The
  table keeps, beside it, the prediction from the probe measured once at the start
  (``predicted_step_s_probe_at_start``), as an agent measures once when it starts;
* `worst_step_prediction_error` and `worst_memory_prediction_error`: the largest
  |measured − predicted| / measured over the table (targets 0.10 and 0.15);
  `worst_step_prediction_error_probe_at_start` the same for the start probe;
  `worst_step_prediction_error_pair` the same measurement read as probe format 3 did
  (`pair_step_s`: one call's cost off every single call), beside it for comparison;
* per kind of weights, `layer_cost_s` (a layer's cost in a program, the chains' slope) and
  `call_cost_s` (what a call of that method costs beyond it), with the `steps` and `repeats` run;
* `plan_programs_cold_s` / `plan_programs_warm_s`: `export.program.export_plan`
  for the default 3-device plan's blocks from an empty cache, then again (target
  cold ≤ 600 s);
* the machine's load average before and after: a shared machine inflates times,
  and a load that changes between the probe and a program moves the step ratios.

`python -m desktop.bench.profile MANIFEST STEPS PROBE REPEATS ONE_THREAD` is the fresh process that
runs one program: it prints the idle RSS, the peak (VmHWM), the step times alone and
beside the probe, and the probe's profile, as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared.errors import InputError

TARGETS = {"worst_step_prediction_error": 0.10, "worst_memory_prediction_error": 0.15, "plan_programs_cold_s": 600.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="model spec (default: embedded SmolLM2; 'tiny' for a smoke run)")
    parser.add_argument("--layers", default="top:8", help="the job's trainable layers (default top:8)")
    parser.add_argument("--weights", default="fp32,int8",
                        help="comma-separated: fp32, int8 (default both; int8 alone writes profile_int8.json)")
    parser.add_argument("--plan-blocks", default="22-24,25-27,28-29",
                        help="the 3-device plan whose programs are lowered cold and warm ('' to skip)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block program (default 5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per probe method (default 20)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the model is cached (default: deftly's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="programs and the fresh caches (default: a temp dir)")
    parser.add_argument("--one-thread", action="store_true",
                        help="run the probe and the programs on one compute thread, as simulated agents do "
                             "(writes profile_one_thread.json)")


def _vm_hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def pair_layer_times(probe, method_s: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(L,) τ(l, bs) and τ(l, 2q·bs) as probe format 3 read them, from this probe's methods: the comparison.

    Format 3 took one call's own cost as two single ``layer_bs`` calls less the layer twice in
    one call (``layer_bs_x2`` here: the same method), clipped to [0, half the quickest layer
    method], off every layer method's single call; the chains' slopes replaced that in format 4.
    """
    from shared.probe import lay_out_layers, split_method

    single = [t for m, t in method_s.items() if m != "head" and split_method(m)[1:] == (1, None)]
    overhead = min(max(0.0, 2 * method_s["layer_bs"] - method_s["layer_bs_x2"]), 0.5 * min(single))
    bs, wide = lay_out_layers(probe, lambda m: method_s[m] - overhead, method_s["last_wide"] - overhead)
    return np.array(bs), np.array(wide)


def pair_step_s(probe, method_s: dict[str, float], first: int) -> float:
    """t_step of a block starting at ``first`` (every step at the full length) by probe format 3's reading."""
    bs, wide = pair_layer_times(probe, method_s)
    return float(bs[:first].sum() + wide[first:].sum() + method_s["head"])


def run_program(manifest: Path, steps: int, probe: Path, repeats: int, one_thread: bool = False) -> dict:
    """In this process: a block program's peak memory and steps, then its steps side by side with the probe.

    The program runs ``steps`` + 1 steps at the full length (the first loads the method
    and sizes the workspace: not timed); VmHWM is read then, before the probe loads.
    Then the probe is timed for ``repeats`` rounds with one program step after each.
    """
    import psutil

    from device_agent.profile import measure_profile
    from device_agent.program import Program, use_one_compute_thread
    from shared.profiles import profile_to_plain

    if one_thread:
        use_one_compute_thread()

    idle = psutil.Process().memory_info().rss
    program = Program(manifest, max_resident_methods=1)
    bs, T, q = program.batch_size, program.seq_len, program.q
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (bs, T))
    lengths, labels = np.full(bs, T), rng.integers(0, 2, bs)
    b = np.zeros(program.b_size, np.float32)
    z = rng.standard_normal((q, program.block_size)).astype(np.float32)
    def timed_step() -> float:
        start = time.perf_counter()
        program.step(ids, lengths, labels, b, z, 1e-3, 1e-2)
        return time.perf_counter() - start

    timed_step()  # loads the method and sizes the workspace: not timed
    alone = [timed_step() for _ in range(steps)]
    peak = _vm_hwm()  # the program's own peak: the probe has not loaded yet
    beside: list[float] = []
    profile = measure_profile(probe, "this-machine", 1e8, repeats=repeats, between=lambda: beside.append(timed_step()))
    return {"idle_bytes": idle, "peak_bytes": peak, "step_s_alone": float(np.median(alone)),
            "step_s": float(np.median(beside)), "step_spread": _spread(beside), "profile": profile_to_plain(profile)}


def _spread(times: list[float]) -> float:
    """(p90 - p10) / median."""
    return float((np.percentile(times, 90) - np.percentile(times, 10)) / np.median(times))


def _measure_program(manifest: Path, steps: int, probe: Path, repeats: int, one_thread: bool) -> dict:
    done = subprocess.run([sys.executable, "-m", "desktop.bench.profile", str(manifest), str(steps), str(probe),
                           str(repeats), "1" if one_thread else "0"], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"running {manifest} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _job(args: argparse.Namespace, weights: str):
    from export.models import load_model, load_tokenizer, tiny_llama
    from export.program import ExportConfig

    if args.model == "tiny":  # the smoke test's model: a 4-layer random Llama with SmolLM2's tokenizer
        loaded = tiny_llama(num_layers=4, hidden_size=64, tokenizer=load_tokenizer("smollm2", args.cache_dir, print))
        return loaded, ExportConfig(model="tiny", layers=args.layers, seq_len=32, methods=("step",),
                                    length_buckets=(), calibrate="none", base_weights=weights)
    loaded = load_model(args.model, cache_dir=args.cache_dir, progress=print)
    return loaded, ExportConfig(model=args.model, layers=args.layers, methods=("step",), length_buckets=(),
                                base_weights=weights)


def measure_weights(args: argparse.Namespace, weights: str, work: Path) -> dict:
    """Probe, profile and every block program of one kind of weights."""
    from desktop.measured import measure_in_fresh_process
    from export.lora import parse_layers
    from export.probe import export_probe
    from export.program import export_program
    from shared.costmodel import step_times
    from shared.job_model import memory_model
    from shared.manifest import Manifest
    from shared.profiles import Fleet, Job, profile_from_plain
    from shared.records import to_plain

    loaded, cfg = _job(args, weights)
    layers = parse_layers(cfg.layers, loaded.model.config.num_hidden_layers)
    # the probe as a user gets it (its units side by side, one per core), and beside it in one process
    probe = export_probe(cfg, work / f"probe-{weights}", cache_dir=work / f"probe-cache-{weights}", loaded=loaded)
    one_process = export_probe(cfg, work / f"probe-one-{weights}", cache_dir=work / f"probe-cache-one-{weights}",
                               loaded=loaded, workers=1)
    profile = measure_in_fresh_process(probe.manifest_path, "this-machine", 100.0,
                                       work / f"probe-{weights}" / "profile.json", repeats=args.repeats,
                                       one_thread=args.one_thread)
    probe_weights = (probe.manifest_path.parent / probe.manifest.files["weights"]).stat().st_size
    num_layers = probe.manifest.num_layers

    def predicted(measured) -> np.ndarray:
        """(L+1,) t_step(d) from one probe measurement, every step at the full length."""
        return step_times(Fleet("here", (measured,)), Job("probe", num_layers, layers[0], layers[-1], 1.0, cfg.q,
                                                          cfg.batch_size, 1, 0.0, 0.0))[0]

    at_start = predicted(profile)
    rows = []
    for first in layers:
        block = (first, layers[-1])
        result = export_program(replace(cfg, block=block),
                                work / weights / f"block-{first}" / "step.pte", cache_dir=work / "cache", loaded=loaded)
        manifest = Manifest.load(result.manifest_path)
        weights_bytes = manifest.file("weights", result.manifest_path).stat().st_size
        model = memory_model(probe.manifest, profile.measurement, weights_bytes, probe_weights)
        predicted_bytes = model.program_bytes(first) + 2 * cfg.q * 4 * manifest.block["size"]
        measured = _measure_program(result.manifest_path, args.steps, probe.manifest_path, args.repeats,
                                    args.one_thread)
        measured_bytes = measured["peak_bytes"] - measured["idle_bytes"]
        measured_profile = profile_from_plain(measured["profile"])
        beside = float(predicted(measured_profile)[first])
        beside_pair = pair_step_s(probe.manifest, measured_profile.measurement.method_s, first)
        step = measured["step_s"]
        rows.append({"weights": weights, "first_layer": first, "last_layer": layers[-1],
                     "predicted_step_s": beside, "measured_step_s": step,
                     "measured_step_spread": measured["step_spread"], "step_error": abs(step - beside) / step,
                     # the same measurement read as probe format 3 did (one call's cost off single calls)
                     "predicted_step_s_pair": beside_pair, "step_error_pair": abs(step - beside_pair) / step,
                     "predicted_step_s_probe_at_start": float(at_start[first]),
                     "measured_step_s_alone": measured["step_s_alone"],
                     "step_error_probe_at_start": abs(measured["step_s_alone"] - at_start[first])
                     / measured["step_s_alone"],
                     "predicted_peak_bytes": predicted_bytes, "measured_peak_bytes": measured_bytes,
                     "memory_error": abs(measured_bytes - predicted_bytes) / measured_bytes})
        print(f"{weights} block {first}-{layers[-1]}: step {1e3 * beside:.1f} ms predicted, {1e3 * step:.1f} "
              f"measured (probe at the start: {1e3 * at_start[first]:.1f} predicted, "
              f"{1e3 * measured['step_s_alone']:.1f} measured alone); peak {predicted_bytes / 2**20:.0f} MiB "
              f"predicted, {measured_bytes / 2**20:.0f} measured", flush=True)
    return {"probe_lower_s": probe.manifest.lower_seconds, "probe_lower_one_process_s": one_process.manifest.lower_seconds,
            "probe_units": len(probe.manifest.program_files()), "probe_method_s": profile.measurement.method_s,
            "probe_spread": profile.measurement.spread, "rows": rows, "machine": to_plain(profile.measurement.facts)}


def plan_programs(args: argparse.Namespace, work: Path) -> tuple[float | None, float | None]:
    """export_plan of the default plan's blocks from an empty cache, then warm."""
    from export.program import export_plan, parse_blocks

    if not args.plan_blocks:
        return None, None
    loaded, cfg = _job(args, "fp32")
    cfg = replace(cfg, methods=("step", "eval"), length_buckets=() if args.model == "tiny" else (32,))
    blocks = parse_blocks(args.plan_blocks)
    start = time.perf_counter()
    export_plan(cfg, blocks, work / "plan-cold", cache_dir=work / "plan-cache", loaded=loaded)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    export_plan(cfg, blocks, work / "plan-warm", cache_dir=work / "plan-cache", loaded=loaded)
    return cold, time.perf_counter() - start


def draw(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["table"]
    kinds = sorted({r["weights"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in zip(kinds, "os"):
        mine = [r for r in rows if r["weights"] == kind]
        xs = [r["first_layer"] for r in mine]
        axes[0].plot(xs, [r["measured_step_s"] for r in mine], marker + "-", label=f"{kind} measured")
        axes[0].plot(xs, [r["predicted_step_s"] for r in mine], marker + "--", label=f"{kind} predicted")
        axes[1].plot(xs, [r["measured_peak_bytes"] / 2**20 for r in mine], marker + "-", label=f"{kind} measured")
        axes[1].plot(xs, [r["predicted_peak_bytes"] / 2**20 for r in mine], marker + "--", label=f"{kind} predicted")
    axes[0].set(xlabel="block's first layer (block ends at the job's last)", ylabel="step time (s)",
                title=f"step: worst error {100 * results['worst_step_prediction_error']:.0f} % (target 10 %)")
    axes[1].set(xlabel="block's first layer", ylabel="peak RSS above idle (MiB)",
                title=f"memory: worst error {100 * results['worst_memory_prediction_error']:.0f} % (target 15 %)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['model']} {results['layers']}, compute threads: {results['compute_threads']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_name(kinds: list[str], one_thread: bool) -> str:
    """The results file's stem: an int8-only run sits beside the fp32 run's file instead of replacing it."""
    return "profile" + ("_int8" if kinds == ["int8"] else "") + ("_one_thread" if one_thread else "")


def run(args: argparse.Namespace) -> dict:
    from shared.probe import CHAINS, call_cost_s, layer_cost_s

    kinds = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not kinds or set(kinds) - {"fp32", "int8"}:
        raise InputError(f"--weights {args.weights!r}: expected fp32, int8 or both")
    if args.steps < 1 or args.repeats < 1:
        raise InputError("--steps and --repeats must be at least 1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="deftly-bench-profile-") as tmp:
        work = Path(args.work_dir or tmp)
        per_kind = {kind: measure_weights(args, kind, work) for kind in kinds}
        cold, warm = plan_programs(args, work)
    table = [row for kind in kinds for row in per_kind[kind]["rows"]]
    results = {
        "worst_step_prediction_error": max(r["step_error"] for r in table),
        "worst_memory_prediction_error": max(r["memory_error"] for r in table),
        "worst_step_prediction_error_probe_at_start": max(r["step_error_probe_at_start"] for r in table),
        "worst_step_prediction_error_pair": max(r["step_error_pair"] for r in table),
        "plan_programs_cold_s": cold, "plan_programs_warm_s": warm,
        "probe_lower_s": {kind: per_kind[kind]["probe_lower_s"] for kind in kinds},
        # the same probe lowered as one unit in one process (as before the units), in the same run
        "probe_lower_one_process_s": {kind: per_kind[kind]["probe_lower_one_process_s"] for kind in kinds},
        "probe_units": {kind: per_kind[kind]["probe_units"] for kind in kinds},
        "probe_method_s": {kind: per_kind[kind]["probe_method_s"] for kind in kinds},
        # per chained layer method: a layer's cost (the chains' slope) and what a call costs beyond it
        "layer_cost_s": {kind: {m: layer_cost_s(per_kind[kind]["probe_method_s"], m) for m in CHAINS
                                if m in per_kind[kind]["probe_method_s"]} for kind in kinds},
        "call_cost_s": {kind: {m: call_cost_s(per_kind[kind]["probe_method_s"], m) for m in CHAINS
                               if m in per_kind[kind]["probe_method_s"]} for kind in kinds},
        "targets": TARGETS, "model": args.model, "layers": args.layers, "steps": args.steps, "repeats": args.repeats,
        "compute_threads": 1 if args.one_thread else "the runtime's default (one per core)",
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, "cores": os.cpu_count(),
        # the CPU the table was measured on: step times (and the int8/fp32 ratio) move with it
        "machine": per_kind[kinds[0]]["machine"],
        "table": table,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = results_name(kinds, args.one_thread)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out_dir / f"{name}.png")
    return results


if __name__ == "__main__":
    print(json.dumps(run_program(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                                 sys.argv[5] == "1")))
