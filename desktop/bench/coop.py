"""coop: does cooperation learn? Block-coordinate P-RGE across devices beside one device, in-process.

In a DEFT round every device starts from the same global b, trains its own block
for K local steps on its own data, and the blocks are merged (``shared.blocks.merge_b``):
block-coordinate zeroth-order descent. A device perturbs fewer numbers than one
device training every layer, so each of its estimates is less noisy and it may
learn faster per step; or the staleness of the other blocks (fixed for K steps)
may hurt. `deftly bench coop` measures which, with no network:

* the job: the default job's top 8 layers (SmolLM2, Rotten Tomatoes, the
  exporter's LoRA-FA settings), cut into the default 3-device plan's blocks
  22-24, 25-27, 28-29 (``--blocks`` gives another cut; ``--blocks planner`` cuts
  it as `shared.planner.plan` does for ``assets/fleets/lab3.toml``), recorded
  under ``blocks_from``; the programs are exported with
  `export.program.export_plan` (cached: a second run lowers nothing);
* cooperative: one `device_agent.trainer.Trainer` per block, each on its own
  disjoint third of the training split (`desktop.engine.shards`: stratified by
  label, seeded), R rounds of K steps, merged after each round;
* single: one Trainer of the whole-job program (every layer perturbed at once) on
  the whole training split, R·K steps, evaluated after every K, like the rounds;
* both evaluated with the job's eval program on the same b's: validation accuracy
  on a fixed subset (the first ``--eval-limit`` rows of the validation split, a
  seeded shuffle of the task) after every round, test accuracy every
  ``--test-every`` rounds and at the end, and the paired difference of the final
  test accuracies with its standard error (the same test examples judge both);
* the per-round loss of each block (the mean step loss on its own data) and of
  the single device, the step times, the wall time, the machine's load.

Keys of ``bench/results/coop.json``: ``cooperative_accuracy`` and ``single_accuracy``
(test accuracy at the end, the mean over ``--seeds``; also under ``test_accuracy``
with the zero-shot one), ``steps_per_device`` (R·K), ``rounds``, ``local_steps``,
``blocks``, ``accuracy_per_round`` (validation accuracy of ``cooperative`` and
``single``, R + 1 entries each: round 0 is the zero-shot b = 0, entry r is after r·K
steps per device), ``cooperative_rounds`` / ``single_rounds`` (the same R + 1 rounds
as records with each block's loss and step seconds, test accuracy where measured),
``date``, ``machine``, ``settings`` (and ``weights``, ``lr``, ``eps``, ``batches``,
``seeds``, ``device_seeds``), ``export_seconds`` and ``wall_seconds``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.blocks import BlockSpan, merge_b
from shared.errors import InputError
from shared.manifest import BSlot
from shared.task_data import Split

ROOT = Path(__file__).resolve().parents[2]
PLAN_FLEET = ROOT / "assets/fleets/lab3.toml"  # the three-device lab the blocks are cut for
PLAN_JOB = ROOT / "assets/jobs/smollm2.toml"  # its hypothetical job: payloads, memory terms, q, bs
DEFAULT_BLOCKS = "22-24,25-27,28-29"  # the default 3-device plan of the top 8 layers (bench lowering, bench profile)
SINGLE = "single"  # the name of the one-device run's only block in per-round records


@dataclass(frozen=True)
class CoopSettings:
    """One comparison's settings; defaults commented."""

    rounds: int = 20  # R
    local_steps: int = 25  # K, steps per device per round
    lr: float | None = None  # None: the programs' suggestion (their manifests')
    eps: float | None = None  # likewise
    seeds: int = 1  # training runs per method, seeds 0..seeds-1 (other directions and batches)
    eval_limit: int | None = 400  # validation rows per evaluation (the first ones); None: all
    test_every: int = 5  # test accuracy every this many rounds (and always at the end); 0: at the end only
    shard_seed: int = 0  # seeds the cut of the training split into the devices' shares

    def check(self) -> None:
        """Raises: InputError naming the setting that no run could use."""
        for name in ("rounds", "local_steps", "seeds"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected 1 or more")
        if self.test_every < 0:
            raise InputError(f"--test-every {self.test_every}: expected 0 or more")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise InputError(f"--eval-limit {self.eval_limit}: expected 1 or more")


@dataclass
class RoundRecord:
    """One round of one run: where the merged b stands after it."""

    round: int  # 0: before any step (b = 0)
    steps_per_device: int  # round · K
    val_accuracy: float
    test_accuracy: float | None  # None where the test was not measured this round
    loss: dict[str, float] = field(default_factory=dict)  # block name -> mean step loss of the round
    step_seconds: dict[str, float] = field(default_factory=dict)  # block name -> seconds of its round's steps


# (round, the b the round started from [P], each block's returned slice, the merged b [P])
MergeHook = Callable[[int, np.ndarray, dict[BlockSpan, np.ndarray], np.ndarray], None]
# (round, b [P]) -> (validation accuracy, test accuracy or None)
Evaluate = Callable[[int, np.ndarray], tuple[float, float | None]]


def train_in_rounds(trainers: Sequence, layout: Sequence[BSlot], rounds: int, local_steps: int, lr: float,
                    eps: float, evaluate: Evaluate, on_merge: MergeHook | None = None) -> tuple[np.ndarray, list[RoundRecord]]:
    """R DEFT rounds: every trainer starts from the global b, runs K steps of its block, the slices merge.

    One trainer whose block is every layer is the single-device run: its rounds are
    one run of R·K steps that stops every K to be evaluated (a trainer carries its
    sampler and z generator on across rounds, so the steps are the same).

    Args:
        trainers: ``device_agent.trainer.Trainer`` per device, their blocks disjoint.
        layout: the job's b layout.
        rounds, local_steps: R and K.
        lr, eps: every step's learning rate and perturbation size.
        evaluate: measures a merged b, called after round 0 (b = 0) and every round.
        on_merge: sees each round's start b, returned slices and merged b (tests).

    Returns:
        The final global b [P] and one record per round, round 0 first.
    """
    b = np.zeros(sum(slot.size for slot in layout), dtype=np.float32)  # [P]
    val, test = evaluate(0, b)
    records = [RoundRecord(round=0, steps_per_device=0, val_accuracy=val, test_accuracy=test)]
    for r in range(1, rounds + 1):
        slices: dict[BlockSpan, np.ndarray] = {}
        loss: dict[str, float] = {}
        seconds: dict[str, float] = {}
        for trainer in trainers:  # one after another here; on a fleet, at the same time
            trainer.start_round(b, lr=lr, eps=eps, round=r, steps=local_steps)
            events = trainer.run()
            slices[trainer.span] = trainer.block_b  # [P_blk], what the device sends back
            name = SINGLE if len(trainers) == 1 else trainer.span.name
            loss[name] = float(np.mean([e.loss for e in events]))
            seconds[name] = float(sum(e.seconds for e in events))
        merged = merge_b(b, layout, slices)  # [P]
        if on_merge is not None:
            on_merge(r, b, slices, merged)
        b = merged
        val, test = evaluate(r, b)
        records.append(RoundRecord(round=r, steps_per_device=r * local_steps, val_accuracy=val, test_accuracy=test,
                                   loss=loss, step_seconds=seconds))
    return b, records


def device_seed(seed: int, device: int) -> int:
    """The trainer seed of device ``device`` in training run ``seed``: every device its own directions."""
    return 1000 * seed + device


def compare(block_programs: Sequence, whole_program, eval_program, splits: dict[str, Split],
            settings: CoopSettings, say: Callable[[str], None] = print) -> dict:
    """Cooperative rounds of the block programs beside the whole-job program alone; see the module docstring.

    Args:
        block_programs: ``device_agent.program.Program`` per block, shallowest first, covering the job.
        whole_program: the program of every layer of the same job (the single device).
        eval_program: the job's eval program; judges every b of both runs.
        splits: the task's "train", "validation" and "test" splits.
        settings: rounds, steps, rates, seeds.
        say: progress lines.

    Returns:
        The plain results (JSON-ready) without the machine's figures.

    Raises:
        InputError: programs of different jobs, blocks that do not cover the job, bad settings.
    """
    from desktop.engine.shards import shard_indices, shard_split
    from device_agent.trainer import Trainer
    from shared.blocks import check_cover

    settings.check()
    job_key = eval_program.job_key
    for program in (*block_programs, whole_program):
        program.manifest.check_job(job_key, str(program.manifest_path))
    layout = eval_program.manifest.b_layout
    spans = [program.block for program in block_programs]
    check_cover(layout, spans)
    manifest = whole_program.manifest
    lr = manifest.lr if settings.lr is None else settings.lr
    eps = manifest.eps if settings.eps is None else settings.eps
    train, validation, test = splits["train"], splits["validation"], splits["test"]
    shards = [shard_split(train, rows) for rows in shard_indices(train.labels, len(block_programs), settings.shard_seed)]
    n_val = len(validation) if settings.eval_limit is None else min(settings.eval_limit, len(validation))
    R, K = settings.rounds, settings.local_steps

    def correct(b: np.ndarray) -> np.ndarray:
        """[n_test] bool: which test examples the b classifies right."""
        logits = eval_program.class_logits(test.input_ids, test.lengths, b)  # [n_test, C]
        return logits.argmax(axis=1) == test.labels

    eval_seconds = [0.0]
    zero_shot: dict[str, float] = {}

    def evaluate(r: int, b: np.ndarray) -> tuple[float, float | None]:
        start = time.perf_counter()
        if r == 0 and zero_shot:  # b = 0 is the same start for every run
            return zero_shot["val"], zero_shot["test"]
        val = eval_program.accuracy(validation, b, n_val)
        tested = r == 0 or r == R or (settings.test_every and r % settings.test_every == 0)
        test_accuracy = float(correct(b).mean()) if tested else None
        if r == 0:
            zero_shot.update(val=val, test=test_accuracy)
        eval_seconds[0] += time.perf_counter() - start
        return val, test_accuracy

    runs: dict[str, list[list[RoundRecord]]] = {"cooperative": [], "single": []}
    final_correct: dict[str, list[np.ndarray]] = {"cooperative": [], "single": []}
    batches = manifest.batches
    for seed in range(settings.seeds):
        say(f"seed {seed}: cooperative, {len(spans)} blocks ({', '.join(s.name for s in spans)}), {R} rounds x {K} steps")
        trainers = [Trainer.fresh(program, shard, seed=device_seed(seed, j), batches=batches)
                    for j, (program, shard) in enumerate(zip(block_programs, shards))]
        b, records = train_in_rounds(trainers, layout, R, K, lr, eps, evaluate)
        runs["cooperative"].append(records)
        final_correct["cooperative"].append(correct(b))
        say(f"  validation {records[-1].val_accuracy:.3f}, test {records[-1].test_accuracy:.3f}")
        say(f"seed {seed}: single device, every layer, {R * K} steps")
        single = Trainer.fresh(whole_program, train, seed=seed, batches=batches)
        b, records = train_in_rounds([single], layout, R, K, lr, eps, evaluate)
        runs["single"].append(records)
        final_correct["single"].append(correct(b))
        say(f"  validation {records[-1].val_accuracy:.3f}, test {records[-1].test_accuracy:.3f}")

    final = {name: [float(c.mean()) for c in correct_by_seed] for name, correct_by_seed in final_correct.items()}
    # Paired: the same test examples judge both, so the difference's error is the spread of
    # the per-example difference (McNemar's discordant pairs), not the two binomial errors.
    diffs = [c.astype(np.float64) - s for c, s in zip(final_correct["cooperative"], final_correct["single"])]
    per_example = np.mean(diffs, axis=0)  # [n_test] mean over seeds
    mean_rounds = {name: _mean_records(by_seed) for name, by_seed in runs.items()}  # R + 1 records each
    return {
        "cooperative_accuracy": float(np.mean(final["cooperative"])),
        "single_accuracy": float(np.mean(final["single"])),
        "cooperative_accuracy_by_seed": final["cooperative"],
        "single_accuracy_by_seed": final["single"],
        "test_difference": float(per_example.mean()),
        "test_difference_stderr": float(per_example.std(ddof=1) / np.sqrt(len(per_example))),
        "zero_shot_accuracy": {"validation": zero_shot["val"], "test": zero_shot["test"]},
        "test_accuracy": {"cooperative": float(np.mean(final["cooperative"])),
                          "single": float(np.mean(final["single"])), "zero_shot": zero_shot["test"]},
        "accuracy_per_round": {name: [r["val_accuracy"] for r in records] for name, records in mean_rounds.items()},
        "steps_per_device": R * K, "rounds": R, "local_steps": K,
        "blocks": [{"name": s.name, "first_layer": s.first_layer, "last_layer": s.last_layer, "size": s.size,
                    "train_examples": len(shard)} for s, shard in zip(spans, shards)],
        "b_size": int(eval_program.b_size),
        "single_train_examples": len(train),
        "validation_examples": n_val,
        "validation_subset": f"the first {n_val} of {len(validation)} validation rows (the task's seeded shuffle)",
        "test_examples": len(test),
        "weights": manifest.base_weights,
        "lr": lr, "eps": eps, "batches": batches,
        "rates_from": "the programs' manifests" if settings.lr is None and settings.eps is None else "given",
        "seeds": list(range(settings.seeds)),
        "device_seeds": [[device_seed(seed, j) for j in range(len(spans))] for seed in range(settings.seeds)],
        "shard_seed": settings.shard_seed,
        "cooperative_rounds": mean_rounds["cooperative"],
        "single_rounds": mean_rounds["single"],
        "by_seed": {name: [[asdict(r) for r in records] for records in by_seed] for name, by_seed in runs.items()},
        "eval_seconds": eval_seconds[0],
    }


def _mean_records(by_seed: list[list[RoundRecord]]) -> list[dict]:
    """Per round, each figure's mean over the seeds (test only where it was measured)."""
    out = []
    for records in zip(*by_seed):
        first = records[0]
        tests = [r.test_accuracy for r in records if r.test_accuracy is not None]
        out.append({"round": first.round, "steps_per_device": first.steps_per_device,
                    "val_accuracy": float(np.mean([r.val_accuracy for r in records])),
                    "test_accuracy": float(np.mean(tests)) if tests else None,
                    "loss": {name: float(np.mean([r.loss[name] for r in records])) for name in first.loss},
                    "step_seconds": {name: float(np.mean([r.step_seconds[name] for r in records]))
                                     for name in first.step_seconds}})
    return out


# -- the blocks the planner cuts --------------------------------------------------------


def planned_blocks(layout: Sequence[BSlot], num_layers: int, local_steps: int) -> tuple[list[tuple[int, int]], dict]:
    """The job's trainable layers cut into 3 blocks as the planner cuts them for the lab3 fleet.

    The hypothetical job of ``assets/jobs/smollm2.toml`` (its memory terms, q and bs),
    narrowed to this job's trainable layers, their B payload and K local steps.

    Returns:
        The (first, last) layer of each block, shallowest first, and what says where they came from.
    """
    from shared.blocks import layout_layers
    from shared.fleet_io import load_fleet, load_job
    from shared.planner import PlannerConfig, plan

    layers = layout_layers(layout)
    payload = 4 * sum(slot.size for slot in layout) / len(layers)  # fp32 B bytes per layer
    job = replace(load_job(PLAN_JOB), layers=num_layers, trainable_first=layers[0], trainable_last=layers[-1],
                  layer_payload_bytes=payload, local_steps=local_steps, n_blocks=3)
    result = plan(load_fleet(PLAN_FLEET), job, PlannerConfig(baselines=False))
    blocks = [(block.first_layer, block.last_layer) for block in result.blocks]
    device_of = {d.block: d.device for d in result.devices if d.block is not None}
    return blocks, {
        "how": f"shared.planner.plan ({result.boundary_method} boundaries) on {PLAN_FLEET.relative_to(ROOT)} with "
               f"{PLAN_JOB.relative_to(ROOT)} narrowed to layers {layers[0]}-{layers[-1]}, K = {local_steps}",
        "devices": {f"L{b.first_layer}-{b.last_layer}" if b.first_layer != b.last_layer else f"L{b.first_layer}":
                    device_of[b.name] for b in result.blocks},
        "round_s": result.round_s,
    }


# -- the bench -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="model spec (default: embedded SmolLM2; 'tiny' for a smoke run)")
    parser.add_argument("--layers", default=None, help="the job's trainable layers (default top:8; tiny: 1-3)")
    parser.add_argument("--blocks", default=None,
                        help=f"the cut, e.g. {DEFAULT_BLOCKS} (the default: the default 3-device plan's, as "
                             "bench lowering and bench profile); 'planner': as shared.planner cuts the job for "
                             "assets/fleets/lab3.toml")
    parser.add_argument("--weights", choices=("fp32", "int8"), default="int8",
                        help="frozen linears of the programs (default int8: 2.9x faster steps here, "
                             "bench/results/prge_int8.json)")
    parser.add_argument("--rounds", type=int, default=CoopSettings.rounds, help="R (default 20)")
    parser.add_argument("--local-steps", type=int, default=CoopSettings.local_steps, help="K (default 25)")
    parser.add_argument("--lr", type=float, default=None, help="default: the manifests' suggestion")
    parser.add_argument("--eps", type=float, default=None, help="default: the manifests' suggestion")
    parser.add_argument("--seeds", type=int, default=1, help="training runs per method, seeds 0..N-1 (default 1)")
    parser.add_argument("--eval-limit", type=int, default=400, help="validation rows per evaluation, the first ones")
    parser.add_argument("--test-every", type=int, default=5, help="test accuracy every N rounds and at the end (0: end)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model and export cache (default: deftly's)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-coop"),
                        help="where the programs are exported (default runs/bench-coop)")


