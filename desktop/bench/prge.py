"""P-RGE in ExecuTorch vs MeZO, eager P-RGE and first-order LoRA, side by side in one run.

`deftly bench prge` on SmolLM2-135M (q=4, bs=4, T=64) writes
`bench/results/prge.json` (flat keys) and `prge.png`:

* `speedup_vs_mezo`      eager MeZO step (2q sequential one-copy forwards, no prefix
                         sharing) / ExecuTorch P-RGE step with prefix sharing   (target ≥ 5)
* `et_over_eager`        eager P-RGE step / ExecuTorch P-RGE step, same maths and shapes (≥ 1, target 1.5)
* `prefix_speedup`       ExecuTorch step with all layers trainable / top-K with prefix sharing (target ≥ 2)
* `batch_speedup`        2q sequential one-copy forwards in ExecuTorch / one batched step
* `rss_train_over_infer` peak RSS of ExecuTorch training / ExecuTorch inference (target ≤ 1.3)
* `rss_train_over_fo`    peak RSS of ExecuTorch training / first-order LoRA in eager PyTorch (target ≤ 0.5)
* `accuracy`             test accuracy after P-RGE training in ExecuTorch, the mean over the
                         bench's training seeds, beside `zero_shot_accuracy`, `steps`,
                         `train_seconds` (target ≥ 0.80 within 2,000 steps)
* `program_bytes`        size of the per-device `.pte` without the shared weights (target < 5 MB)
* `accuracy_without_bias` the same trained b's test accuracy without the class bias: what
                         `PeftModel.from_pretrained` alone predicts, without `deftly_calibration.json`
                         (`export.serving`); `accuracy` is with it, the classifier that was trained

`--weights int8` runs the same comparison with int8 frozen linears in the ExecuTorch
programs (the eager contenders stay fp32, as the baselines are defined) and writes
`prge_int8.json` / `.png`, adding `int8_speedup_over_fp32` (the fp32 ExecuTorch step
timed in the same rounds / the int8 one), `zero_shot_accuracy_fp32`,
`accuracy_on_fp32_base` (the adapters trained by the int8 program, evaluated by the fp32
program with the calibration bias the adapter ships with, the int8 program's: what
`PeftModel.from_pretrained` on the fp32 model and `deftly_calibration.json` predict;
`accuracy_on_fp32_base_without_bias` the same without the bias) and
`int8_g_correlation` (the int8 program's g against the fp32 program's, per eps).

`--accuracy-seeds N` trains N times (seeds 0..N-1: other batches and directions, the same
program, all of them reported, none chosen). `accuracy` (and, for int8,
`accuracy_on_fp32_base`) is their mean, `accuracy_by_seed` each run's; the curve in the
PNG is seed 0's. The mean is the figure the target is read on: one run's accuracy moves
with the seed by about as much as its binomial error on the test split
(`accuracy_test_stderr`, seed 0's), so one run says little about the recipe;
`accuracy_seed_stderr` is the standard error of the mean over the seeds (N ≥ 2).

Every run also times a chain of decoder-MLP-shaped GEMMs three ways (eager fp32, and
ExecuTorch with fp32 and with int8 weights) and records the CPU's SIMD flags, so the
step rates can be read against what this CPU's kernels reach: `int8_gemm_over_fp32`
is the most int8 weights can buy here.

Timings are interleaved: each round times one step of every contender in turn,
and the ratio of medians is reported, so a busy neighbour slows all of them
alike.  Peak RSS is measured in fresh processes, one per contender.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from shared.errors import InputError
from shared.events import Eval, Event

TARGETS = {
    "speedup_vs_mezo": ">= 5", "et_over_eager": ">= 1 (goal 1.5)", "prefix_speedup": ">= 2",
    "rss_train_over_infer": "<= 1.3", "rss_train_over_fo": "<= 0.5", "accuracy": ">= 0.80 within 2000 steps (mean over the seeds)",
    "program_bytes": "< 5 MB",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="model spec (default: embedded SmolLM2; 'tiny' for a smoke run)")
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--layers", default=None, help="trainable layers of the P-RGE program (default: export's)")
    parser.add_argument("--steps", type=int, default=2000, help="P-RGE training steps in ExecuTorch")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-limit", type=int, default=400, help="validation examples per evaluation")
    parser.add_argument("--fo-steps", type=int, default=250, help="first-order LoRA steps for its curve")
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--rss-steps", type=int, default=5, help="steps run in each peak-RSS process")
    parser.add_argument("--skip-accuracy", action="store_true", help="timings and memory only")
    parser.add_argument("--accuracy-seeds", type=int, default=1,
                        help="training runs for the accuracy, seeds 0..N-1 (other batches and directions); "
                             "`accuracy` is their mean, `accuracy_by_seed` each one's")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                        help="frozen linears of the ExecuTorch programs (int8 writes prge_int8.json)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the exported programs and the training run go (default runs/bench-prge[-int8])")


def run(args: argparse.Namespace) -> dict:
    if args.accuracy_seeds < 1:
        raise InputError(f"--accuracy-seeds {args.accuracy_seeds}: expected 1 or more")
    import torch

    from device_agent.program import Program
    from device_agent.trainer import TrainConfig, run_training
    from desktop.bench import baselines
    from export.lora import AdapterTensors
    from export.models import load_model, load_tokenizer, tiny_llama
    from export.prge import PrgeConfig, PrgeProgram
    from desktop.cli.export import ProgressLine
    from export.program import DEFAULT_EPS, ExportConfig, export_program

    started = time.perf_counter()
    say = print
    args.out_dir.mkdir(parents=True, exist_ok=True)
    int8 = args.weights == "int8"
    stem = "prge_int8" if int8 else "prge"
    runs = args.runs_dir or Path("runs/bench-prge-int8" if int8 else "runs/bench-prge")
    base = ExportConfig(model=args.model, task=args.task, base_weights=args.weights)
    if args.layers:
        base = replace(base, layers=args.layers)

    # 1. programs: top-K with prefix sharing (step, eval, loss) and all layers (step).
    if args.model == "tiny":  # the smoke test's model: a 2-layer random Llama with SmolLM2's tokenizer
        loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=load_tokenizer("smollm2", args.cache_dir, say))
    else:
        loaded = load_model(args.model, cache_dir=args.cache_dir, progress=say)
    top = export_program(replace(base, methods=("step", "eval", "loss")), runs / "top" / "step.pte",
                         cache_dir=args.cache_dir, on_progress=ProgressLine(plain=True), loaded=loaded)
    every = export_program(replace(base, layers="all", methods=("step",), length_buckets=()), runs / "all" / "step.pte",
                           cache_dir=args.cache_dir, on_progress=ProgressLine(plain=True), loaded=loaded)
    et_top, et_all = Program(top.manifest_path), Program(every.manifest_path)
    et_fp32 = None
    if int8:  # the fp32 program of the same block, timed in the same rounds
        top_fp32 = export_program(replace(base, base_weights="fp32", methods=("step", "eval", "loss")),
                                  runs / "top_fp32" / "step.pte", cache_dir=args.cache_dir, on_progress=ProgressLine(plain=True), loaded=loaded)
        et_fp32 = Program(top_fp32.manifest_path)
    manifest = et_top.manifest
    splits = et_top.load_data()

    # 2. the eager twins of the same program (same adapter, same shapes).
    adapter = AdapterTensors.build(loaded.model, base.lora(loaded.model.config.num_hidden_layers))
    eager_prge = PrgeProgram(loaded.model, adapter, base.prge(), manifest.verbalizer_token_ids)
    eager_mezo = PrgeProgram(loaded.model, adapter, replace(base.prge(), prefix_sharing=False),
                             manifest.verbalizer_token_ids)
    for eager in (eager_prge, eager_mezo):  # the same calibrated classifier as the program
        eager.class_bias.copy_(torch.tensor(manifest.class_bias))

    # 3. step timings, interleaved.
    train = splits["train"]
    bs, q = manifest.batch_size, manifest.q
    # A batch with a row longer than every shorter bucket, so every contender runs at the
    # full T: the ratios compare the same maths on the same shapes.
    longest_bucket_below = max([t for t in et_top.buckets if t < manifest.seq_len], default=0)
    rows = np.flatnonzero(train.lengths > longest_bucket_below)[:bs]
    ids, lengths, labels = train.input_ids[rows], train.lengths[rows], train.labels[rows]
    rng = np.random.default_rng(0)
    b = np.zeros(manifest.b_size, dtype=np.float32)
    z = rng.standard_normal((q, manifest.b_size), dtype=np.float32)
    z_all = rng.standard_normal((q, et_all.b_size), dtype=np.float32)
    b_all = np.zeros(et_all.b_size, dtype=np.float32)
    t_ids, t_len, t_lab = (torch.from_numpy(a) for a in (ids, lengths, labels))
    t_b, t_z = torch.from_numpy(b), torch.from_numpy(z)
    lr, eps = base.suggested_lr(), base.suggested_eps()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    contenders: dict[str, Callable[[], object]] = {
        "et_step": lambda: et_top.step(ids, lengths, labels, b, z, lr, eps),
        "et_step_all_layers": lambda: et_all.step(ids, lengths, labels, b_all, z_all, lr, eps),
        "et_sequential_2q": lambda: [et_top.loss(ids, lengths, labels, b) for _ in range(2 * q)],
        "eager_prge_step": lambda: baselines.prge_eager_step(eager_prge, t_ids, t_len, t_lab, t_b, t_z, lr, eps),
        "eager_mezo_step": lambda: baselines.mezo_step(eager_mezo, t_ids, t_len, t_lab, t_b,
                                                       lambda i: t_z[i], q, lr, eps),
    }
    if int8:
        contenders["et_step_fp32"] = lambda: et_fp32.step(ids, lengths, labels, b, z, lr, eps)
    say(f"Timing {len(contenders)} contenders, {args.timing_rounds} interleaved rounds ...")
    seconds = interleaved_medians(contenders, args.timing_rounds)
    for name, value in seconds.items():
        say(f"  {name:22s} {value:.3f} s")
    # The work behind the ratios: matmul FLOPs of one step (counted on the eager twins, which
    # compute what the programs compute) and the rate each contender reaches, beside what
    # decoder-MLP GEMMs alone reach here at the 2q·bs·T rows of the trained layers.
    gemm_shape = (2 * q * bs * manifest.seq_len, loaded.model.config.hidden_size, loaded.model.config.intermediate_size)
    gflop = {"prge_step": matmul_gflop(contenders["eager_prge_step"]),
             "mezo_step": matmul_gflop(contenders["eager_mezo_step"])}
    gflops = {"et_step": gflop["prge_step"] / seconds["et_step"],
              "eager_prge_step": gflop["prge_step"] / seconds["eager_prge_step"],
              "eager_mezo_step": gflop["mezo_step"] / seconds["eager_mezo_step"],
              **gemm_gflops(*gemm_shape, args.timing_rounds, runs / "gemm")}
    say(f"  GFLOP per step: P-RGE {gflop['prge_step']:.1f}, MeZO {gflop['mezo_step']:.1f}; GFLOP/s "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in gflops.items()))

    # 4. peak RSS, each in a fresh process.
    say("Measuring peak RSS in separate processes ...")
    rss_train = baselines.measure_peak_rss(et_training_job, str(top.manifest_path), args.rss_steps).bytes
    rss_infer = baselines.measure_peak_rss(et_inference_job, str(top.manifest_path), args.rss_steps).bytes
    fo_job = baselines.EagerJob(method="first_order_lora", model=args.model,
                                cache_dir=str(args.cache_dir) if args.cache_dir else None, task=args.task,
                                layers=base.layers, target_modules=tuple(base.target_modules), rank=base.rank,
                                alpha=base.alpha, seq_len=base.seq_len, steps=args.rss_steps)
    rss_fo = baselines.measure_peak_rss(baselines.eager_training_job, fo_job).bytes
    say(f"  ET training {rss_train / 2**20:.0f} MiB, ET inference {rss_infer / 2**20:.0f} MiB, "
        f"first-order eager {rss_fo / 2**20:.0f} MiB")
    rss_train_fp32 = None
    if int8:  # the fp32 program's training loop, measured beside it
        rss_train_fp32 = baselines.measure_peak_rss(et_training_job, str(top_fp32.manifest_path), args.rss_steps).bytes
        say(f"  ET training with fp32 weights {rss_train_fp32 / 2**20:.0f} MiB")

    results: dict = {
        "model": manifest.model_id, "task": manifest.task, "base_weights": manifest.base_weights, "q": q, "batch_size": bs, "seq_len": manifest.seq_len,
        "trainable_layers": manifest.trainable_layers, "target_modules": manifest.target_modules,
        "speedup_vs_mezo": seconds["eager_mezo_step"] / seconds["et_step"],
        "et_over_eager": seconds["eager_prge_step"] / seconds["et_step"],
        "prefix_speedup": seconds["et_step_all_layers"] / seconds["et_step"],
        "batch_speedup": seconds["et_sequential_2q"] / seconds["et_step"],
        "rss_train_over_infer": rss_train / rss_infer,
        "rss_train_over_fo": rss_train / rss_fo,
        "program_bytes": sum(path.stat().st_size for path in set(top.method_files.values())),
        "weights_bytes": top.files["weights"].stat().st_size,
        "seconds_per_step": seconds,
        "gflop_per_step": gflop,
        "flop_ratio_mezo_over_prge": gflop["mezo_step"] / gflop["prge_step"],
        "gflops_per_second": gflops,
        "int8_gemm_over_fp32": gflops["et_gemm_int8"] / gflops["et_gemm_fp32"],
        "rss_bytes": {"et_train": rss_train, "et_infer": rss_infer, "first_order_eager": rss_fo},
        "targets": TARGETS,
        "machine": {"cpus": _cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "simd": cpu_simd_flags()},
    }
    if int8:
        results["int8_speedup_over_fp32"] = seconds["et_step_fp32"] / seconds["et_step"]
        # Whether the int8 program's gradient estimate is the fp32 one's, at fp32's eps and at its own.
        say("Comparing the int8 program's gradient estimates with the fp32 program's ...")
        results["int8_g_correlation"] = {
            f"{e:g}": g_correlation(et_top, et_fp32, train, e, reference_eps=DEFAULT_EPS["fp32"])
            for e in sorted({DEFAULT_EPS["fp32"], eps})}
        say("  " + ", ".join(f"eps {e}: {c:.3f}" for e, c in results["int8_g_correlation"].items()))
        results["rss_bytes"]["et_train_fp32"] = rss_train_fp32
        results["rss_train_over_fo_fp32"] = rss_train_fp32 / rss_fo

    # 5. accuracy: P-RGE trained in ExecuTorch, and first-order LoRA's curve beside it.
    if not args.skip_accuracy:
        say(f"Training P-RGE in ExecuTorch for {args.steps} steps ...")
        curve: list[tuple[int, float]] = []

        def on_event(event: Event) -> None:
            if isinstance(event, Eval):
                curve.append((event.step, event.accuracy))
                say(f"  step {event.step}: validation accuracy {event.accuracy:.3f}")

        run_dir = runs / "train"
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the trainer refuses to overwrite one
        train_cfg = TrainConfig(program=top.manifest_path, steps=args.steps, eval_every=args.eval_every,
                                eval_limit=args.eval_limit, out=run_dir)
        train_start = time.perf_counter()
        result = run_training(train_cfg, on_event=on_event)
        train_seconds = time.perf_counter() - train_start
        say(f"  seed 0: test accuracy {result.test_accuracy:.3f}")
        zero_shot = et_top.accuracy(splits["test"], np.zeros(manifest.b_size, dtype=np.float32))
        no_bias = np.zeros(len(manifest.labels), dtype=np.float32)

        def without_bias(program, b: np.ndarray) -> float:
            """Test accuracy of b without the class bias: what PEFT alone serves."""
            return program.accuracy(splits["test"], b, class_bias=no_bias)

        unbiased_by_seed = [without_bias(et_top, result.b)]
        if int8:
            results["zero_shot_accuracy_fp32"] = et_fp32.accuracy(splits["test"], np.zeros(manifest.b_size, np.float32))
            # The same b means the same adapter in both programs (the int8 program's A's carry
            # the smoothing scales its weights lost), so this is the trained adapter served on
            # the fp32 model, as the PEFT adapter is loaded, with the calibration bias it ships
            # with (the int8 program's, in deftly_calibration.json): training paid int8's
            # rounding, this says what serving does not have to.
            def served_on_fp32(b: np.ndarray) -> float:
                return et_fp32.accuracy(splits["test"], b, class_bias=np.asarray(manifest.class_bias))

            served_by_seed = [served_on_fp32(result.b)]
            served_unbiased_by_seed = [without_bias(et_fp32, result.b)]
            say(f"  the trained adapter on fp32 base weights: test accuracy {served_by_seed[0]:.3f}")
        # More seeds (other batches and other z, the same program): one run's test accuracy
        # moves by about a point with the seed, as much as its binomial error on the test split.
        by_seed = [result.test_accuracy]
        for seed in range(1, args.accuracy_seeds):
            say(f"Training P-RGE in ExecuTorch for {args.steps} steps, seed {seed} of {args.accuracy_seeds - 1} ...")
            seed_dir = runs / f"train_seed{seed}"
            shutil.rmtree(seed_dir, ignore_errors=True)
            seeded = run_training(replace(train_cfg, seed=seed, eval_every=0, eval_at_start=False, out=seed_dir))
            by_seed.append(seeded.test_accuracy)
            unbiased_by_seed.append(without_bias(et_top, seeded.b))
            if int8:
                served_by_seed.append(served_on_fp32(seeded.b))
                served_unbiased_by_seed.append(without_bias(et_fp32, seeded.b))
            say(f"  seed {seed}: test accuracy {by_seed[-1]:.3f}"
                + (f", on fp32 base weights {served_by_seed[-1]:.3f}" if int8 else ""))
        test_examples = len(splits["test"].labels)
        accuracy = float(np.mean(by_seed))
        results.update({
            "accuracy_by_seed": by_seed,
            "accuracy_without_bias_by_seed": unbiased_by_seed,
            "accuracy_without_bias": float(np.mean(unbiased_by_seed)),
            # one run's sampling error on the test split: sqrt(p (1 - p) / n)
            "accuracy_test_stderr": float(np.sqrt(result.test_accuracy * (1 - result.test_accuracy) / test_examples)),
        })
        if len(by_seed) > 1:
            results["accuracy_seed_stderr"] = float(np.std(by_seed, ddof=1) / np.sqrt(len(by_seed)))
            say(f"  test accuracy over {len(by_seed)} seeds: mean {accuracy:.3f} "
                f"(standard error {results['accuracy_seed_stderr']:.3f})")
        if int8:
            results.update({"accuracy_on_fp32_base_by_seed": served_by_seed,
                            "accuracy_on_fp32_base": float(np.mean(served_by_seed)),
                            "accuracy_on_fp32_base_without_bias_by_seed": served_unbiased_by_seed,
                            "accuracy_on_fp32_base_without_bias": float(np.mean(served_unbiased_by_seed))})
        say(f"Training first-order LoRA (eager) for {args.fo_steps} steps for its curve ...")
        fo = baselines.run_baseline(
            "first_order_lora", eager_prge, {k: v for k, v in splits.items()},
            baselines.BaselineConfig(steps=args.fo_steps, eval_every=max(1, args.fo_steps // 5),
                                     eval_limit=args.eval_limit))
        results.update({
            "accuracy": accuracy, "zero_shot_accuracy": zero_shot, "steps": args.steps,
            "train_seconds": train_seconds, "et_seconds_per_step_training": result.seconds_per_step,
            "lr": manifest.lr, "eps": manifest.eps, "batches": manifest.batches,
            "prge_curve": curve, "first_order_curve": list(zip(fo.eval_steps, fo.eval_accuracy)),
            "first_order_test_accuracy": fo.test_accuracy, "first_order_steps": args.fo_steps,
            "first_order_train_seconds": float(sum(fo.step_seconds)),
        })

    results["bench_seconds"] = time.perf_counter() - started
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=float))
    plot(results, args.out_dir / f"{stem}.png")
    say(f"Wrote {args.out_dir / f'{stem}.json'} and {stem}.png")
    return {k: v for k, v in results.items() if k not in ("prge_curve", "first_order_curve")}


def g_correlation(program, reference, split, eps: float, reference_eps: float, batches: int = 12) -> float:
    """Correlation of ``program``'s g with ``reference``'s on the same batches and directions.

    g is each direction's (L+ - L-) / (2 eps); ``reference`` (the fp32 program) runs at
    ``reference_eps``. 1 means the same gradient estimate; near 0, ``program``'s is noise.
    """
    rng = np.random.default_rng(0)
    b = np.zeros(program.b_size, dtype=np.float32)
    ours, theirs = [], []
    for _ in range(batches):
        rows = rng.choice(len(split.labels), program.batch_size, replace=False)
        z = rng.standard_normal((program.q, program.b_size), dtype=np.float32)
        batch = (split.input_ids[rows], split.lengths[rows], split.labels[rows], b, z)
        ours.append(program.step(*batch, 0.0, eps)[2])
        theirs.append(reference.step(*batch, 0.0, reference_eps)[2])
    return float(np.corrcoef(np.concatenate(ours), np.concatenate(theirs))[0, 1])


def interleaved_medians(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, timed one after another in each round (after one warm-up)."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def matmul_gflop(fn: Callable[[], object]) -> float:
    """Matmul GFLOP (mm, addmm, bmm; 2 per multiply-add) of one call of an eager function."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


