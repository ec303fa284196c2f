"""`deftly` command line: parses and calls, nothing else.

One module per subcommand, registered in `SUBCOMMANDS` below.  Each module has
`register(subparsers)` which adds its parser and sets `func` to the callable to
run.  Modules are imported only when their subcommand is chosen, so
`deftly plan` never pays for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from shared.errors import InputError

# name -> (module, one-line help).  The single place subcommands are registered.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("desktop.cli.plan", "match blocks to devices and split bandwidth (CRUNCH)"),
    "export": ("desktop.cli.export", "export a P-RGE training program (.pte)"),
    "train": ("desktop.cli.train", "train locally with an exported program in ExecuTorch"),
    "bench": ("desktop.cli.bench", "run a benchmark and write bench/results/"),
    "demo": ("desktop.cli.demo", "three simulated devices train SmolLM2 together, live (the main job)"),
    "dashboard": ("desktop.cli.dashboard", "the window: find, pair, plan and train agents, live"),
    "profile": ("desktop.cli.profile", "export the probe and measure this machine's profile"),
    "run": ("desktop.cli.run", "train on a fleet of agents in rounds (the engine, headless)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deftly", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