def run(args: argparse.Namespace) -> dict:
    from desktop.cli.export import ProgressLine
    from device_agent.program import Program
    from export.lora import b_layout
    from export.models import load_model, load_tokenizer, tiny_llama
    from export.program import ExportConfig, export_plan, export_program, parse_blocks

    settings = CoopSettings(rounds=args.rounds, local_steps=args.local_steps, lr=args.lr, eps=args.eps,
                            seeds=args.seeds, eval_limit=args.eval_limit, test_every=args.test_every)
    settings.check()  # before anything is loaded
    started = time.perf_counter()
    load_before = os.getloadavg()

    # 1. the job and its cut
    if args.model == "tiny":  # the smoke test's model: a 4-layer random Llama with SmolLM2's tokenizer
        loaded = tiny_llama(num_layers=4, hidden_size=64, tokenizer=load_tokenizer("smollm2", args.cache_dir, print))
        cfg = ExportConfig(model="tiny", layers=args.layers or "1-3", seq_len=32, length_buckets=(),
                           calibrate="none", base_weights=args.weights, methods=("step",))
        blocks_text = args.blocks or "1-1,2-2,3-3"
    else:
        loaded = load_model(args.model, cache_dir=args.cache_dir, progress=print)
        cfg = ExportConfig(model=args.model, layers=args.layers or "top:8", base_weights=args.weights,
                           methods=("step",))
        blocks_text = args.blocks or DEFAULT_BLOCKS
    num_layers = loaded.model.config.num_hidden_layers
    layout = b_layout(loaded.model, cfg.lora(num_layers))
    if blocks_text == "planner":
        blocks, blocks_from = planned_blocks(layout, num_layers, settings.local_steps)
    else:
        blocks, blocks_from = parse_blocks(blocks_text), {"how": f"--blocks {blocks_text}"}
    print(f"blocks: {', '.join(f'{a}-{b}' for a, b in blocks)} ({blocks_from['how']})")

    # 2. the programs: a block program per block, the job's eval program, the whole-job program
    export_start = time.perf_counter()
    progress = ProgressLine(plain=True)
    planned = export_plan(cfg, blocks, args.runs_dir / "plan", cache_dir=args.cache_dir, loaded=loaded,
                          on_progress=progress)
    whole = export_program(cfg, args.runs_dir / "single" / "step.pte", cache_dir=args.cache_dir, loaded=loaded,
                           on_progress=progress)
    progress.close()
    export_seconds = time.perf_counter() - export_start
    del loaded  # the programs hold what training needs

    # 3. train, measure, write
    results = measure([Program(result.manifest_path) for result in planned.blocks.values()],
                      Program(whole.manifest_path), Program(planned.eval.manifest_path), settings, args.out_dir,
                      blocks_from=blocks_from, export_seconds=export_seconds, started=started, load_before=load_before)
    return {k: v for k, v in results.items() if k not in ("by_seed", "cooperative_rounds", "single_rounds")}


