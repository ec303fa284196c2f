"""`deftly run`: train one adapter on a fleet of agents, in rounds, with live progress.

Parses, builds the engine (`desktop.engine`), shows its events, and calls it. Examples:

    deftly run --model smollm2 --layers top:8 --agent 192.168.1.20:8765 --agent 192.168.1.21:8765 \\
        --token 3f2a... --rounds 5 --local-steps 10 --out runs/lab
    deftly run --job lab.toml --discover --devices 3 --rounds 5 --local-steps 10 --out runs/lab
    deftly run --job lab.toml --discover --devices 3 --rounds 8 --local-steps 10 --out runs/lab --resume

Ctrl-C stops the agents at their next step and writes the adapter from the last merged round; a
second Ctrl-C quits at once. Without a terminal (or with CI set) it prints plain lines.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from desktop.engine import Engine, EngineConfig, JobSpec, load_job
from desktop.engine.events import (
    DeviceBack, DeviceError, DeviceLost, DeviceProfiled, DeviceStatus, ExportUpdate, Notice, PhaseChanged,
    PlanMade, RoundMerged, RoundStarted, RunFinished, StepReceived,
)

REDRAW_S = 0.5  # terminal display: redraw at most this often
PLAIN_STEP_EVERY = 10  # plain lines: one per device every this many steps


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="train on a fleet of agents in rounds (the engine, headless)",
                                   description=__doc__.splitlines()[0])
    job = parser.add_argument_group("the job (a --job file, or options; an option overrides the file)")
    job.add_argument("--job", type=Path, help="job TOML (keys: the option names below)")
    job.add_argument("--model", help="'smollm2' (embedded), a Hugging Face directory or a hub id")
    job.add_argument("--task", help="'rotten_tomatoes' (embedded) or a task TOML file")
    job.add_argument("--layers", help="trainable layers: all | top:K | a-b | a,b,c")
    job.add_argument("--q", type=int, help="random directions per step")
    job.add_argument("--bs", type=int, help="examples per step")
    job.add_argument("--seq", type=int, help="tokens per example")
    job.add_argument("--rank", type=int)
    job.add_argument("--weights", choices=("fp32", "int8"), help="frozen weights of the programs")
    job.add_argument("--lr", type=float, help="learning rate (default: the program's suggestion)")
    job.add_argument("--eps", type=float, help="perturbation scale (default: the program's suggestion)")
    agents = parser.add_argument_group("the agents")
    agents.add_argument("--agent", action="append", default=[], metavar="[wss://][TOKEN@]HOST:PORT[#sha256:FP]",
                        help="an agent by address (repeat for each; wss:// or #sha256:FP for one started with --tls)")
    agents.add_argument("--discover", action="store_true", help="find agents by zeroconf (_deftly._tcp.local.)")
    agents.add_argument("--pair-only", action="append", default=None, metavar="ID|HOST:PORT",
                        help="with --discover: pair only this discovered agent (its id, or its address as "
                        "advertised; repeat for each); others are shown as seen and left alone")
    agents.add_argument("--token", help="pairing token for agents given without one (each agent prints its own)")
    agents.add_argument("--devices", type=int, help="plan once this many agents are paired (default: every "
                        "--agent, or every agent discovery finds within --discover-s)")
    agents.add_argument("--discover-s", type=float, default=5.0, help="browse this long after the first agent "
                        "(default 5)")
    agents.add_argument("--mdns-interface", action="append", default=None, metavar="ADDRESS",
                        help="bind mDNS to this IPv4 address (repeat; default: every interface)")
    agents.add_argument("--reprofile", action="store_true", help="measure every device again (default: reuse "
                        "a profile measured before for the same device and model)")
    rounds = parser.add_argument_group("the rounds")
    rounds.add_argument("--rounds", type=int, required=True, help="rounds to train (a resumed run continues to "
                        "this round)")
    rounds.add_argument("--local-steps", type=int, required=True, help="K: steps each device runs per round")
    rounds.add_argument("--seed", type=int, default=0, help="seeds the shards, z and the batch order")
    rounds.add_argument("--policy", choices=("planned", "equal_random"), default="planned",
                        help="planned: the planner's blocks and shares (default); equal_random: the baseline, "
                        "equal blocks matched at random with equal shares")
    rounds.add_argument("--replicas", action="store_true", help="devices beyond the job's blocks train replicas "
                        "of them on their own data, averaged each round (default: they idle)")
    rounds.add_argument("--eval-limit", type=int, help="validation examples per round (default: all)")
    rounds.add_argument("--test-limit", type=int, help="test examples at the end (default: all)")
    rounds.add_argument("--patience-s", type=float, help="a device whose connection is down this long is lost "
                        "(default: shared.protocol_limits.LOST_PATIENCE_S)")
    parser.add_argument("--out", type=Path, default=None, help="the run directory (default: runs/run-DATE)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out after the desktop stopped")
    parser.add_argument("--cache-dir", type=Path, help="export and profile caches (default: $DEFTLY_CACHE or "
                        "~/.cache/deftly)")
    parser.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings from the parsed options (the engine checks them)."""
    spec = load_job(args.job) if args.job else JobSpec()
    given = JobSpec(model=args.model, task=args.task, layers=args.layers, q=args.q, bs=args.bs, seq=args.seq,
                    rank=args.rank, weights=args.weights, lr=args.lr, eps=args.eps)
    out = args.out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
    extra = {"patience_s": args.patience_s} if args.patience_s is not None else {}
    return EngineConfig(job=spec.merged(given), out=out, rounds=args.rounds, local_steps=args.local_steps,
                        agents=tuple(args.agent), discover=args.discover, token=args.token, devices=args.devices,
                        pair_only=tuple(args.pair_only) if args.pair_only else None,
                        discover_s=args.discover_s, resume=args.resume, seed=args.seed, policy=args.policy, replicas=args.replicas,
                        eval_limit=args.eval_limit, test_limit=args.test_limit, reprofile=args.reprofile,
                        cache_dir=args.cache_dir,
                        mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None, **extra)


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    config.check()
    plain = not sys.stdout.isatty() or bool(os.environ.get("CI"))
    return asyncio.run(drive(Engine(config), plain))


