"""`deftly demo`: three simulated devices on this machine train SmolLM2 together, shown live.

Starts three agents (Raspberry Pi 4, mid-range phone, laptop), opens the dashboard,
which finds them by zeroconf, pairs, profiles, plans, exports, ships and trains in
rounds; without a display it runs headless and writes runs/demo/report.md with the
plots and a picture of the dashboard. Closing the window or Ctrl-C stops the agents
it started. See desktop/demo.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from desktop.demo import DemoSettings, run_demo
from desktop.engine import JobSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="three simulated devices train SmolLM2 together, live",
                                   description=__doc__.splitlines()[0])
    face = parser.add_mutually_exclusive_group()
    face.add_argument("--headless", action="store_const", const=True, dest="headless", default=None,
                      help="no window: the run in the terminal, report.md with plots and a dashboard picture "
                      "(the default when there is no display)")
    face.add_argument("--window", action="store_const", const=False, dest="headless",
                      help="the dashboard window (the default when there is a display)")
    face.add_argument("--replay", type=Path, nargs="?", const=Path("runs/demo"), metavar="RUN",
                      help="play a recorded run (default runs/demo) through the dashboard instead: no agents")
    parser.add_argument("--speed", type=float, default=5.0, help="replay speed (default 5x)")
    parser.add_argument("--presenter", action="store_true", help="full screen: plan and plots large, no controls")
    job = parser.add_argument_group("what the curves show (the run's settings)")
    job.add_argument("--rounds", type=int, default=DemoSettings.rounds)
    job.add_argument("--local-steps", type=int, default=DemoSettings.local_steps, help="steps per device per round")
    job.add_argument("--weights", choices=("fp32", "int8"), help="frozen weights of the programs (default fp32)")
    job.add_argument("--no-calibration", action="store_true",
                     help="start from the raw model, not the calibrated zero-shot (more of the curve is learning)")
    job.add_argument("--lr", type=float, help="learning rate (default: the program's suggestion)")
    job.add_argument("--eps", type=float, help="perturbation scale (default: the program's suggestion)")
    job.add_argument("--layers", help="trainable layers: all | top:K | a-b (default: the exporter's)")
    job.add_argument("--model", help="'smollm2' (embedded, the default) or a Hugging Face directory")
    job.add_argument("--task", help="'rotten_tomatoes' (embedded, the default) or a task TOML")
    job.add_argument("--eval-limit", type=int, default=DemoSettings.eval_limit,
                     help="validation examples per round (default %(default)s)")
    parser.add_argument("--out", type=Path, default=DemoSettings.out, help="the run directory (default runs/demo; "
                        "a previous demo run there moves to runs/demo.previous)")
    parser.add_argument("--cache-dir", type=Path, help="export and profile caches (default ~/.cache/deftly)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.replay is not None:
        from desktop.ui.app import open_replay

        return open_replay(args.replay, args.speed, presenter=args.presenter)
    job = JobSpec(model=args.model, task=args.task, layers=args.layers, weights=args.weights, lr=args.lr,
                  eps=args.eps, calibrate="none" if args.no_calibration else None)
    return run_demo(DemoSettings(job=job, rounds=args.rounds, local_steps=args.local_steps, eval_limit=args.eval_limit,
                                 out=args.out, cache_dir=args.cache_dir, headless=args.headless,
                                 presenter=args.presenter))