def measure(block_programs: Sequence, whole_program, eval_program, settings: CoopSettings, out_dir: Path,
            blocks_from: dict, export_seconds: float = 0.0, started: float | None = None,
            load_before: tuple[float, float, float] | None = None, say: Callable[[str], None] = print) -> dict:
    """Both runs of :func:`compare` on the task's splits, with the date, the machine and the timings; written.

    Args:
        block_programs, whole_program, eval_program, settings: as for :func:`compare`.
        out_dir: where ``coop.json`` and ``coop.png`` go.
        blocks_from: how the blocks were chosen (recorded).
        export_seconds: what exporting the programs took (recorded).
        started: ``time.perf_counter()`` when the bench began (default: now).
        load_before: the load average when the bench began (default: now).
        say: progress lines.

    Returns:
        The results as written.
    """
    from device_agent.trainer import peak_rss_mb

    started = time.perf_counter() if started is None else started
    load_before = load_before or os.getloadavg()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    train_start = time.perf_counter()
    results = {"date": date, "model": eval_program.manifest.model_id, "task": eval_program.manifest.task,
               **compare(block_programs, whole_program, eval_program, eval_program.load_data(), settings, say)}
    train_and_eval_seconds = time.perf_counter() - train_start
    results.update({
        "blocks_from": blocks_from,
        "settings": {**asdict(settings), "lr": results["lr"], "eps": results["eps"]},
        "train_and_eval_seconds": train_and_eval_seconds, "export_seconds": export_seconds,
        "wall_seconds": time.perf_counter() - started,
        "median_step_seconds": _median_step_seconds(results),
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine(load_before),
    })
    write(results, out_dir)
    return results