async def drive(engine: Engine, plain: bool) -> int:
    """Run ``engine`` with its progress in the terminal (``deftly run``, and ``deftly demo --headless``)."""
    view = PlainView(engine) if plain else LiveView(engine)
    engine.subscribe(view.on_event)
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        view.line("stopping: the agents finish their current step; the adapter is written from the last "
                  "merged round (Ctrl-C again to quit now)")
        engine.stop("interrupted (Ctrl-C)")
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt

    loop.add_signal_handler(signal.SIGINT, interrupted)
    try:
        result = await engine.run()
    finally:
        view.close()
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (ValueError, RuntimeError):
            pass
    val = "-" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.3f}"
    print(f"{'stopped after' if result.stopped else 'done:'} {result.rounds_done} round(s); validation accuracy "
          f"{val}, test accuracy {test}")
    print(f"adapter: {result.adapter}")
    print(f"report: {result.out / 'report.md'}")
    return 130 if result.stopped and engine.state.finished and "Ctrl-C" in engine.state.finished.reason else 0


class PlainView:
    """One line per thing that happened (a log file, CI)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._export_stage: tuple = ()

    def line(self, text: str) -> None:
        print(text, flush=True)

    def on_event(self, event) -> None:
        state = self.engine.state
        if isinstance(event, PhaseChanged):
            self.line(f"== {event.phase}" + (f": {event.detail}" if event.detail else ""))
        elif isinstance(event, DeviceStatus) and event.status in ("paired", "error", "ready", "lost", "profiled"):
            device = state.device(event.device)
            self.line(f"  {device.name if device else event.device}: {event.status}"
                      + (f" ({event.detail})" if event.detail else ""))
        elif isinstance(event, DeviceProfiled):
            self.line(f"  {state.device(event.device).name}: profile {event.profile.source}"
                      f"{' (cached)' if event.cached else ''}")
        elif isinstance(event, PlanMade):
            plan = event.plan
            self.line(f"plan from round {plan.first_round} ({plan.reason}): predicted round {plan.round_s:.2f} s")
            for a in plan.assignments:
                self.line(f"  {a.name}: " + (f"block {a.block} (layers {a.first_layer}-{a.last_layer}), share "
                                             f"{a.share:.2f}, predicted {a.round_s:.2f} s" if a.block else "idle"))
        elif isinstance(event, ExportUpdate):
            p = event.progress
            if p.state in ("start", "end", "skip") and (p.stage, p.program, p.method) != self._export_stage:
                self._export_stage = (p.stage, p.program, p.method)
                left = "" if p.remaining_s is None else f", ~{p.remaining_s:.0f} s left"
                self.line(f"  export {p.fraction:4.0%}: {p.message}{left}")
        elif isinstance(event, RoundStarted):
            self.line(f"round {event.round}/{state.rounds}: {len(event.devices)} device(s)")
        elif isinstance(event, StepReceived):
            step = event.step
            if step.step % PLAIN_STEP_EVERY == 0 or step.step == state.local_steps:
                self.line(f"  {step.device} round {step.round} step {step.step}: loss {step.loss:.4f}, "
                          f"{step.seconds:.3f} s/step, rss {step.rss_mb:.0f} MB")
        elif isinstance(event, RoundMerged):
            r = event.round
            lost = f", lost: {', '.join(r.lost)}" if r.lost else ""
            self.line(f"round {r.round} merged: validation accuracy {r.accuracy:.3f} ({r.examples} examples), "
                      f"{r.seconds:.1f} s{lost}")
        elif isinstance(event, DeviceLost):
            self.line(f"  LOST {state.device(event.device).name} in round {event.round}: {event.reason}")
        elif isinstance(event, DeviceBack):
            self.line(f"  {state.device(event.device).name} is back: rejoins at round {event.round}")
        elif isinstance(event, DeviceError):
            self.line(f"  error{f' ({event.device})' if event.device else ''}: {event.message}"
                      + (f" -- {event.advice}" if event.advice else ""))
        elif isinstance(event, Notice):
            self.line(f"  {event.message}")
        elif isinstance(event, RunFinished):
            self.line(f"finished: {event.rounds_done} round(s){' (stopped: ' + event.reason + ')' if event.stopped else ''}")

    def close(self) -> None:
        pass


class LiveView(PlainView):
    """A table redrawn in place: devices, their status, round and step, step rate, loss; global accuracy."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._drawn = 0
        self._last = 0.0

    def on_event(self, event) -> None:
        if isinstance(event, (PlanMade, RoundMerged, DeviceLost, DeviceBack, DeviceError, RunFinished, Notice)):
            self._clear()
            super().on_event(event)
        self._draw(force=isinstance(event, (PhaseChanged, RoundMerged, DeviceStatus)))

    def line(self, text: str) -> None:
        self._clear()
        print(text, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < REDRAW_S:
            return
        self._last = now
        state = self.engine.state
        accuracy = f"{state.accuracy[-1][1]:.3f}" if state.accuracy else "-"
        rows = [f"{state.phase}: round {state.round}/{state.rounds}, global accuracy {accuracy}"
                + (f"  [export {state.export.fraction:.0%}: {state.export.message[:60]}]"
                   if state.export and state.export.fraction < 1 and state.phase in ("exporting", "discovering")
                   else "")]
        for d in state.devices.values():
            loss = d.loss.last()
            rate = d.step_rate
            what = f"{d.fraction:5.0%}" if d.status == "receiving" and d.fraction is not None else \
                f"r{d.round or '-'} step {d.step}/{state.local_steps}" if d.status == "training" else ""
            rows.append(f"  {d.name[:18]:18} {d.status:9} {what:16} {d.block or '':9} "
                        f"{'' if rate is None else f'{rate:5.2f} step/s':12} "
                        f"{'' if loss is None else f'loss {loss:.4f}'}")
        self._clear()
        sys.stdout.write("\n".join(rows) + "\n")
        sys.stdout.flush()
        self._drawn = len(rows)

    def close(self) -> None:
        self._draw(force=True)
