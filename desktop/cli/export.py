"""`deftly export`: write P-RGE programs, their manifests, weights and task data.

    deftly export --out runs/step.pte                        # single device: every layer, step + eval
    deftly export --block 22-25 --out runs/b1/block.pte      # one block's step methods, for a device
    deftly export --eval-only --out runs/eval/eval.pte       # the job's eval program, for the coordinator
    deftly export --blocks 22-24,25-27,28-29 --out runs/plan # a plan: every block program + the eval program

Parses, calls `export.program`, and draws its progress events.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from export.progress import ExportProgress


def register(subparsers: argparse._SubParsersAction) -> None:
    from export.program import DEFAULT_BATCHES, DEFAULT_EPS, DEFAULT_LR, ExportConfig
    from shared.manifest import BATCH_ORDERS

    d = ExportConfig()
    parser = subparsers.add_parser(
        "export", help="export a P-RGE training program (.pte)",
        description="Export a P-RGE training program: its methods (.pte), its manifest, the shared "
                    "weights file, the tokenised task and the LoRA A's, side by side.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default=d.model, help="'smollm2' (embedded), a local HF directory or a hub id")
    parser.add_argument("--task", default=d.task, help="'rotten_tomatoes' (embedded) or a TOML task file")
    parser.add_argument("--layers", default=d.layers, help="the job's trainable layers: all | top:K | a-b | a,b,c")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--block", default=None, metavar="FIRST-LAST",
                       help="a block program: perturb and update trainable layers FIRST..LAST only (default "
                            "methods: step)")
    which.add_argument("--eval-only", action="store_true", help="the job's eval program (methods: eval)")
    which.add_argument("--blocks", default=None, metavar="A-B,C-D,...",
                       help="a plan: one block program per range (together they cover --layers once) and the "
                            "eval program, into the directory --out")
    parser.add_argument("--q", type=int, default=d.q, help="random directions per step")
    parser.add_argument("--bs", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--eval-bs", type=int, default=d.eval_batch_size, help="examples per eval call")
    parser.add_argument("--seq", type=int, default=d.seq_len, help="tokens per example")
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--alpha", type=float, default=d.alpha)
    parser.add_argument("--targets", default=",".join(d.target_modules),
                        help="comma-separated target linears, e.g. q_proj,v_proj")
    parser.add_argument("--loss", choices=("verbalizer", "vocab"), default=d.loss)
    parser.add_argument("--no-prefix-sharing", action="store_true", help="run every layer on all 2q copies")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"suggested learning rate, an input of the program (default {DEFAULT_LR['fp32']:g}, "
                             f"or {DEFAULT_LR['int8']:g} with --weights int8)")
    parser.add_argument("--eps", type=float, default=None,
                        help=f"suggested perturbation scale (default {DEFAULT_EPS['fp32']:g}, or "
                             f"{DEFAULT_EPS['int8']:g} with --weights int8: int8 activations round "
                             "differently under a smaller perturbation)")
    parser.add_argument("--batches", choices=BATCH_ORDERS, default=None,
                        help=f"batch order suggested to the trainer (default {DEFAULT_BATCHES['fp32']}, or "
                             f"{DEFAULT_BATCHES['int8']} with --weights int8: each batch at the training "
                             "split's class shares)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the LoRA A's")
    parser.add_argument("--methods", default=None,
                        help=f"methods to include: step,eval[,loss,step_rng] (default {','.join(d.methods)}; "
                             "step with --block)")
    parser.add_argument("--calibrate", choices=("median", "none"), default=d.calibrate,
                        help="per-class bias on the answer logits measured on training prompts (default median)")
    parser.add_argument("--weights", choices=("fp32", "int8"), default=d.base_weights,
                        help="frozen decoder linears as fp32, or int8 (per-channel weights, per-token "
                             "activations, SmoothQuant-smoothed; the embedding as int8 rows; norms, "
                             "head, A and B stay fp32)")
    parser.add_argument("--int8-smoothing", type=float, default=d.int8_smoothing, metavar="ALPHA",
                        help="with --weights int8: SmoothQuant strength in [0, 1], how much of the "
                             "activations' outlier channels moves into the weights before quantising "
                             f"(default {d.int8_smoothing:g}; 0 turns it off)")
    parser.add_argument("--embed-weights", action="store_true",
                        help="keep the frozen weights inside the .pte instead of a shared .ptd")
    parser.add_argument("--workers", type=int, default=None,
                        help="methods lowered at once, in worker processes (default: one per core, as memory allows)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $DEFTLY_CACHE or ~/.cache/deftly")
    parser.add_argument("--out", type=Path, required=True,
                        help="the program to write (NAME.pte: NAME.manifest.json and its files go beside it); "
                             "with --blocks, a directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from export.program import ExportConfig, export_plan, export_program, parse_block, parse_blocks

    methods = _names(args.methods) if args.methods is not None else (
        ("step",) if args.block else ("eval",) if args.eval_only else ExportConfig().methods)
    cfg = ExportConfig(
        model=args.model, task=args.task, layers=args.layers, block=parse_block(args.block) if args.block else None,
        q=args.q, batch_size=args.bs, eval_batch_size=args.eval_bs, seq_len=args.seq, rank=args.rank,
        alpha=args.alpha, target_modules=_names(args.targets), loss=args.loss,
        prefix_sharing=not args.no_prefix_sharing, lr=args.lr, eps=args.eps, batches=args.batches, seed=args.seed,
        methods=methods, external_weights=not args.embed_weights, calibrate=args.calibrate, base_weights=args.weights,
        int8_smoothing=args.int8_smoothing,
    )
    line = ProgressLine()
    try:
        if args.blocks is not None:
            plan = export_plan(cfg, parse_blocks(args.blocks), args.out, cache_dir=args.cache_dir, on_progress=line,
                               workers=args.workers)
            manifests = [r.manifest_path for r in (*plan.blocks.values(), plan.eval)]
        else:
            manifests = [export_program(cfg, args.out, cache_dir=args.cache_dir, on_progress=line,
                                        workers=args.workers).manifest_path]
    finally:
        line.close()
    for path in manifests:
        print(f"manifest: {path}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


class ProgressLine:
    """Draws export progress: a bar on a terminal, plain lines (one per finished stage) elsewhere."""

    def __init__(self, plain: bool | None = None) -> None:
        """``plain`` None: plain lines unless stderr is a terminal outside CI."""
        self.plain = (not sys.stderr.isatty() or bool(os.environ.get("CI"))) if plain is None else plain
        self.bar = None

    def __call__(self, event: ExportProgress) -> None:
        left = "" if event.remaining_s is None else f", ~{_clock(event.remaining_s)} left"
        if event.state == "skip":
            return
        if self.plain:
            if event.state == "end":
                took = "" if event.seconds is None else f" ({event.seconds:.1f} s)"
                print(f"[{event.fraction:4.0%} {_clock(event.elapsed_s)}{left}] {event.message}{took}", flush=True)
            elif event.state == "start" and event.stage == "lower":
                print(f"[{event.fraction:4.0%} {_clock(event.elapsed_s)}{left}] {event.message} ...", flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {postfix}", dynamic_ncols=True,
                            file=sys.stderr)
        self.bar.n = int(1000 * event.fraction)
        self.bar.set_description_str(event.message[:60], refresh=False)
        self.bar.set_postfix_str(f"{_clock(event.elapsed_s)}{left}", refresh=True)
        if event.stage == "done":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"
