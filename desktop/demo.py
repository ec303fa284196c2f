"""The demo: a simulated three-device lab on this machine, trained by the fleet engine, shown live.

``deftly demo`` (``make demo``):

1. starts three real agents here (``deftly-agent --simulate``): a Raspberry Pi 4, a
   mid-range phone and a laptop (``assets/fleets/device_classes.toml``), each on
   loopback and advertised there by zeroconf, all with one pairing token the demo
   chose;
2. opens the dashboard (or, without a display, runs headless: the same job through
   ``deftly run``'s terminal view), whose engine finds them by zeroconf, pairs them
   with that token (only them: other agents advertised here, another demo's or a
   test's, are shown as seen and left alone), profiles them (a profile measured before is reused), plans,
   exports the block programs (from the export cache after the first run), ships
   them and trains SmolLM2 on Rotten Tomatoes in rounds, the untrained adapter
   evaluated as round 0 beside round 1;
3. writes ``runs/demo/``: the adapter, ``metrics.jsonl``, ``plan.json`` and
   ``report.md`` with its plots (headless: and ``dashboard.png``, the window at the
   end state drawn offscreen);
4. stops the agents it started when the window closes, on Ctrl-C, or on any error.

The agents keep their state (identity, stored programs, weights) in
``~/.cache/deftly/demo-agents/``, so the weights cross each simulated link once,
not at every demo. The settings an audience's curves depend on (rounds, local
steps, lr, eps, fp32 or int8, the verbalizer calibration at the start, the
validation examples per round) are :class:`DemoSettings`.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.local_agents import LocalAgents
from shared.errors import InputError

LAB = (("pi4", "pi4-4gb"), ("phone", "midrange-phone"), ("laptop", "laptop"))  # (agent name, device class)


def default_agents_dir() -> Path:
    cache = os.environ.get("DEFTLY_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "deftly") / "demo-agents"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; defaults commented."""

    job: JobSpec = field(default_factory=JobSpec)  # SmolLM2 on Rotten Tomatoes with the exporter's defaults
    rounds: int = 5
    local_steps: int = 20  # per device per round: a round is long enough to watch, short enough to merge often
    eval_limit: int | None = 200  # validation reviews per round (the merge must not keep an audience waiting)
    test_limit: int | None = 500  # test reviews at the end
    out: Path = Path("runs/demo")
    cache_dir: Path | None = None  # export and profile caches (default: the exporter's, ~/.cache/deftly)
    agents_dir: Path = field(default_factory=default_agents_dir)
    headless: bool | None = None  # None: headless exactly when there is no display
    presenter: bool = False  # open the window in the presenter layout

    def check(self) -> None:
        """Raises InputError naming the setting out of range."""
        if self.rounds < 1 or self.local_steps < 1:
            raise InputError(f"--rounds and --local-steps must be at least 1, got {self.rounds} and "
                             f"{self.local_steps}")
        self.job.check("the demo's job")


def has_display() -> bool:
    """Whether a window can be shown: a platform named for Qt, an X or Wayland display, or macOS/Windows."""
    return bool(os.environ.get("QT_QPA_PLATFORM") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or sys.platform in ("darwin", "win32"))


def demo_config(settings: DemoSettings, token: str, addresses: list[str]) -> EngineConfig:
    """The engine's settings for the demo's lab: found by zeroconf on loopback, paired with the demo's token.

    Args:
        addresses: where the demo's agents listen (``HOST:PORT``): the only discovered agents paired.
    """
    return EngineConfig(job=settings.job, out=settings.out, rounds=settings.rounds, local_steps=settings.local_steps,
                        discover=True, mdns_interfaces=("127.0.0.1",), token=token, devices=len(LAB),
                        pair_only=tuple(addresses),
                        eval_limit=settings.eval_limit, test_limit=settings.test_limit, cache_dir=settings.cache_dir,
                        zero_shot=True)