class MlpGemms:
    """``layers`` decoder-MLP-shaped GEMM pairs, ``x + (x @ up.T) @ down.T`` each, nothing else.

    The yardstick for the step's rates: the GEMMs that dominate the step, chained so a
    call's fixed costs (entering the runtime, copying the output) are small beside them.
    """

    def __init__(self, hidden: int, intermediate: int, layers: int = 4) -> None:
        import torch

        generator = torch.Generator().manual_seed(0)
        self.ups = [torch.randn(intermediate, hidden, generator=generator) / hidden ** 0.5 for _ in range(layers)]
        self.downs = [torch.randn(hidden, intermediate, generator=generator) / intermediate ** 0.5
                      for _ in range(layers)]

    def gflop(self, rows: int) -> float:
        return sum(2 * rows * w.shape[0] * w.shape[1] for w in self.ups + self.downs) / 1e9

    def module(self, weights: str):
        """A torch module computing the chain, its linears int8 (as `--weights int8`) or fp32."""
        import torch

        from export.int8 import quantize_linears_int8

        def linear(weight):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(weight)
            return layer

        pairs = torch.nn.ModuleList(torch.nn.Sequential(linear(up), linear(down)) for up, down in zip(self.ups, self.downs))

        class Chain(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.pairs = pairs

            def forward(self, x):
                for pair in self.pairs:
                    x = x + pair(x)
                return x

        chain = Chain().eval()
        if weights == "int8":
            quantize_linears_int8(chain)
        elif weights != "fp32":
            raise ValueError(f"weights {weights!r}: expected fp32 or int8")
        return chain

    def lower(self, weights: str, path: Path, rows: int) -> Path:
        """Write the chain as an ExecuTorch program lowered to XNNPACK, taking x [rows, hidden]."""
        import torch

        from export.lowering import lower_unit

        example = (torch.zeros(rows, self.ups[0].shape[1]),)
        lowered = lower_unit({"forward": (self.module(weights), example)}, external_weights=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(lowered.buffer)
        return path


def gemm_gflops(rows: int, hidden: int, intermediate: int, rounds: int, workdir: Path) -> dict[str, float]:
    """GFLOP/s of decoder-MLP GEMMs at ``rows`` rows: eager fp32, ExecuTorch fp32 and int8 weights.

    The ceiling a step built of such GEMMs can reach on this CPU. int8 pays only where
    the CPU has int8 dot products (AVX-VNNI, ARM dotprod), which the ratio shows.
    """
    import torch

    from device_agent.program import open_et_program

    gemms = MlpGemms(hidden, intermediate)
    x = torch.randn(rows, hidden)
    eager = gemms.module("fp32")
    contenders = {"eager_gemm_fp32": lambda: eager(x)}
    for kind in ("fp32", "int8"):
        method = open_et_program(gemms.lower(kind, workdir / f"gemm_{kind}.pte", rows), None).load_method("forward")
        contenders[f"et_gemm_{kind}"] = lambda method=method: method([x])
    with torch.no_grad():
        seconds = interleaved_medians(contenders, max(rounds, 3))
    return {name: gemms.gflop(rows) / value for name, value in seconds.items()}


def cpu_simd_flags() -> list[str]:
    """The CPU's vector and int8-dot-product features that bound these rates (Linux /proc/cpuinfo).

    Read directly rather than with py-cpuinfo (installed with executorch, not a dependency
    of ours), which on Linux reads the same file.
    """
    wanted = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
              "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16"}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(wanted & set(value.split()))
    return []


def et_training_job(manifest_path: str, steps: int) -> int:
    """`deftly train`'s own loop for `steps` steps, with its default resident-method bound,
    a validation and a test pass (for peak RSS in a fresh process): what a device runs."""
    import tempfile

    from device_agent.trainer import TrainConfig, run_training

    with tempfile.TemporaryDirectory(prefix="deftly-rss-") as out:
        result = run_training(TrainConfig(program=Path(manifest_path), out=Path(out), steps=steps,
                                          eval_every=steps, eval_limit=32, test_limit=32))
    return result.step


def et_inference_job(manifest_path: str, steps: int) -> int:
    """Run `steps` ExecuTorch forwards of the same model on the same batches (peak RSS)."""
    from device_agent.program import Program

    program = Program(Path(manifest_path))
    train = program.load_data()["train"]
    b = np.zeros(program.b_size, dtype=np.float32)
    bs = program.batch_size
    for step in range(steps):
        rows = slice(step * bs, (step + 1) * bs)
        program.loss(train.input_ids[rows], train.lengths[rows], train.labels[rows], b)
    return steps


def plot(results: dict, path: Path) -> None:
    """Accuracy curves (left) and seconds per step of every contender (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if results.get("prge_curve"):
        steps, acc = zip(*results["prge_curve"])
        seeds = results.get("accuracy_by_seed", [])
        test = (f"seed 0's curve;\ntest: mean of {len(seeds)} seeds {results['accuracy']:.3f} "
                f"({' / '.join(f'{a:.3f}' for a in seeds)})" if len(seeds) > 1 else f"test {results['accuracy']:.3f}")
        left.plot(steps, acc, "o-", label=f"P-RGE in ExecuTorch ({test})")
        fo_steps, fo_acc = zip(*results["first_order_curve"])
        left.plot(fo_steps, fo_acc, "s-", label=f"first-order LoRA, eager (test {results['first_order_test_accuracy']:.3f})")
        left.axhline(results["zero_shot_accuracy"], color="grey", ls="--", label=f"zero-shot, calibrated (test {results['zero_shot_accuracy']:.3f})")
        left.axhline(0.80, color="green", ls=":", label="target 0.80")
        left.set_xlabel("step")
        left.set_ylabel("validation accuracy")
        left.set_ylim(0.4, 1.0)
        left.legend(loc="lower right", fontsize=8)
        left.set_title(f"{results['model']} on {results['task']}")
    else:
        left.text(0.5, 0.5, "accuracy run skipped", ha="center", va="center")
        left.set_axis_off()
    names = list(results["seconds_per_step"])
    values = [results["seconds_per_step"][n] for n in names]
    bars = right.barh(names, values, color=["C0" if n.startswith("et_") else "C1" for n in names])
    right.bar_label(bars, fmt="%.2f s", fontsize=8)
    right.set_xlabel("seconds per step (median, interleaved)")
    right.set_title(f"speedup vs MeZO {results['speedup_vs_mezo']:.1f}x, ET/eager {results['et_over_eager']:.2f}x, "
                    f"prefix {results['prefix_speedup']:.1f}x", fontsize=9)
    right.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
