"""e2e: a simulated three-device lab training SmolLM2 on Rotten Tomatoes with the engine, on real agents.

Measures, in one run (`deftly bench e2e`), on three ``deftly-agent`` processes
over loopback simulating a Raspberry Pi 4, a mid-range phone and a laptop
(``--simulate``: their compute speed on a simulated clock, memory cap and link
rate; see the README's "Simulated devices"):

* the planned run: ``--rounds`` rounds of ``--local-steps`` steps, the merged
  adapter's validation accuracy each round, test accuracy at the end;
* ``worst_prediction_error``: the largest |measured − predicted| / measured
  round time over devices and rounds, with the table (``prediction``): measured
  is the download until the agent took the round, its compute on the device's
  clock, and the upload of its block; predicted is the plan's compute + comm.
  Each row also holds the parts side by side (``measured_comm_s`` = download +
  upload beside ``predicted_comm_s``, ``measured_compute_s`` beside
  ``predicted_compute_s``); both runs pace each device's transfers at its
  plan's share of the link (``StartRound.link_bytes_per_s``), so the comm
  measured is the split's, and ``worst_comm_error`` says how close it came;
* the baseline run: the same agents and job with equal-size blocks matched at
  random and equal link shares (``--policy equal_random``), ``--random-rounds``
  rounds; ``gain_vs_equal_random`` = 1 − (the plan's measured round latency ÷
  the baseline's), each the mean over rounds of the slowest device's round;
* beside them the planner's own prediction of the same ratio, and
  ``bench/results/coop.json``'s in-process accuracy for the cooperative job when
  that file exists.

``--model``/``--task``/``--layers`` run it on another job (the tests use a tiny model).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from pathlib import Path

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.events import DeviceRoundDone, PlanMade
from desktop.engine.local import LocalAgent

ROOT = Path(__file__).resolve().parents[2]
LAB = (("pi4", "pi4-4gb"), ("phone", "midrange-phone"), ("laptop", "laptop"))  # (name, device class)
TOKEN = "bench-e2e"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the planned run (default 5)")
    parser.add_argument("--random-rounds", type=int, default=2, help="rounds of the baseline run (default 2)")
    parser.add_argument("--local-steps", type=int, default=10, help="steps per device per round (default 10)")
    parser.add_argument("--eval-limit", type=int, default=300, help="validation examples per round (default 300)")
    parser.add_argument("--test-limit", type=int, default=None, help="test examples at the end (default: all)")
    parser.add_argument("--model", default=None, help="default: smollm2")
    parser.add_argument("--task", default=None, help="default: rotten_tomatoes")
    parser.add_argument("--layers", default=None, help="default: the exporter's (top:8)")
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="export and profile caches")
    parser.add_argument("--work-dir", type=Path, default=None, help="agents' state and the runs (default: a "
                        "temporary folder)")


class Lab:
    """Three agent processes (``desktop.engine.local.LocalAgent``); :meth:`close` ends them."""

    def __init__(self, root: Path) -> None:
        self.root, self.agents = root, []

    def start(self) -> list[str]:
        for name, device_class in LAB:
            agent = LocalAgent(self.root / name, ["--name", name, "--token", TOKEN, "--simulate", device_class,
                                                  "--no-advertise"])
            self.agents.append(agent)
            agent.start()
        return [agent.address for agent in self.agents]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()


async def one_run(addresses: list[str], job: JobSpec, out: Path, args: argparse.Namespace, policy: str,
                  rounds: int) -> dict:
    engine = Engine(EngineConfig(job=job, out=out, rounds=rounds, local_steps=args.local_steps,
                                 agents=tuple(addresses), token=TOKEN, policy=policy, seed=0,
                                 eval_limit=args.eval_limit, test_limit=args.test_limit, test=policy == "planned",
                                 cache_dir=args.cache_dir, wait_s=600.0))
    plans, parts = [], {}

    def take(event) -> None:
        if isinstance(event, PlanMade):
            plans.append(event.plan)
        elif isinstance(event, DeviceRoundDone):  # the measured parts of a device's round
            parts[(event.round, event.device)] = event

    engine.subscribe(take)
    started = time.monotonic()
    result = await engine.run()
    from shared.events import Round, read_events

    events = read_events(out / "metrics.jsonl")
    merged = [e for e in events if isinstance(e, Round)]
    eval_data = engine.manifest.file("data", engine.eval_manifest_path)  # the job's tokenised splits
    return {"result": result, "rounds": merged, "plans": plans, "parts": parts, "wall_s": time.monotonic() - started,
            "eval_data": eval_data, "compute": compute_by_round(events),
            "profiles": {view.name: view.profile for view in engine.state.devices.values() if view.profile}}


def prediction_table(rounds, plans, parts) -> list[dict]:
    """Per round and device: the measured round time and its parts beside the plan's prediction of each.

    ``predicted_s`` is the engine's prediction made as the round started (the lengths the
    round's steps would run, calibrated by the device's earlier steps: ``desktop.engine.predict``);
    ``planned_s`` the plan's, the same every round.

    Args:
        rounds: the run's merged rounds (``shared.events.Round``).
        plans: the plans made (``PlanView``), in order: a round is predicted by the last one starting at or before it.
        parts: (round, device id) -> its ``DeviceRoundDone`` (download, compute, upload).
    """
    rows = []
    for r in rounds:
        plan = [p for p in plans if p.first_round <= r.round][-1]
        by_name = {a.name: a for a in plan.assignments}
        for device, measured in sorted(r.measured_round_s.items()):
            predicted = r.predicted_round_s.get(device, math.nan)
            planned = r.planned_round_s.get(device, math.nan)
            row = {"round": r.round, "device": device, "measured_s": measured, "predicted_s": predicted,
                   "error": abs(measured - predicted) / measured if measured > 0 else math.nan,
                   "planned_s": planned,
                   "error_vs_plan": abs(measured - planned) / measured if measured > 0 else math.nan}
            part, done = by_name.get(device), None
            if part is not None:
                done = parts.get((r.round, part.device))
                row.update(predicted_comm_s=part.comm_s, predicted_compute_s=part.compute_s, share=part.share)
            if done is not None and done.download_s is not None and done.upload_s is not None:
                row.update(measured_comm_s=done.download_s + done.upload_s, measured_download_s=done.download_s,
                           measured_upload_s=done.upload_s, measured_compute_s=done.seconds)
            rows.append(row)
    return rows


def add_compute_at_round_mix(table: list[dict], compute: list[dict], plans, profiles: dict) -> None:
    """Each row of ``table`` gets ``predicted_compute_at_round_mix_s``: the cost model's compute
    for the steps the round actually ran, Σ_T n_T · t_step(T, d) (``steps_by_seq_len`` × the
    profile's step time at each length, at the block's depth d), beside the plan's
    prediction for the job's expected mix: their difference is the mix's sampling, the
    rest the cost model's error. None where the round's plan or profile is unknown."""
    from shared.costmodel import length_step_times

    ran = {(row["round"], row["device"]): row["steps_by_seq_len"] for row in compute}
    for row in table:
        plan = max((p for p in plans if p.first_round <= row["round"]), key=lambda p: p.first_round, default=None)
        part = None if plan is None else next((a for a in plan.assignments if a.name == row["device"]), None)
        profile, steps = profiles.get(row["device"]), ran.get((row["round"], row["device"]))
        if part is None or part.first_layer is None or profile is None or steps is None:
            row["predicted_compute_at_round_mix_s"] = None
            continue
        row["predicted_compute_at_round_mix_s"] = sum(
            n * float(length_step_times(profile, plan.layers, int(length))[part.first_layer])
            for length, n in steps.items())


def worst_comm_error(table: list[dict]) -> float:
    """The largest |measured − predicted| / measured comm over the rows that hold both (nan: none does)."""
    errors = [abs(row["measured_comm_s"] - row["predicted_comm_s"]) / row["measured_comm_s"] for row in table
              if row.get("measured_comm_s", 0) > 0 and "predicted_comm_s" in row]
    return max(errors) if errors else math.nan


def worst_error_at_round_mix(table: list[dict]) -> float:
    """The largest |measured − predicted| / measured round time when the prediction takes the
    lengths the round ran (``predicted_comm_s`` + ``predicted_compute_at_round_mix_s``), so the
    mix's sampling from round to round is not counted (nan: no row holds both)."""
    errors = [abs(row["measured_s"] - (row["predicted_comm_s"] + row["predicted_compute_at_round_mix_s"]))
              / row["measured_s"] for row in table
              if row.get("predicted_compute_at_round_mix_s") is not None and "predicted_comm_s" in row
              and row["measured_s"] > 0]
    return max(errors) if errors else math.nan