def caption(job: JobSpec) -> str:
    """What the curves show with these settings, said under the plots."""
    start = ("the raw model: no verbalizer calibration, so the first rounds also learn the classes' balance"
             if job.calibrate == "none" else
             "the calibrated zero-shot (the exporter's per-class bias), so accuracy starts high and moves by points")
    measured = ""
    if job.model in (None, "smollm2") and job.task in (None, "rotten_tomatoes"):
        # docs/benchmarks.md, "What the demo's curves show": three settings, five rounds each
        measured = (" On this job, measured: five rounds add 1-3 points of validation accuracy (0.79-0.80 to "
                    "0.805-0.82), with or without the calibration, and the curve can dip on the way.")
    return (f"Round 0 on the accuracy plot is the untrained adapter; training starts from {start}.{measured} Loss "
            f"is each step's mean over the 2q perturbed copies of its batch: a zeroth-order estimate, noisy by "
            f"design, that drifts down slowly. Step latency is each device's simulated clock.")


def make_room(out: Path) -> Path | None:
    """A previous demo run in ``out`` moves to ``out.previous`` (replacing an older one); returns where it went."""
    if not (out / "state.json").exists() and not (out / "metrics.jsonl").exists():
        return None
    previous = out.with_name(out.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    out.rename(previous)
    return previous


def run_demo(settings: DemoSettings, on_window: Callable | None = None,
             on_agents: Callable[[LocalAgents], None] | None = None) -> int:
    """Start the lab, run the demo (window or headless), stop the lab; returns the exit status.

    Args:
        on_window: called with the window once it is open (a benchmark watches it).
        on_agents: called with the lab once its agents listen (the screenshots kill one mid-round).
    """
    settings.check()
    headless = settings.headless if settings.headless is not None else not has_display()
    if headless and settings.headless is None:
        print("no display (DISPLAY and QT_QPA_PLATFORM are unset): running headless, as `deftly demo --headless`; "
              f"the report and a picture of the dashboard go to {settings.out}/", flush=True)
    moved = make_room(settings.out)
    if moved is not None:
        print(f"the previous demo run is now in {moved}", flush=True)
    agents = LocalAgents(settings.agents_dir)
    try:
        print(f"starting {len(LAB)} simulated agents on this machine (their state: {settings.agents_dir})", flush=True)
        addresses = []
        for (name, device_class), agent in zip(LAB, agents.start(list(LAB))):
            print(f"  {name}: deftly-agent --simulate {device_class}, listening on {agent.address}", flush=True)
            addresses.append(agent.address)
        if on_agents is not None:
            on_agents(agents)
        config = demo_config(settings, agents.token, addresses)
        if headless:
            return _headless(config)
        from desktop.ui.app import open_demo

        return open_demo(config, title="deftly demo: a simulated lab of three devices on this machine",
                         caption=caption(settings.job), presenter=settings.presenter, on_window=on_window)
    finally:
        agents.stop()
        left = agents.running
        if left:  # stop() kills what SIGTERM did not end; this says so if even that failed
            print(f"warning: agent(s) {', '.join(left)} still running", file=sys.stderr)
        else:
            print(f"stopped the {len(agents.agents)} agents the demo started", flush=True)


def _headless(config: EngineConfig) -> int:
    """The run through ``deftly run``'s terminal view, then the dashboard's end state as a PNG in the report."""
    from desktop.cli.run import drive

    plain = not sys.stdout.isatty() or bool(os.environ.get("CI"))
    code = asyncio.run(drive(Engine(config), plain))
    report = Path(config.out) / "report.md"
    if not report.exists():
        return code
    if not (Path(config.out) / "metrics.jsonl").exists():  # stopped before any device trained a step
        print("no dashboard picture: the run stopped before anything was trained", flush=True)
        return code
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no display: draw the window into memory
    try:
        from desktop.ui.app import render_end_state
    except ImportError as exc:
        print(f"no dashboard picture: the Qt dashboard cannot load ({exc})", file=sys.stderr)
        return code
    png = render_end_state(Path(config.out), Path(config.out) / "dashboard.png")
    with open(report, "a") as f:
        f.write("\n## The dashboard at the end of the run\n\nDrawn offscreen from the run's files "
                f"(`deftly dashboard --replay {config.out}` plays it).\n\n![dashboard]({png.name})\n")
    print(f"dashboard picture: {png}", flush=True)
    return code
