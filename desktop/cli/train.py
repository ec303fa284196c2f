"""`deftly train`: train locally with an exported P-RGE program in ExecuTorch.

Parses, calls `device_agent.trainer.run_training` (which checks the settings), shows progress. Example:

    deftly train --program runs/step.pte --steps 1000 --eval-every 100 --out runs/rt1
    deftly train --program runs/step.pte --steps 2000 --out runs/rt1 --resume   # continue to step 2000
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from device_agent.trainer import SCHEDULES, TrainConfig, run_training
from shared.events import Eval, Event, Start, Step, Test
from shared.manifest import BATCH_ORDERS

# Without a terminal (CI, a log file) print one line every this many steps instead of a bar.
PLAIN_EVERY = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train locally with an exported program in ExecuTorch",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--program", type=Path, required=True, help="the program's .pte or its .manifest.json")
    parser.add_argument("--steps", type=int, required=True, help="total steps (a resumed run continues to this step)")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="validation accuracy and a checkpoint every E steps (0: at the end only; default 100)")
    parser.add_argument("--out", type=Path, required=True, help="run directory, e.g. runs/NAME")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the manifest's)")
    parser.add_argument("--eps", type=float, default=None, help="perturbation scale (default: the manifest's)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default constant)")
    parser.add_argument("--batches", choices=BATCH_ORDERS, default=None,
                        help="batch order: shuffled, or stratified (each batch at the training split's "
                             "class shares) (default: the manifest's)")
    parser.add_argument("--average-from", type=int, default=None, metavar="STEP",
                        help="tail averaging: evaluate and deliver the mean of b over the steps after STEP "
                             "(default: the last b)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the directions z and the example order")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="validation examples per evaluation (default: the whole split)")
    parser.add_argument("--test-limit", type=int, default=None, help="test examples at the end (default: all)")
    parser.add_argument("--resident-methods", type=int, default=1,
                        help="program methods kept loaded at once, each with its own packed copy of the "
                             "weights (default 1: least memory; 0: keep all, a little faster)")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false",
                        help="train, checkpoint and write the adapter without validation or test (for a "
                             "program without eval methods, such as a device's block program)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(program=args.program, out=args.out, steps=args.steps, eval_every=args.eval_every,
                      lr=args.lr, eps=args.eps, schedule=args.schedule, batches=args.batches, seed=args.seed,
                      resume=args.resume, eval_limit=args.eval_limit, test_limit=args.test_limit,
                      average_from=args.average_from, resident_methods=args.resident_methods,
                      evaluate=args.evaluate)
    progress = _Progress(plain=not sys.stderr.isatty() or bool(os.environ.get("CI")))
    try:
        result = run_training(cfg, on_event=progress)
    finally:
        progress.close()
    val = "-" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
    best = "-" if result.best_val_accuracy is None else f"{result.best_val_accuracy:.3f}"
    test = "-" if result.test_accuracy is None else f"{result.test_accuracy:.3f}"
    speed = "-" if result.seconds_per_step is None else f"{result.seconds_per_step:.3f} s/step"
    print(f"step {result.step}: validation accuracy {val} (best {best}), test accuracy {test}, {speed}")
    print(f"adapter: {result.adapter_dir}")
    print(f"metrics: {result.metrics_path}")
    return 0


class _Progress:
    """Turns trainer events into a tqdm bar, or plain lines when there is no terminal."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.bar = None
        self.accuracy: float | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Start):
            self._start(event)
        elif isinstance(event, Step):
            self._step(event)
        elif isinstance(event, Eval):
            self.accuracy = event.accuracy
            averaged = ""
            if event.averaged_steps is not None:
                averaged = (f" [mean of the last {event.averaged_steps} b; the last b alone: "
                            f"{event.last_iterate_accuracy:.3f}]")
            self._print(f"step {event.step}: validation accuracy {event.accuracy:.3f}{averaged} "
                        f"({event.examples} examples, {event.seconds:.1f} s)")
        elif isinstance(event, Test):
            self._print(f"step {event.step}: test accuracy {event.accuracy:.3f} ({event.examples} examples)")

    def _start(self, event: Start) -> None:
        what = "resuming at" if event.resumed else "starting at"
        averaging = "" if event.average_from is None else f", averaging b after step {event.average_from}"
        self._print(f"training: {what} step {event.step} of {event.steps}, lr {event.lr:g} "
                    f"({event.schedule}), eps {event.eps:g}, {event.batches} batches{averaging}, "
                    f"{event.train_examples} training examples")
        if not self.plain:
            from tqdm import tqdm

            self.bar = tqdm(total=event.steps, initial=event.step, unit="step", dynamic_ncols=True)

    def _step(self, event: Step) -> None:
        accuracy = "-" if self.accuracy is None else f"{self.accuracy:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {event.loss:.4f}, {event.seconds:.3f} s/step, acc {accuracy}",
                                     refresh=False)
            self.bar.update(1)
        elif event.step % PLAIN_EVERY == 0:
            print(f"step {event.step}: loss {event.loss:.4f}, {event.seconds:.3f} s/step, "
                  f"rss {event.rss_mb:.0f} MB, acc {accuracy}", flush=True)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