def compute_by_round(events) -> list[dict]:
    """Each device's compute per round: the sum of its steps' seconds (on its simulated clock)."""
    from shared.events import Step

    sums: dict[tuple[int, str], list[Step]] = {}
    for event in events:
        if isinstance(event, Step) and event.device is not None and event.round is not None:
            sums.setdefault((event.round, event.device), []).append(event)
    return [{"round": r, "device": d, "compute_s": sum(step.seconds for step in steps), "steps": len(steps),
             "steps_by_seq_len": {str(n): sum(step.seq_len == n for step in steps)
                                  for n in sorted({step.seq_len for step in steps})}}
            for (r, d), steps in sorted(sums.items())]


def round_latency(rounds) -> float:
    """Mean over rounds of the slowest device's measured round."""
    return sum(max(r.measured_round_s.values()) for r in rounds) / len(rounds)


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    acc = results["accuracy_per_round"]
    left.plot(range(1, len(acc) + 1), acc, "o-", color="C2", label="merged adapter, validation")
    if results["final_accuracy"].get("test") is not None:
        left.axhline(results["final_accuracy"]["test"], color="C3", ls="--",
                     label=f"test at the end: {results['final_accuracy']['test']:.3f}")
    left.set_xlabel("round")
    left.set_ylabel("accuracy")
    left.legend(fontsize=8)
    left.set_title("cooperative training, global accuracy")
    devices = sorted({row["device"] for row in results["prediction"]})
    for i, device in enumerate(devices):
        rows = [row for row in results["prediction"] if row["device"] == device]
        middle.plot([r["round"] for r in rows], [r["measured_s"] for r in rows], "o-", color=f"C{i}",
                    label=f"{device} measured")
        middle.plot([r["round"] for r in rows], [r["predicted_s"] for r in rows], "x--", color=f"C{i}",
                    label=f"{device} predicted at round start")
        middle.plot([r["round"] for r in rows], [r["planned_s"] for r in rows], ":", color=f"C{i}", alpha=0.6,
                    label=f"{device} plan")
    middle.set_xlabel("round")
    middle.set_ylabel("round time (s)")
    middle.set_title(f"predicted vs measured (worst error {100 * results['worst_prediction_error']:.1f} %)")
    middle.legend(fontsize=7)
    bars = {"plan (measured)": results["plan_round_s"], "equal-bw random (measured)": results["random_round_s"],
            "plan (predicted)": results["plan_predicted_round_s"],
            "random (predicted)": results["random_predicted_round_s"]}
    right.bar(range(len(bars)), list(bars.values()), color=["black", "C1", "grey", "C1"])
    right.set_xticks(range(len(bars)), [k.replace(" (", "\n(") for k in bars], fontsize=8)
    right.set_ylabel("round latency (s)")
    right.set_title(f"gain vs equal-bandwidth random: {100 * results['gain_vs_equal_random']:.0f} %")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def served_test_accuracy(adapter_dir: Path, data_path: Path, model: str | None) -> dict:
    """The final adapter served with transformers + peft on the test split, with and without its class bias.

    A user loading the adapter with PEFT alone gets ``without_bias``; ``with_bias`` is the
    classifier deftly trained (``export.serving``).
    """
    from export.models import load_model
    from export.serving import load_adapter, served_accuracy
    from shared.task_data import load_splits

    served = load_adapter(load_model(model or "smollm2").model, adapter_dir)
    figures = served_accuracy(served, load_splits(data_path)["test"])
    return {"with_bias": figures.with_bias, "without_bias": figures.without_bias, "examples": figures.examples}


