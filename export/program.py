"""Export P-RGE programs: the job behind `deftly export`, and every program a plan needs.

A *job* is one adapter (model, task, trainable layers, targets, rank, q, bs, T); a
*block* is a contiguous range of its trainable layers (``shared.blocks``). Three
kinds of program come out of one job:

* the single-device program (:func:`export_program`, the default of `deftly export`):
  the block of every trainable layer, with ``step`` and ``eval`` methods, for
  `deftly train`;
* a block program (`deftly export --block a-b`, or :func:`export_plan`): the ``step``
  methods of one block only: what a device runs;
* the eval program (`deftly export --eval-only`, or :func:`export_plan`): the ``eval``
  methods, for the coordinator that evaluates the merged adapter.

The files a program needs lie beside its manifest:

    <name>.manifest.json     what the program computes and how to call it (shared.manifest)
    <name>.<method>.pte      one file per method (graph + small constants: A's, head rows,
                             rope); with --embed-weights, one <name>.pte holding them all
    weights-<sha12>.ptd      the frozen base weights, named by content: a device that
                             holds them never receives them again, whatever the plan
    <data>.data.npz          the task, tokenised (train / validation / test)
    <data>.lora_a.npz        the frozen A's, to write the PEFT adapter (programs with eval)

Stages (reported as ``export.progress.ExportProgress`` events): load the model,
tokenise the task, quantise (int8), calibrate, then lower each method that the
cache (``export.cache``) does not hold yet, several at once in worker processes
(``export.lowering``), then write the files. Everything a plan's programs share is
done once: the model, the data, the calibration, the weights file, and every
method whose graph does not depend on the block (``eval``).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from export.cache import ProgramCache, cached_class_bias, digest, model_fingerprint, place_file, toolchain, unit_key
from export.calibration import median_class_bias
from export.int8 import BASE_WEIGHTS, base_weights_id, smoothing_ranges
from export.lora import AdapterTensors, LoraFaConfig, parse_layers, peft_config
from export.lowering import (BUCKETED_METHODS, METHODS, ProgramRecipe, UnitJob, base_method, bucket_method,
                             default_workers, lower_units, recipe_program, release_bases)
from export.prge import PrgeConfig, PrgeProgram
from export.progress import Callback, ProgressTracker
from shared.blocks import BlockSpan, block_span, spans_for, whole_span
from shared.errors import InputError
from shared.hashing import sha256_file
from shared.manifest import BATCH_ORDERS, Manifest
from shared.task_data import save_splits

# 6: block programs (z and the update on the block's slice, the job's whole layout in the
# manifest), one .pte per method, weights tagged without a second export. 5: eval_t<T>
# methods. 4: last layer at the answer position only. 3: int8 weights moved to the .ptd.
# Bump when the program layout changes: invalidates cached exports.
PROGRAM_FORMAT = 6
# The perturbation scale each kind of frozen weights suggests to the trainer. int8 programs
# quantise activations per token at run time, so the ±eps copies round differently: at 1e-2
# the loss difference is rounding noise (on SmolLM2, g's correlation with the fp32 program's
# was -0.08, and training drifted down); 0.3 brings it to 0.98 while fp32's own g at 0.3
# stays within 0.997 of its g at 1e-2 (docs/accuracy_experiments.md, session 6).
DEFAULT_EPS = {"fp32": 1e-2, "int8": 3e-1}
# The learning rate and batch order each kind of frozen weights suggests, chosen on the
# whole validation split. fp32: lr 1e-1 with shuffled batches (session 5). int8: batches
# at the training split's class shares take ~40 % of the noise out of each step's
# estimate, and that lets lr 2e-1 pay; shuffled batches at 2e-1 were worse than at 1e-1
# (docs/accuracy_experiments.md, sessions 7 and 12).
DEFAULT_LR = {"fp32": 1e-1, "int8": 2e-1}
DEFAULT_BATCHES = {"fp32": "shuffled", "int8": "stratified"}
STEP_METHODS = ("step", "step_rng")  # what a device runs; the rest serve the coordinator or benchmarks
CALIBRATIONS = ("median", "none")


@dataclass(frozen=True)
class ExportConfig:
    """Everything `deftly export` decides; one flat record, defaults commented."""

    model: str = "smollm2"  # "smollm2" (embedded), a local HF directory, or a hub id
    task: str = "rotten_tomatoes"  # embedded task name or a TOML task file
    layers: str = "top:8"  # the job's trainable layers: all | top:K | a-b | a,b,c
    # The block this program perturbs and updates: (first, last) trainable layer, inclusive;
    # None: every trainable layer (a single device trains the whole adapter).
    block: tuple[int, int] | None = None
    q: int = 4  # random directions per step
    batch_size: int = 4  # examples per step
    eval_batch_size: int = 16  # examples per eval call
    seq_len: int = 64  # tokens per example (longer prompts lose text, never the cue words)
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    loss: str = "verbalizer"  # "verbalizer" or "vocab"
    prefix_sharing: bool = True
    lr: float | None = None  # suggested to the trainer (a program input); None: DEFAULT_LR of base_weights
    eps: float | None = None  # suggested to the trainer; None: DEFAULT_EPS of base_weights (suggested_eps)
    batches: str | None = None  # batch order suggested to the trainer (BATCH_ORDERS); None: DEFAULT_BATCHES
    seed: int = 0  # seeds the A's
    methods: tuple[str, ...] = ("step", "eval")
    # Shorter step and eval variants; the trainer batches reviews of similar length together
    # and runs each batch at the shortest bucket that holds it (70 % of Rotten Tomatoes
    # prompts fit in 32 tokens).  Buckets at or above seq_len are ignored.
    length_buckets: tuple[int, ...] = (32,)
    external_weights: bool = True  # frozen weights in a shared .ptd instead of inside the .pte
    calibrate: str = "median"  # "median": per-class logit bias from training prompts (export.calibration); "none"
    calibration_examples: int = 256  # training prompts the bias is measured on
    # "fp32", or "int8": the frozen linears of the decoder layers as int8 weights with
    # per-output-channel scales and int8 activations per token (XNNPACK's qd8 GEMMs),
    # and the embedding as int8 rows with a scale each; norms, head, A and B stay fp32.
    base_weights: str = "fp32"
    # int8 only: SmoothQuant's alpha (export.smoothing), how much of the decoder linears'
    # activation outliers move into their weights before quantising; 0 switches it off.
    # On SmolLM2 0.5 took the int8 model's answer logits from 0.982 to 0.993 correlation
    # with fp32's (docs/accuracy_experiments.md, session 7).
    int8_smoothing: float = 0.5
    smoothing_examples: int = 128  # training prompts the activation ranges are measured on

    def check(self) -> None:
        """Every setting that can be checked without the model.

        Raises:
            InputError: naming the option and what it takes.
        """
        for name, value in (("q", self.q), ("bs", self.batch_size), ("eval-bs", self.eval_batch_size),
                            ("seq", self.seq_len), ("rank", self.rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"--{name} {value!r}: must be an integer of at least 1")
        if not self.alpha > 0:
            raise InputError(f"--alpha {self.alpha:g}: must be positive")
        if not self.target_modules:
            raise InputError("--targets: name at least one target linear, e.g. q_proj,v_proj")
        if not self.methods:
            raise InputError("--methods: name at least one method")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
        if len(set(self.methods)) != len(self.methods):
            raise InputError(f"--methods {','.join(self.methods)}: a method is named twice")
        if self.base_weights not in BASE_WEIGHTS:
            raise InputError(f"--weights {self.base_weights!r}: expected fp32 or int8")
        if self.batches is not None and self.batches not in BATCH_ORDERS:
            raise InputError(f"--batches {self.batches!r}: choose from {', '.join(BATCH_ORDERS)}")
        if not 0 <= self.int8_smoothing <= 1:
            raise InputError(f"--int8-smoothing {self.int8_smoothing:g}: expected a value between 0 and 1")
        if self.calibrate not in CALIBRATIONS:
            raise InputError(f"--calibrate {self.calibrate!r}: expected median or none")
        if self.calibrate == "median" and self.loss != "verbalizer":
            raise InputError("--calibrate median needs --loss verbalizer")
        if self.loss not in ("verbalizer", "vocab"):
            raise InputError(f"--loss {self.loss!r}: expected 'verbalizer' or 'vocab'")
        for value in (self.lr, self.eps):
            if value is not None and not value > 0:
                raise InputError(f"--lr / --eps {value:g}: must be positive")
        if self.block is not None:
            if len(self.block) != 2 or self.block[0] > self.block[1]:
                raise InputError(f"--block {self.block}: expected FIRST-LAST with FIRST <= LAST")
        if any(not isinstance(t, int) or t < 1 for t in self.length_buckets):
            raise InputError(f"length buckets {self.length_buckets}: each must be a positive integer")

    def lora(self, num_layers: int) -> LoraFaConfig:
        """The adapter these settings describe, for a model of ``num_layers`` layers."""
        return LoraFaConfig(rank=self.rank, alpha=self.alpha, target_modules=tuple(self.target_modules),
                            layers=parse_layers(self.layers, num_layers), seed=self.seed)

    def suggested_eps(self) -> float:
        """The perturbation scale the program suggests: ``eps``, else its weights' default."""
        return self.eps if self.eps is not None else DEFAULT_EPS[self.base_weights]

    def suggested_lr(self) -> float:
        """The learning rate the program suggests: ``lr``, else its weights' default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.base_weights]

    def suggested_batches(self) -> str:
        """The batch order the program suggests: ``batches``, else its weights' default."""
        return self.batches if self.batches is not None else DEFAULT_BATCHES[self.base_weights]

    def prge(self) -> PrgeConfig:
        return PrgeConfig(q=self.q, batch_size=self.batch_size, seq_len=self.seq_len, loss=self.loss,
                          prefix_sharing=self.prefix_sharing)

    def buckets(self) -> tuple[int, ...]:
        """The length buckets that apply: shorter than seq_len, ascending."""
        return tuple(sorted({t for t in self.length_buckets if 1 <= t < self.seq_len}))


