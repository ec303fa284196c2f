"""`deftly export`: write a P-RGE training program, its manifest, weights and task data."""
from __future__ import annotations

import argparse
from pathlib import Path

from shared.errors import InputError



def register(subparsers: argparse._SubParsersAction) -> None:
    from export.program import DEFAULT_BATCHES, DEFAULT_EPS, DEFAULT_LR, ExportConfig
    from shared.manifest import BATCH_ORDERS

    d = ExportConfig()
    parser = subparsers.add_parser(
        "export", help="export a P-RGE training program (.pte)",
        description="Export a P-RGE training program: the .pte, its manifest, the shared "
                    "weights file, the tokenised task and the LoRA A's, side by side.")
    parser.add_argument("--model", default=d.model, help="'smollm2' (embedded), a local HF directory or a hub id")
    parser.add_argument("--task", default=d.task, help="'rotten_tomatoes' (embedded) or a TOML task file")
    parser.add_argument("--layers", default=d.layers, help="trainable layers: all | top:K | a-b | a,b,c")
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
    parser.add_argument("--methods", default=",".join(d.methods),
                        help="methods to include: step,eval[,loss,step_rng]")
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
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $DEFTLY_CACHE or ~/.cache/deftly")
    parser.add_argument("--out", type=Path, required=True, help="the .pte to write; other files go beside it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from export.program import ExportConfig, export_program

    for name in ("q", "bs", "eval_bs", "seq", "rank"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    cfg = ExportConfig(
        model=args.model, task=args.task, layers=args.layers, q=args.q, batch_size=args.bs,
        eval_batch_size=args.eval_bs, seq_len=args.seq, rank=args.rank, alpha=args.alpha,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()), loss=args.loss,
        prefix_sharing=not args.no_prefix_sharing, lr=args.lr, eps=args.eps, batches=args.batches, seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        external_weights=not args.embed_weights, calibrate=args.calibrate, base_weights=args.weights,
        int8_smoothing=args.int8_smoothing,
    )
    result = export_program(cfg, args.out, cache_dir=args.cache_dir)
    print(f"manifest: {result.manifest_path}")
    return 0