def write(results: dict, out_dir: Path) -> None:
    """``coop.json`` and ``coop.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "coop.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "coop.png")
    print(f"Wrote {out_dir / 'coop.json'} and coop.png")


def machine(load_before: tuple[float, float, float]) -> dict:
    """What the timings were measured on: CPU, cores, platform, and how busy the machine was."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(),
            "load_average": {"before": [round(v, 2) for v in load_before],
                             "after": [round(v, 2) for v in os.getloadavg()]}}


def _median_step_seconds(results: dict) -> dict[str, float]:
    """Per block (and the single device), the median over rounds of a round's seconds per step."""
    K = results["local_steps"]
    out = {}
    for key in ("cooperative_rounds", "single_rounds"):
        rounds = results[key][1:]
        for name in rounds[0]["step_seconds"] if rounds else ():
            out[name] = float(np.median([r["step_seconds"][name] / K for r in rounds]))
    return out


def plot(results: dict, path: Path) -> None:
    """Validation accuracy against steps per device (left); each block's per-round loss (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    seeds = len(results["seeds"])
    for key, label, style in (("cooperative_rounds", "cooperative", "o-"), ("single_rounds", "single device", "s-")):
        rounds = results[key]
        steps = [r["steps_per_device"] for r in rounds]
        final = results["cooperative_accuracy" if key.startswith("coop") else "single_accuracy"]
        left.plot(steps, [r["val_accuracy"] for r in rounds], style, ms=3, label=f"{label} (test {final:.3f})")
        tested = [(r["steps_per_device"], r["test_accuracy"]) for r in rounds if r["test_accuracy"] is not None]
        left.plot(*zip(*tested), style[0], mfc="none", color=left.lines[-1].get_color(), ms=7,
                  label=f"{label}, test")
    left.set_xlabel("steps per device")
    left.set_ylabel(f"accuracy (validation: {results['validation_examples']} rows)")
    left.legend(loc="center right", fontsize=8)  # clear of the validation curves above and the tests below
    blocks = ", ".join(b["name"] for b in results["blocks"])
    left.set_title(f"{results['model']} {results['weights']}: blocks {blocks}\n"
                   f"R={results['rounds']} x K={results['local_steps']}, lr {results['lr']:g}, eps {results['eps']:g}"
                   + (f", mean of {seeds} seeds" if seeds > 1 else ""), fontsize=9)
    for key in ("cooperative_rounds", "single_rounds"):
        rounds = results[key][1:]
        for name in rounds[0]["loss"] if rounds else ():
            right.plot([r["round"] for r in rounds], [r["loss"][name] for r in rounds], ".-",
                       label=name + (" (every layer, all data)" if name == SINGLE else " (its own share)"))
    right.set_xlabel("round")
    right.set_ylabel("mean step loss in the round")
    right.set_title("loss per block, each on its own data", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