def parse_block(text: str) -> tuple[int, int]:
    """``"22-24"`` (or ``"29"``) -> (22, 24): a block's first and last layer.

    Raises:
        InputError: anything else.
    """
    parts = text.strip().split("-")
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        first = last = None
    if first is None or last is None or first < 0 or first > last:
        raise InputError(f"--block {text!r}: expected FIRST-LAST trainable layers, e.g. 22-25")
    return first, last


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """``"22-24,25-27,28-29"`` -> [(22, 24), (25, 27), (28, 29)]: a plan's blocks."""
    blocks = [parse_block(part) for part in text.split(",") if part.strip()]
    if not blocks:
        raise InputError(f"--blocks {text!r}: expected ranges like 22-24,25-27")
    return blocks


@dataclass
class ExportResult:
    """One exported program: where its manifest is, and what was written beside it."""

    manifest_path: Path
    manifest: Manifest
    from_cache: bool  # every method was found lowered in the cache
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)  # role ("weights", "data", "lora_a") -> path
    method_files: dict[str, Path] = field(default_factory=dict)  # method -> its .pte


@dataclass
class PlanExport:
    """Every program of a plan: one block program per block, and the job's eval program."""

    blocks: dict[str, ExportResult]  # block name ("L22-24") -> its program, shallowest block first
    eval: ExportResult
    job_key: str
    seconds: float
    lowered: int  # units lowered by this call
    cached: int  # units found in the cache
    workers: int  # processes that lowered them side by side (1: this process; 0: nothing to lower)


