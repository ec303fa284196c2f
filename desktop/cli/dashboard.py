"""`deftly dashboard`: the operator's window: find and pair agents, choose the job, watch it train.

Agents appear as zeroconf finds them (and by address); pair each by typing the
token it printed; fill in the job and press Start. Examples:

    deftly dashboard
    deftly dashboard --agent 192.168.1.20:8765 --token 3f2a... --job lab.toml --out runs/lab
    deftly dashboard --replay runs/demo --speed 10 --presenter
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from desktop.engine import EngineConfig, JobSpec, load_job


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dashboard", help="the window: find, pair, plan and train, live",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, help="job TOML: the form's starting values")
    parser.add_argument("--rounds", type=int, default=5, help="the form's starting rounds (default 5)")
    parser.add_argument("--local-steps", type=int, default=10, help="the form's starting local steps (default 10)")
    parser.add_argument("--agent", action="append", default=[], metavar="[wss://][TOKEN@]HOST:PORT[#sha256:FP]",
                        help="an agent by address (repeat; more can be added in the window)")
    parser.add_argument("--no-discover", action="store_true", help="do not browse zeroconf for agents")
    parser.add_argument("--token", help="pairing token for agents found without one (each agent prints its own)")
    parser.add_argument("--mdns-interface", action="append", default=None, metavar="ADDRESS",
                        help="bind mDNS to this IPv4 address (repeat; default: every interface)")
    parser.add_argument("--eval-limit", type=int, help="validation examples per round (default: all)")
    parser.add_argument("--out", type=Path, help="the run directory (default: runs/run-DATE)")
    parser.add_argument("--cache-dir", type=Path, help="export and profile caches (default ~/.cache/deftly)")
    parser.add_argument("--presenter", action="store_true", help="full screen: plan and plots large, no controls")
    parser.add_argument("--replay", type=Path, metavar="RUN", help="play a recorded run (its directory or "
                        "metrics.jsonl) instead of driving agents")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed (default 1x)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.replay is not None:
        from desktop.ui.app import open_replay

        return open_replay(args.replay, args.speed, presenter=args.presenter)
    from desktop.ui.app import open_dashboard

    config = EngineConfig(job=load_job(args.job) if args.job else JobSpec(),
                          out=args.out or Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"), rounds=args.rounds,
                          local_steps=args.local_steps, agents=tuple(args.agent), discover=not args.no_discover,
                          token=args.token, eval_limit=args.eval_limit, cache_dir=args.cache_dir, zero_shot=True,
                          mdns_interfaces=tuple(args.mdns_interface) if args.mdns_interface else None)
    config.check()
    return open_dashboard(config, presenter=args.presenter)