def run(args: argparse.Namespace) -> dict:
    job = JobSpec(model=args.model, task=args.task, layers=args.layers, seq=args.seq)
    with tempfile.TemporaryDirectory(prefix="deftly-e2e-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        lab = Lab(work / "agents")
        lab.root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        try:
            addresses = lab.start()
            planned = asyncio.run(one_run(addresses, job, work / f"planned-{stamp}", args, "planned", args.rounds))
            baseline = asyncio.run(one_run(addresses, job, work / f"random-{stamp}", args, "equal_random",
                                           args.random_rounds))
        finally:
            lab.close()
    table = prediction_table(planned["rounds"], planned["plans"], planned["parts"])
    add_compute_at_round_mix(table, planned["compute"], planned["plans"], planned["profiles"])
    random_table = prediction_table(baseline["rounds"], baseline["plans"], baseline["parts"])
    plan, random_plan = planned["plans"][0], baseline["plans"][0]
    plan_round, random_round = round_latency(planned["rounds"]), round_latency(baseline["rounds"])
    result = planned["result"]
    coop_path = ROOT / "bench" / "results" / "coop.json"
    coop = json.loads(coop_path.read_text()) if coop_path.exists() else None
    results = {
        # The engine's per-round prediction (made as each round started).
        "worst_prediction_error": max(row["error"] for row in table),
        # The plan's one figure for every round (the job's expected mix of lengths, uncalibrated).
        "worst_error_vs_plan": max(row["error_vs_plan"] for row in table),
        "prediction": table,
        "worst_comm_error": worst_comm_error(table),  # the paced transfers against the plan's comm
        # The cost model alone: the plan's comm plus its compute for the lengths each round ran.
        "worst_error_at_round_mix": worst_error_at_round_mix(table),
        "random_prediction": random_table,  # the baseline's, paced at its equal shares
        "random_worst_comm_error": worst_comm_error(random_table),
        "gain_vs_equal_random": 1.0 - plan_round / random_round,
        "plan_round_s": plan_round,
        "random_round_s": random_round,
        "plan_predicted_round_s": plan.round_s,
        "random_predicted_round_s": random_plan.round_s,
        "planner_gain_vs_equal_random": 1.0 - plan.round_s / random_plan.round_s,
        "plan_baselines_s": dict(plan.baselines),  # the planner's prediction for each baseline rule, same lab
        "accuracy_per_round": [r.accuracy for r in planned["rounds"]],
        "final_accuracy": {"validation": result.val_accuracy, "test": result.test_accuracy},
        "served_test_accuracy": served_test_accuracy(Path(result.adapter), planned["eval_data"], args.model),
        "coop_json": None if coop is None else {k: coop.get(k) for k in ("cooperative_accuracy", "single_accuracy",
                                                                          "rounds", "local_steps")},
        "rounds": len(planned["rounds"]),
        "random_rounds": len(baseline["rounds"]),
        "local_steps": args.local_steps,
        "eval_limit": args.eval_limit,
        "devices": [{"name": name, "simulates": device_class} for name, device_class in LAB],
        "plan": [{"device": a.name, "block": a.block, "share": a.share, "predicted_round_s": a.round_s,
                  "predicted_compute_s": a.compute_s, "predicted_comm_s": a.comm_s} for a in plan.assignments],
        "measured_compute": planned["compute"],  # per device and round, beside the plan's predicted_compute_s
        "random_plan": [{"device": a.name, "block": a.block, "share": a.share} for a in random_plan.assignments],
        "job": plan.job,
        "wall_s": {"planned": planned["wall_s"], "random": baseline["wall_s"]},
        "simulated": True,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "e2e.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    draw(results, out_dir / "e2e.png")
    return results