@dataclass(frozen=True)
class _ProgramSpec:
    """One program of an export call: its file stem, block and methods (buckets included)."""

    name: str
    block: BlockSpan
    methods: tuple[str, ...]


# -- the calls -------------------------------------------------------------------------


def export_program(cfg: ExportConfig, out: Path, cache_dir: Path | None = None,
                   on_progress: Callback | None = None, loaded=None, workers: int | None = None) -> ExportResult:
    """Export one P-RGE program with its manifest, weights, data and A's beside ``out``.

    Args:
        cfg: what to export; ``cfg.block`` None trains every layer of the job.
        out: names the program: ``dir/NAME.pte`` writes ``dir/NAME.manifest.json`` and the files
            it names, beside it.
        cache_dir: cache root (default ``export.models.default_cache_dir()``); lowered
            methods are cached under ``programs/<key>/`` and never lowered twice.
        on_progress: receives ``ExportProgress`` events.
        loaded: an already loaded ``export.models.LoadedModel`` (tests, benchmarks).
        workers: methods lowered at once in worker processes; None: one per core, as memory allows.

    Returns:
        Paths and the manifest.

    Raises:
        InputError: bad settings, a block that is not a range of the job's layers.
    """
    out = Path(out)
    if out.suffix != ".pte":
        raise InputError(f"--out {out}: the program file must end in .pte")
    cfg.check()
    _check_workers(workers)
    stem = out.name[:-len(".pte")]
    job = _prepare(cfg, cache_dir, on_progress, loaded, methods=len(_with_buckets(cfg, cfg.methods)))
    block = job.span(cfg.block)
    methods = _with_buckets(cfg, cfg.methods)
    results, _ = _export(job, [_ProgramSpec(stem, block, methods)], out.parent, side_stem=stem, workers=workers)
    job.tracker.finish(f"Wrote {results[stem].manifest_path} in {job.elapsed():.1f} s")
    return results[stem]


