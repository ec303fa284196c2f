"""`deftly demo`: the main job as it stands today, end to end with live progress.

1. plan: CRUNCH and the bandwidth split for a 3-device lab (Raspberry Pi 4, phone, laptop);
2. export: SmolLM2's P-RGE program for Rotten Tomatoes (cached after the first run);
3. train: the program in ExecuTorch on this machine, with validation accuracy;
4. report: the PEFT adapter, metrics.jsonl and a PNG of the curves.

Run again, it continues the same run (the checkpoint is resumed) instead of starting over.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the main job: plan, export and train with live progress",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="P-RGE training steps (default 300)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=300, help="validation examples per evaluation")
    parser.add_argument("--layers", default=None, help="trainable layers (default: export's)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the program and the run go")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from desktop.cli import plan, train
    from desktop.cli.export import ProgressLine
    from desktop.report import plot_run
    from export.program import ExportConfig, export_program

    print("== 1/4 plan: which device trains which block ==")
    plan.run(_parsed(plan, "plan", ["--fleet", str(ASSETS / "fleets" / "lab3.toml"),
                                    "--job", str(ASSETS / "jobs" / "smollm2.toml")]))

    print("\n== 2/4 export: SmolLM2's P-RGE training program ==")
    cfg = ExportConfig()
    if args.layers:
        cfg = replace(cfg, layers=args.layers)
    line = ProgressLine()
    try:
        exported = export_program(cfg, args.out / "step.pte", on_progress=line)
    finally:
        line.close()

    print("\n== 3/4 train: the program in ExecuTorch, on this machine ==")
    run_dir = args.out / "train"
    resume = ["--resume"] if (run_dir / "checkpoint.npz").exists() else []
    train.run(_parsed(train, "train", ["--program", str(exported.manifest_path), "--out", str(run_dir),
                                       "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                                       "--eval-limit", str(args.eval_limit), *resume]))

    print("\n== 4/4 report ==")
    png = plot_run(run_dir / "metrics.jsonl", run_dir / "curves.png",
                   title=f"P-RGE in ExecuTorch: {exported.manifest.model_id} on {exported.manifest.task}")
    print(f"curves: {png}")
    program_bytes = sum(path.stat().st_size for path in set(exported.method_files.values()))
    weights = exported.files.get("weights")
    shared = "" if weights is None else f"; the shared weights file is {weights.stat().st_size / 1e6:.0f} MB"
    print(f"program: {exported.manifest_path} ({len(exported.method_files)} methods, {program_bytes / 1e6:.2f} MB{shared})")
    return 0


def _parsed(command, name: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the ``name`` command's own parser, so every option it adds later
    gets its default here too (a hand-built Namespace missed --resident-methods once)."""
    parser = argparse.ArgumentParser(prog="deftly")
    command.register(parser.add_subparsers())
    return parser.parse_args([name, *argv])
