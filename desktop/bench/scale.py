"""scale: one engine driving 10, 30 and 100 agents; its own overhead per round, and the planner's time.

Measures, in one run (`deftly bench scale`):

* For each fleet size N: N real agents (``device_agent.host``: up to
  ``--per-process`` agents share one process, each still its own WebSocket
  endpoint with its own state dir, store, outbox and compute thread), found by
  address, paired, profiled with the probe, planned (the tiny model's two blocks;
  ``replicas``: every other device trains a replica of one, so all N train every
  round), shipped their program and shard, and trained for ``--rounds`` rounds of
  ``--local-steps`` steps, with the merged adapter evaluated each round.
* ``overhead_s[N]``: the engine's own time per round: the round's wall time
  (RoundStarted to RoundMerged) minus the time during which at least one device
  was busy with its round (from the engine sending it the round to its block
  arriving: its compute and both transfers), so what is left is the engine's
  work that no device overlaps: the fan-out before the first device starts, and
  after the last block arrives the merge, the coordinator's evaluation
  (``--eval-limit`` examples), writing the state and b. The mean over rounds,
  with each round's value in ``rounds``.
* ``engine_cpu_s[N]``: CPU seconds of the engine's process per round (every
  metric received and written, every b sent, every block merged), the cost
  that grows with N even where it overlaps the devices.
* ``planner_s[N]``: wall time of the planner call for N devices.

The agents run on the same cores as the engine, so each device's round is far
slower than it would be alone; that inflates the devices' busy time, not the
overhead measured outside it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.events import DeviceRoundDone, DeviceStatus, PlanMade, RoundMerged, RoundStarted

ROOT = Path(__file__).resolve().parents[2]
SIZES = (10, 30, 100)
TOKEN = "bench-scale"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="fleet sizes (default 10,30,100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per fleet (default 3)")
    parser.add_argument("--local-steps", type=int, default=2, help="steps per device per round (default 2)")
    parser.add_argument("--per-process", type=int, default=25, help="agents per host process (default 25)")
    parser.add_argument("--eval-limit", type=int, default=64, help="validation examples per round (default 64)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="export cache (default: the usual one)")


def tiny_model(folder: Path) -> Path:
    """The tests' tiny Llama (2 layers, hidden 64, SmolLM2's tokenizer) as a Hugging Face directory."""
    from export.models import load_tokenizer, tiny_llama

    if not (folder / "config.json").exists():
        tokenizer = load_tokenizer(progress=lambda _m: None)
        loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=tokenizer)
        loaded.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


class Hosts:
    """Agent host processes; :meth:`close` ends every one."""

    def __init__(self, root: Path) -> None:
        self.root, self.processes = root, []

    def start(self, count: int, per_process: int, prefix: str) -> list[str]:
        addresses = []
        for p in range(math.ceil(count / per_process)):
            n = min(per_process, count - p * per_process)
            log = open(self.root / f"{prefix}host{p}.log", "ab")
            process = subprocess.Popen(
                [sys.executable, "-m", "device_agent.host", "--count", str(n), "--state-root", str(self.root),
                 "--name-prefix", f"{prefix}{p}-", "--token", TOKEN], stdout=subprocess.PIPE, stderr=log,
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
            self.processes.append(process)
            for line in process.stdout:
                if line.strip() == "ready":
                    break
                addresses.append(f"127.0.0.1:{json.loads(line)['port']}")
        if len(addresses) != count:
            raise RuntimeError(f"started {len(addresses)} of {count} agents; see {self.root}/*.log")
        return addresses

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self.processes = []


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end] intervals."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


async def drive(addresses: list[str], job: JobSpec, out: Path, args: argparse.Namespace) -> dict:
    engine = Engine(EngineConfig(job=job, out=out, rounds=args.rounds, local_steps=args.local_steps,
                                 agents=tuple(addresses), token=TOKEN, replicas=True, eval_limit=args.eval_limit,
                                 test=False, cache_dir=args.cache_dir, wait_s=600.0))
    marks: dict[int, dict] = {}
    planner: list[float] = []

    def on_event(event) -> None:
        now = time.monotonic()
        if isinstance(event, RoundStarted):
            marks[event.round] = {"start": now, "cpu": time.process_time(), "busy": {}, "devices": len(event.devices)}
        elif isinstance(event, DeviceStatus) and event.status == "training" and event.round in marks:
            marks[event.round]["busy"].setdefault(event.device, [now, None])
        elif isinstance(event, DeviceRoundDone) and event.round in marks:
            marks[event.round]["busy"].setdefault(event.device, [now, None])[1] = now
        elif isinstance(event, RoundMerged):
            mark = marks[event.round.round]
            mark["end"], mark["cpu_end"] = now, time.process_time()
        elif isinstance(event, PlanMade):
            planner.append(event.plan.planner_s)

    engine.subscribe(on_event)
    result = await engine.run()
    rounds = []
    for r, mark in sorted(marks.items()):
        busy = [(a, b) for a, b in mark["busy"].values() if b is not None]
        wall = mark["end"] - mark["start"]
        rounds.append({"round": r, "wall_s": wall, "devices_busy_s": union_length(busy),
                       "overhead_s": wall - union_length(busy), "engine_cpu_s": mark["cpu_end"] - mark["cpu"],
                       "devices_in_round": mark["devices"], "devices_trained": len(busy)})
    return {"rounds_done": result.rounds_done, "rounds": rounds, "planner_s": planner[0] if planner else None,
            "overhead_s": sum(r["overhead_s"] for r in rounds) / len(rounds),
            "engine_cpu_s": sum(r["engine_cpu_s"] for r in rounds) / len(rounds)}


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["overhead_s"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sizes, [results["overhead_s"][str(n)] for n in sizes], "o-", label="overhead per round (wall)")
    left.plot(sizes, [results["engine_cpu_s"][str(n)] for n in sizes], "s--", label="engine CPU per round")
    left.axhline(1.0, color="red", ls=":", label="target at 100: 1 s")
    left.set_xlabel("agents")
    left.set_ylabel("seconds per round")
    left.legend(fontsize=8)
    left.set_title("the engine's own time per round")
    right.plot(sizes, [results["planner_s"][str(n)] * 1000 for n in sizes], "o-")
    right.set_xlabel("agents")
    right.set_ylabel("planner call (ms)")
    right.set_title("planning time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    results: dict = {"overhead_s": {}, "engine_cpu_s": {}, "planner_s": {}, "runs": {}, "rounds": args.rounds,
                     "local_steps": args.local_steps, "agents_per_process": args.per_process,
                     "eval_limit": args.eval_limit, "model": "tiny-llama-L2-H64 (2 blocks, replicas)"}
    with tempfile.TemporaryDirectory(prefix="deftly-scale-") as tmp:
        root = Path(tmp)
        job = JobSpec(model=str(tiny_model(root / "model")), layers="0-1", seq=32, q=2, bs=4, eval_bs=16)
        for n in sizes:
            hosts = Hosts(root / f"agents-{n}")
            hosts.root.mkdir()
            try:
                addresses = hosts.start(n, args.per_process, f"s{n}-")
                print(f"{n} agents up; running {args.rounds} rounds", flush=True)
                outcome = asyncio.run(drive(addresses, job, root / f"run-{n}", args))
            finally:
                hosts.close()
            results["runs"][str(n)] = outcome
            for key in ("overhead_s", "engine_cpu_s", "planner_s"):
                results[key][str(n)] = outcome[key]
            print(f"{n} agents: overhead {outcome['overhead_s']:.3f} s/round, engine CPU "
                  f"{outcome['engine_cpu_s']:.3f} s/round, planner {outcome['planner_s'] * 1000:.1f} ms", flush=True)
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        results["growth"] = (results["overhead_s"][str(large)] / results["overhead_s"][str(small)]) / (large / small)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out_dir / "scale.png")
    return results