def export_plan(cfg: ExportConfig, blocks: Sequence[tuple[int, int]], out_dir: Path, cache_dir: Path | None = None,
                on_progress: Callback | None = None, loaded=None, workers: int | None = None) -> PlanExport:
    """Export everything a plan needs: a block program per block, and the job's eval program.

    The programs share one weights file, one data file, one A file, the calibration,
    and every lowered method that does not depend on the block.

    Args:
        cfg: the job (``cfg.block`` is ignored; ``cfg.methods``' step methods go to
            every block program, default ``step``).
        blocks: (first_layer, last_layer) per block; together they must cover the job's
            trainable layers exactly once.
        out_dir: where every file goes: ``block-<L..>.manifest.json`` per block and
            ``eval.manifest.json``.
        cache_dir, on_progress, loaded, workers: as for :func:`export_program`.

    Raises:
        InputError: bad settings, or blocks that overlap, leave a layer out or name one
            outside the job.
    """
    cfg.check()
    _check_workers(workers)
    if not blocks:
        raise InputError("a plan needs at least one block")
    step_methods = tuple(m for m in cfg.methods if m in STEP_METHODS) or ("step",)
    job = _prepare(cfg, cache_dir, on_progress, loaded,
                   methods=len(blocks) * len(_with_buckets(cfg, step_methods)) + len(_with_buckets(cfg, ("eval",))))
    spans = spans_for(job.adapter.layout, blocks)
    specs = [_ProgramSpec(f"block-{span.name}", span, _with_buckets(cfg, step_methods)) for span in spans]
    specs.append(_ProgramSpec("eval", whole_span(job.adapter.layout), _with_buckets(cfg, ("eval",))))
    results, (lowered, cached, used) = _export(job, specs, Path(out_dir), side_stem=f"job-{job.job_key[:12]}",
                                              workers=workers)
    eval_result = results.pop("eval")
    job.tracker.finish(f"Wrote {len(specs)} programs to {out_dir} in {job.elapsed():.1f} s")
    return PlanExport(blocks={spec.block.name: results[spec.name] for spec in specs[:-1]}, eval=eval_result,
                      job_key=job.job_key, seconds=job.elapsed(), lowered=lowered, cached=cached, workers=used)


def _check_workers(workers: int | None) -> None:
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise InputError(f"--workers {workers!r}: expected 1 or more (or none: one per core, as memory allows)")


def _with_buckets(cfg: ExportConfig, methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` and their length-bucket variants, in the order the manifest lists them."""
    return tuple(methods) + tuple(bucket_method(t, m) for m in BUCKETED_METHODS if m in methods
                                  for t in cfg.buckets())


# -- what every program of one export shares ------------------------------------------------


@dataclass
class _Job:
    """What an export call prepares once for all its programs."""

    cfg: ExportConfig
    tracker: ProgressTracker
    cache: ProgramCache
    loaded: Any  # export.models.LoadedModel
    task: Any  # export.tasks.TaskSpec
    verbalizer_ids: list[int]
    splits: dict[str, Any]  # name -> shared.task_data.Split
    lora: LoraFaConfig
    adapter: AdapterTensors  # the A's the PEFT adapter gets (the fp32 model's)
    fingerprint: str  # of the fp32 model
    weights_id: str  # fp32, or int8 with its recipe (export.int8.base_weights_id)
    class_bias: list[float]
    job_key: str
    common: dict[str, Any]  # what every lowered graph of the job depends on (unit keys)
    started: float
    _recipe: ProgramRecipe | None = None  # how to build the job's programs, made when first needed

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def span(self, block: tuple[int, int] | None) -> BlockSpan:
        return whole_span(self.adapter.layout) if block is None else block_span(self.adapter.layout, *block)

    def recipe(self) -> ProgramRecipe:
        """How every program of the job is built (int8: with the smoothing ranges, measured once here)."""
        if self._recipe is None:
            cfg = self.cfg
            self._recipe = ProgramRecipe(key=self.fingerprint + ":" + self.weights_id, model=self.loaded.model,
                                         adapter=self.adapter, prge=cfg.prge(), verbalizer_ids=self.verbalizer_ids,
                                         class_bias=list(self.class_bias), int8=cfg.base_weights == "int8",
                                         int8_smoothing=cfg.int8_smoothing)
            if self._recipe.int8:
                self.tracker.begin("quantise", "measuring the activation ranges the int8 weights are smoothed by")
                self._recipe.int8_ranges = smoothing_ranges(self.loaded.model, self.splits["train"],
                                                            cfg.int8_smoothing, cfg.smoothing_examples,
                                                            note=lambda m: self.tracker.note("quantise", m))
                self.tracker.end("quantise", "measured the activation ranges")
        self._recipe.class_bias = list(self.class_bias)
        return self._recipe

    def program(self) -> PrgeProgram:
        """The job's program over every layer, in this process (int8: quantised on first use)."""
        return recipe_program(self.recipe())


def _prepare(cfg: ExportConfig, cache_dir: Path | None, on_progress: Callback | None, loaded, methods: int) -> _Job:
    """Load, tokenise and calibrate: the stages every program of the job shares.

    ``methods``: how many methods the call may lower (the progress estimate until the cache is read).
    """
    from export.models import default_cache_dir, load_model
    from shared.tasks import encode_split, load_examples, load_task_spec, verbalizer_token_ids

    started = time.perf_counter()
    tracker = ProgressTracker(on_progress)
    tracker.expect_methods(methods)
    cache_root = Path(cache_dir or default_cache_dir())
    if loaded is None:
        tracker.begin("load", f"loading model {cfg.model}")
        loaded = load_model(cfg.model, cache_dir=cache_dir, progress=lambda m: tracker.note("load", m))
        tracker.end("load", f"loaded {loaded.model_id}")
    else:
        tracker.skip("load", f"model {loaded.model_id} given")
    model, tokenizer = loaded.model, loaded.tokenizer
    task = load_task_spec(cfg.task)
    verbalizer_ids = verbalizer_token_ids(task, tokenizer)
    lora = cfg.lora(model.config.num_hidden_layers)
    adapter = AdapterTensors.build(model, lora)
    whole_span(adapter.layout)  # a job has at least one trainable layer

    # The task, tokenised once here: the device side has numpy, not a tokenizer.
    tracker.begin("tokenise", f"tokenising task {task.name}")
    examples = load_examples(task)
    splits = {name: encode_split(rows, task, tokenizer, cfg.seq_len) for name, rows in examples.items()}
    tracker.end("tokenise", f"tokenised {', '.join(f'{len(s)} {n}' for n, s in splits.items())}")

    fingerprint = model_fingerprint(model)  # of the fp32 model: the keys add base_weights
    weights_id = base_weights_id(cfg.base_weights, cfg.int8_smoothing, cfg.smoothing_examples)
    job = _Job(cfg=cfg, tracker=tracker, cache=ProgramCache(cache_root), loaded=loaded, task=task,
               verbalizer_ids=verbalizer_ids, splits=splits, lora=lora, adapter=adapter, fingerprint=fingerprint,
               weights_id=weights_id, class_bias=[0.0] * len(verbalizer_ids), job_key="", common={}, started=started)
    if cfg.calibrate == "median":
        train = splits["train"]
        n = min(cfg.calibration_examples, len(train.labels))
        tracker.begin("calibrate", f"calibrating the verbalizer on {n} training prompts")

        def measure() -> list[float]:
            return median_class_bias(job.program(), train, limit=n).tolist()

        job.class_bias, from_cache = cached_class_bias(
            measure, cache_root, [fingerprint, weights_id, cfg.loss, json.dumps(verbalizer_ids)],
            train.input_ids[:n], train.lengths[:n], classes=len(verbalizer_ids))
        tracker.end("calibrate", ("calibration found in the cache: " if from_cache else "class bias ")
                    + ", ".join(f"{label} {bias:+.3f}" for label, bias in zip(task.labels, job.class_bias)))
    else:
        tracker.skip("calibrate", "no calibration")
    if cfg.base_weights != "int8":
        tracker.skip("quantise", "fp32 weights")

    job.common = {
        "format": PROGRAM_FORMAT, "model_id": loaded.model_id, "weights": fingerprint, "base_weights": weights_id,
        "config": model.config.to_json_string(use_diff=False), "lora": asdict(lora), "verbalizer": verbalizer_ids,
        "class_bias": job.class_bias, "loss": cfg.loss, "external_weights": cfg.external_weights, **toolchain(),
    }
    # Equal for every program of one job, whatever its block or methods: a coordinator
    # refuses a manifest from another job by it.
    job.job_key = digest({**job.common, "external_weights": None, "task": task.name, "q": cfg.q,
                          "batch_size": cfg.batch_size, "seq_len": cfg.seq_len})
    return job


def _method_settings(job: _Job, block: BlockSpan, method: str) -> dict[str, Any]:
    """What one method's graph depends on beyond the job: its shapes, and its block if it perturbs one."""
    cfg = job.cfg
    base = base_method(method)
    seq_len = int(method.rpartition("_t")[2]) if base != method else cfg.seq_len
    if base == "eval":
        return {"method": base, "seq_len": seq_len, "batch_size": cfg.eval_batch_size}
    settings = {"method": base, "seq_len": seq_len, "batch_size": cfg.batch_size}
    if base in STEP_METHODS:
        settings |= {"q": cfg.q, "prefix_sharing": cfg.prefix_sharing,
                     "block": [block.first_layer, block.last_layer]}
    return settings


def _units(job: _Job, spec: _ProgramSpec) -> list[tuple[str, tuple[str, ...]]]:
    """(unit key, methods) for the units of one program: a unit per method, or all in one."""
    groups = [(m,) for m in spec.methods] if job.cfg.external_weights else [spec.methods]
    return [(unit_key(job.common, {m: _method_settings(job, spec.block, m) for m in group}), group)
            for group in groups]


def _export(job: _Job, specs: list[_ProgramSpec], out_dir: Path, side_stem: str,
            workers: int | None) -> tuple[dict[str, ExportResult], tuple[int, int, int]]:
    """Lower what the cache lacks, then write every program's files into ``out_dir``.

    Returns:
        The programs by name, and (units lowered, units found in the cache, workers used).
    """
    tracker, cfg = job.tracker, job.cfg
    units_of = {spec.name: _units(job, spec) for spec in specs}
    wanted: dict[str, tuple[_ProgramSpec, tuple[str, ...]]] = {}  # key -> (first program wanting it, methods)
    for spec in specs:
        for key, methods in units_of[spec.name]:
            wanted.setdefault(key, (spec, methods))
    found = {key: job.cache.find(key) for key in wanted}
    missing = [key for key, unit in found.items() if unit is None]
    n_workers = min(default_workers(len(missing)) if workers is None else workers, len(missing))
    tracker.plan_methods(sum(len(wanted[key][1]) for key in missing), parallel=max(1, n_workers))
    if missing:
        jobs = [UnitJob(key=key, program=_program_label(wanted[key][0]), recipe=job.recipe(),
                        block=(wanted[key][0].block.first_layer, wanted[key][0].block.last_layer),
                        methods=wanted[key][1], eval_batch_size=cfg.eval_batch_size, length_buckets=cfg.buckets(),
                        external_weights=cfg.external_weights) for key in missing]
        found.update(lower_units(jobs, job.cache, tracker, workers=n_workers))
    release_bases()
    weights = {unit.weights_sha256 for unit in found.values()}
    if len(weights) > 1:
        raise RuntimeError(f"the lowered methods disagree on the frozen weights ({len(weights)} different files); "
                           f"clear {job.cache.root / 'programs'} and export again")

    tracker.begin("write", f"writing {len(specs)} program(s) to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = _write_shared_files(job, found, out_dir, side_stem, with_lora_a=any(_has_eval(s) for s in specs))
    results = {}
    for spec in specs:
        units = [found[key] for key, _ in units_of[spec.name]]
        results[spec.name] = _write_program(job, spec, units, out_dir, shared,
                                            from_cache=all(key not in missing for key, _ in units_of[spec.name]))
    tracker.end("write", f"wrote {', '.join(r.manifest_path.name for r in results.values())}")
    return results, (len(missing), len(wanted) - len(missing), n_workers)


def _has_eval(spec: _ProgramSpec) -> bool:
    return any(base_method(m) == "eval" for m in spec.methods)


def _program_label(spec: _ProgramSpec) -> str:
    return spec.name.removeprefix("block-")


def _write_shared_files(job: _Job, units: dict, out_dir: Path, side_stem: str, with_lora_a: bool) -> dict[str, Path]:
    """The weights, data and A's files every program of the call reads; role -> path."""
    files: dict[str, Path] = {}
    unit = next(iter(units.values()))
    if unit.weights is not None:
        files["weights"] = out_dir / f"weights-{unit.weights_sha256[:12]}.ptd"
        if not files["weights"].exists() or files["weights"].stat().st_size != unit.weights.stat().st_size:
            place_file(unit.weights, files["weights"])
    files["data"] = out_dir / f"{side_stem}.data.npz"
    save_splits(files["data"], {name: (s.input_ids, s.lengths, s.labels) for name, s in job.splits.items()})
    if with_lora_a:
        files["lora_a"] = out_dir / f"{side_stem}.lora_a.npz"
        with open(files["lora_a"], "wb") as f:
            np.savez(f, **{path: a.numpy() for path, a in job.adapter.a_by_path.items()})
    return files


def _write_program(job: _Job, spec: _ProgramSpec, units: list, out_dir: Path, shared: dict[str, Path],
                   from_cache: bool) -> ExportResult:
    cfg, task, lora = job.cfg, job.task, job.lora
    method_files: dict[str, Path] = {}
    for unit in units:
        name = f"{spec.name}.pte" if len(units) == 1 and len(unit.methods) > 1 else f"{spec.name}.{unit.methods[0]}.pte"
        shutil.copyfile(unit.program, out_dir / name)
        for method in unit.methods:
            method_files[method] = out_dir / name
    files = {role: path for role, path in shared.items() if role != "lora_a" or _has_eval(spec)}
    sha256 = {path.name: sha256_file(path) for path in {*files.values(), *method_files.values()}
              if path.suffix != ".ptd"}
    if "weights" in files:  # named by its content: the cache verified it when it stored the file
        sha256[files["weights"].name] = units[0].weights_sha256
    manifest = Manifest(
        model_id=job.loaded.model_id, task=task.name, num_layers=job.loaded.model.config.num_hidden_layers,
        trainable_layers=list(lora.layers), target_modules=list(lora.target_modules),
        rank=cfg.rank, alpha=cfg.alpha, q=cfg.q, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        seq_len=cfg.seq_len, labels=list(task.labels), verbalizer_token_ids=list(job.verbalizer_ids),
        class_bias=list(job.class_bias), loss=cfg.loss, prefix_sharing=cfg.prefix_sharing,
        b_size=job.adapter.b_size, b_layout=job.adapter.layout, methods=list(spec.methods),
        step_buckets=_bucket_map(cfg, spec.methods, "step"), eval_buckets=_bucket_map(cfg, spec.methods, "eval"),
        lr=cfg.suggested_lr(), eps=cfg.suggested_eps(), batches=cfg.suggested_batches(),
        files={role: path.name for role, path in files.items()},
        method_files={method: path.name for method, path in method_files.items()},
        sha256=sha256, peft_config=_peft_config_dict(lora, job.loaded.model_id),
        export_seconds=round(job.elapsed(), 2), cache_key=digest(sorted(unit.key for unit in units)),
        base_weights=cfg.base_weights, block=spec.block.to_dict(), job_key=job.job_key,
    )
    manifest_path = out_dir / f"{spec.name}.manifest.json"
    manifest.save(manifest_path)
    return ExportResult(manifest_path=manifest_path, manifest=manifest, from_cache=from_cache,
                        seconds=job.elapsed(), files=files, method_files=method_files)


def _bucket_map(cfg: ExportConfig, methods: Sequence[str], method: str) -> dict[str, str]:
    """Sequence length (a JSON key) -> the ``method`` variant for it; empty without ``method``."""
    if method not in methods:
        return {}
    return {str(t): bucket_method(t, method) for t in cfg.buckets()} | {str(cfg.seq_len): method}


def _peft_config_dict(lora_cfg: LoraFaConfig, model_id: str) -> dict:
    """adapter_config.json content, as PEFT's save_pretrained writes it."""
    config = peft_config(lora_cfg)
    config.base_model_name_or_path = model_id
    data = config.to_dict()
    return json.loads(json.dumps(data, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))
