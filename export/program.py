"""Build, cache and write P-RGE training programs (ExecuTorch `.pte`).

Pure stages, numbered in the code: `method_modules` wraps a `PrgeProgram` into one
module per method (1 wrap; a `step_t<T>` per length bucket), and `build_program`
turns them into an `ExecutorchProgramManager` (2 export → 3 tag weights → 4 lower
→ 5 emit).
`export_program` is the whole job behind `deftly export`: load the model and
the task, build (or take from the cache) the program, and write the files a
device needs beside each other:

    <name>.pte               the methods (graph + small constants: A's, head rows, rope)
    <name>.manifest.json     what the program computes and how to call it (shared.manifest)
    weights-<sha12>.ptd      the frozen base weights, named by content: a device that
                             holds them never receives them again, whatever the plan
    <name>.data.npz          the task, tokenised (train / validation / test)
    <name>.lora_a.npz        the frozen A's, to write the PEFT adapter at the end

The frozen base weights are tagged external in both worlds: XNNPACK-delegated
linears put theirs in the named data store by content hash, and non-delegated
constants (the embedding table) go through `external_constants`; both land in
one `.ptd`, so a new block set ships only the small `.pte`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from export.calibration import median_class_bias
from export.lora import AdapterTensors, LoraFaConfig, parse_layers, peft_config
from export.prge import PrgeConfig, PrgeEval, PrgeLoss, PrgeProgram, PrgeStep, PrgeStepInGraphNoise, example_inputs
from export.smoothing import input_ranges, scale_lora_a, smooth_
from shared.errors import InputError
from shared.files import write_bytes_atomic
from shared.hashing import sha256_file
from shared.manifest import BATCH_ORDERS, Manifest
from shared.task_data import save_splits

PROGRAM_FORMAT = 5  # 5: eval_t<T> methods. 4: last layer at the answer position only. 3: int8 weights moved to the .ptd. Bump when the program layout changes: invalidates cached exports
CALIBRATION_FORMAT = 1  # bump when median_class_bias changes: invalidates cached calibrations
WEIGHTS_TAG = "weights"
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

# What --weights int8 quantises, in the cache key of int8 programs only: change it when the
# recipe changes, so int8 programs are lowered again and fp32 ones stay cached.
INT8_RECIPE = "decoder-linears-qd8-per-channel+embedding-int8-rows+smoothquant"
DELEGATES = ("xnnpack", "portable")
METHODS = {"step": PrgeStep, "step_rng": PrgeStepInGraphNoise, "eval": PrgeEval, "loss": PrgeLoss}


@dataclass(frozen=True)
class ExportConfig:
    """Everything `deftly export` decides; one flat record, defaults commented."""

    model: str = "smollm2"  # "smollm2" (embedded), a local HF directory, or a hub id
    task: str = "rotten_tomatoes"  # embedded task name or a TOML task file
    layers: str = "top:8"  # all | top:K | a-b | a,b,c
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
    # "xnnpack": the linears, bmm, softmax and elementwise ops go to the XNNPACK delegate;
    # "portable": no delegate, every operator on ExecuTorch's portable kernels (slow), for a
    # runtime where XNNPACK cannot start, e.g. an emulated CPU whose cpuinfo it cannot read.
    delegate: str = "xnnpack"
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


@dataclass
class ExportResult:
    manifest_path: Path
    manifest: Manifest
    from_cache: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


# -- the pure part -----------------------------------------------------------------


def _is_base_weight(name: str) -> bool:
    """Frozen base-model weights (shared by every program of a model) vs program constants."""
    return any(part in name for part in ("embed_tokens", "layers", "norm")) and "lora_a" not in name \
        and "mean_row" not in name


def _has_tensor_subclass_weights(module: torch.nn.Module) -> bool:
    """Whether any weight is a tensor subclass (torchao's quantised weights are)."""
    return any(type(t) not in (torch.Tensor, torch.nn.Parameter)
               for t in (*module.parameters(), *module.buffers()))


def bucket_method(seq_len: int, method: str = "step") -> str:
    """Name of the ``step`` (or ``eval``) method for a shorter length bucket."""
    return f"{method}_t{seq_len}"


BUCKETED_METHODS = ("step", "eval")  # the methods that get a variant per length bucket


def method_modules(program: PrgeProgram, methods: tuple[str, ...], eval_batch_size: int,
                   length_buckets: tuple[int, ...] = ()) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """Stage 1 (wrap): one module per method with its example inputs, all sharing the weights.

    Args:
        program: the module holding the forward with copies, at the full sequence length.
        methods: names from METHODS.
        eval_batch_size: batch size of the ``eval`` method.
        length_buckets: shorter sequence lengths that get a ``step_t<T>`` and an
            ``eval_t<T>`` method of their own (for each of ``step`` and ``eval`` in
            ``methods``), so a batch of short reviews does not pay for padding to the longest.

    Returns:
        method name -> (module, example inputs).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InputError(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    cfg = program.cfg
    vocab = program.embed_tokens.num_embeddings
    inputs = example_inputs(cfg, program.b_size, vocab)
    inputs["eval"] = example_inputs(replace(cfg, batch_size=eval_batch_size), program.b_size, vocab)["eval"]
    modules = {name: (METHODS[name](program), inputs[name]) for name in methods}
    for seq_len in length_buckets:
        # Same weights (shared module references), its own rotary tables and mask.
        short = PrgeProgram.like(program, replace(cfg, seq_len=seq_len))
        if "step" in methods:
            modules[bucket_method(seq_len)] = (PrgeStep(short), example_inputs(short.cfg, short.b_size, vocab)["step"])
        if "eval" in methods:
            eval_cfg = replace(short.cfg, batch_size=eval_batch_size)
            modules[bucket_method(seq_len, "eval")] = (PrgeEval(short),
                                                       example_inputs(eval_cfg, short.b_size, vocab)["eval"])
    return modules


def build_program(methods: dict[str, tuple[torch.nn.Module, tuple]], external_weights: bool = True,
                  progress: Callable[[str], None] = print, delegate: str = "xnnpack"):
    """Lower P-RGE methods to one ExecuTorch program.

    Args:
        methods: method name -> (module, example inputs), from :func:`method_modules`.
        external_weights: tag the frozen base weights for a separate ``.ptd``.
        progress: receives one-line stage messages.
        delegate: "xnnpack", or "portable" (no delegate; see ``ExportConfig.delegate``).

    Returns:
        An ``ExecutorchProgramManager`` (call ``save`` / ``write_tensor_data_to_file``).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    # 2. export each method to an ATen graph.
    exported = {}
    for name, (module, inputs) in methods.items():
        with _Ticker(progress, f"exporting method {name}"):
            ep = torch.export.export(module, inputs, strict=False)
            if external_weights:
                # 3. tag the frozen weights on the unlifted graph, then re-export, so that
                #    XNNPACK writes them to the named data store under an external tag.
                if _has_tensor_subclass_weights(module):
                    # int8 weights are torchao tensor subclasses; lowering would flatten each
                    # into new (data, scale, zero point) parameters that carry no tag and so
                    # land inside the .pte. Flatten first, so the tags go on those.
                    ep = ep.run_decompositions({})
                unlifted = ep.module()
                delegate_external_constants_pass_unlifted(
                    unlifted, lambda node: WEIGHTS_TAG if _is_base_weight(str(node.target)) else None)
                ep = torch.export.export(unlifted, inputs, strict=False)
            exported[name] = ep

    # 4. lower: XNNPACK takes the linears, bmm, softmax and elementwise ops.
    partitioner = [XnnpackPartitioner()] if delegate == "xnnpack" else None
    with _Ticker(progress, f"lowering {len(exported)} method(s) to {'XNNPACK' if partitioner else 'portable kernels'}"):
        edge = to_edge_transform_and_lower(exported, partitioner=partitioner,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))

    # 5. emit the ExecuTorch program; non-delegated base weights go external too.
    def external_tag(node: torch.fx.Node) -> str | None:
        return WEIGHTS_TAG if _is_base_weight(node.name) else None

    with _Ticker(progress, "emitting the program"):
        return edge.to_executorch(ExecutorchBackendConfig(
            external_constants=external_tag if external_weights else False))


# -- the job behind `deftly export` -------------------------------------------------


def export_program(cfg: ExportConfig, out: Path, cache_dir: Path | None = None,
                   progress: Callable[[str], None] = print, loaded=None) -> ExportResult:
    """Export one P-RGE program with its manifest, weights, data and A's beside ``out``.

    Args:
        cfg: what to export.
        out: path of the ``.pte`` to write; the other files go beside it.
        cache_dir: cache root (default ``export.models.default_cache_dir()``); lowered
            programs are cached under ``programs/<key>/`` and never lowered twice.
        progress: receives one-line progress messages.
        loaded: an already loaded ``export.models.LoadedModel`` (tests, benchmarks).

    Returns:
        Paths and the manifest.
    """
    from export.models import default_cache_dir, load_model
    from export.tasks import encode_split, load_examples, load_task_spec, verbalizer_token_ids

    start = time.perf_counter()
    if out.suffix != ".pte":
        raise InputError(f"--out {out}: the program file must end in .pte")
    cache_root = (cache_dir or default_cache_dir())
    loaded = loaded or load_model(cfg.model, cache_dir=cache_dir, progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    task = load_task_spec(cfg.task)
    verbalizer_ids = verbalizer_token_ids(task, tokenizer)

    num_layers = model.config.num_hidden_layers
    lora_cfg = cfg.lora(num_layers)
    weights_fingerprint = model_fingerprint(model)  # of the fp32 model: the cache key adds base_weights
    if cfg.base_weights not in ("fp32", "int8"):
        raise InputError(f"--weights {cfg.base_weights!r}: expected fp32 or int8")
    if cfg.batches is not None and cfg.batches not in BATCH_ORDERS:
        raise InputError(f"--batches {cfg.batches!r}: choose from {', '.join(BATCH_ORDERS)}")
    if cfg.delegate not in DELEGATES:
        raise InputError(f"delegate {cfg.delegate!r}: expected one of {', '.join(DELEGATES)}")
    if not 0 <= cfg.int8_smoothing <= 1:
        raise InputError(f"--int8-smoothing {cfg.int8_smoothing:g}: expected a value between 0 and 1")

    # The task, tokenised once here: the device side has numpy, not a tokenizer.
    with _Ticker(progress, f"tokenising task {task.name}"):
        examples = load_examples(task)
        splits = {name: encode_split(rows, task, tokenizer, cfg.seq_len) for name, rows in examples.items()}

    adapter = AdapterTensors.build(model, lora_cfg)  # its A's are what the PEFT adapter gets
    program_adapter = adapter
    if cfg.base_weights == "int8":
        model, program_adapter = int8_base(model, adapter, splits["train"], cfg, progress)
    program = PrgeProgram(model, program_adapter, cfg.prge(), verbalizer_ids)
    if cfg.calibrate == "median":
        if cfg.loss != "verbalizer":
            raise InputError("--calibrate median needs --loss verbalizer")
        program.class_bias.copy_(torch.tensor(_cached_class_bias(
            program, splits["train"], cfg, weights_fingerprint, verbalizer_ids, cache_root, progress)))
        progress(f"  class bias {dict(zip(task.labels, program.class_bias.tolist()))}")
    elif cfg.calibrate != "none":
        raise InputError(f"--calibrate {cfg.calibrate!r}: expected median or none")

    key = cache_key(cfg, loaded.model_id, model, weights_fingerprint, lora_cfg, verbalizer_ids,
                    program.class_bias.tolist())
    cached = cache_root / "programs" / key
    from_cache = (cached / "program.pte").exists() and (cached / "weights.ptd").exists()
    if from_cache:
        progress(f"Program found in the cache ({cached}); not lowering again")
    else:
        progress(f"Exporting {loaded.model_id}, layers {list(lora_cfg.layers)}, q={cfg.q}, bs={cfg.batch_size}, "
                 f"T={cfg.seq_len}, methods {list(cfg.methods)}")
        modules = method_modules(program, cfg.methods, cfg.eval_batch_size, _buckets(cfg))
        et_program = build_program(modules, cfg.external_weights, progress, cfg.delegate)
        _write_cache_entry(et_program, cached, cfg.external_weights)

    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name[:-len(".pte")]
    files: dict[str, Path] = {"program": out}
    shutil.copyfile(cached / "program.pte", out)
    if (cached / "weights.ptd").exists():
        weights_hash = (cached / "weights.sha256").read_text().strip()
        weights_path = out.parent / f"weights-{weights_hash[:12]}.ptd"
        if not weights_path.exists():
            shutil.copyfile(cached / "weights.ptd", weights_path)
        files["weights"] = weights_path
    files["data"] = out.parent / f"{stem}.data.npz"
    save_splits(files["data"], {name: (s.input_ids, s.lengths, s.labels) for name, s in splits.items()})
    files["lora_a"] = out.parent / f"{stem}.lora_a.npz"
    with open(files["lora_a"], "wb") as f:
        np.savez(f, **{path: a.numpy() for path, a in adapter.a_by_path.items()})

    manifest = Manifest(
        model_id=loaded.model_id, task=task.name, num_layers=num_layers,
        trainable_layers=list(lora_cfg.layers), target_modules=list(lora_cfg.target_modules),
        rank=cfg.rank, alpha=cfg.alpha, q=cfg.q, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        seq_len=cfg.seq_len, labels=list(task.labels), verbalizer_token_ids=list(verbalizer_ids),
        class_bias=program.class_bias.tolist(), loss=cfg.loss,
        prefix_sharing=cfg.prefix_sharing, b_size=adapter.b_size, b_layout=adapter.layout,
        methods=list(cfg.methods) + [bucket_method(t, m) for m in BUCKETED_METHODS if m in cfg.methods
                                     for t in _buckets(cfg)],
        step_buckets=_bucket_map(cfg, "step"), eval_buckets=_bucket_map(cfg, "eval"),
        lr=cfg.suggested_lr(), eps=cfg.suggested_eps(), batches=cfg.suggested_batches(),
        files={role: path.name for role, path in files.items()},
        sha256={path.name: sha256_file(path) for path in files.values()},
        peft_config=_peft_config_dict(lora_cfg, loaded.model_id),
        export_seconds=round(time.perf_counter() - start, 2), cache_key=key, base_weights=cfg.base_weights,
    )
    manifest_path = out.parent / f"{stem}.manifest.json"
    manifest.save(manifest_path)
    seconds = time.perf_counter() - start
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in files.values())
    progress(f"Wrote {manifest_path} ({sizes}) in {seconds:.1f} s")
    return ExportResult(manifest_path=manifest_path, manifest=manifest, from_cache=from_cache,
                        seconds=seconds, files=files)


def _base_weights_id(cfg: ExportConfig) -> str:
    """fp32, or int8 with its recipe: an int8 recipe change makes new logits and new programs."""
    if cfg.base_weights != "int8":
        return cfg.base_weights
    return f"int8:{INT8_RECIPE}:alpha={cfg.int8_smoothing:g}:prompts={cfg.smoothing_examples}"


def _cached_class_bias(program: PrgeProgram, train, cfg: ExportConfig, weights_fingerprint: str,
                       verbalizer_ids: list[int], cache_root: Path, progress: Callable[[str], None]) -> list[float]:
    """The median calibration bias, measured once per model and prompts (~20-30 s for SmolLM2).

    It is measured at b = 0, where no LoRA term contributes, so it depends on the
    base weights, the calibration prompts and the answer tokens only: every block set,
    q and batch size of one model and task shares it. It must be known before the
    program's cache key (the key holds it), so without this cache an export that finds
    its program lowered would still run 256 prompts through the model.
    """
    n = min(cfg.calibration_examples, len(train.labels))
    key_parts = hashlib.sha256()
    for part in (CALIBRATION_FORMAT, weights_fingerprint, _base_weights_id(cfg), cfg.loss,
                 json.dumps(verbalizer_ids), str(train.input_ids[:n].shape)):
        key_parts.update(str(part).encode() + b"\0")
    key_parts.update(np.ascontiguousarray(train.input_ids[:n]).tobytes())
    key_parts.update(np.ascontiguousarray(train.lengths[:n]).tobytes())
    path = cache_root / "calibration" / f"{key_parts.hexdigest()[:24]}.json"
    try:
        bias = json.loads(path.read_text())["class_bias"]
        if isinstance(bias, list) and len(bias) == len(verbalizer_ids):
            progress(f"  calibration found in the cache ({path.name})")
            return [float(v) for v in bias]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: measure it again
    with _Ticker(progress, f"calibrating the verbalizer on {n} training prompts"):
        bias = median_class_bias(program, train, limit=n).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps({"class_bias": bias, "examples": n}).encode())
    return bias


def _buckets(cfg: ExportConfig) -> tuple[int, ...]:
    """The length buckets that apply: shorter than seq_len, only when a method gets variants."""
    if not set(BUCKETED_METHODS) & set(cfg.methods):
        return ()
    return tuple(sorted({t for t in cfg.length_buckets if 1 <= t < cfg.seq_len}))


def _bucket_map(cfg: ExportConfig, method: str) -> dict[str, str]:
    """Sequence length (a JSON key) -> the ``method`` variant for it; empty without ``method``."""
    if method not in cfg.methods:
        return {}
    return {str(t): bucket_method(t, method) for t in _buckets(cfg)} | {str(cfg.seq_len): method}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's fp32 weights: a strided sample of every tensor, so the same
    model always gives the same value, and a fine-tuned copy almost surely not, without
    hashing 500 MB."""
    fingerprint = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        fingerprint.update(name.encode())
        flat = tensor.detach().reshape(-1)
        fingerprint.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return fingerprint.hexdigest()


class Int8RowEmbedding(torch.nn.Module):
    """An embedding table held as int8 rows with one fp32 scale per row.

    ExecuTorch's portable ``embedding`` kernel gathers int8 rows as readily as fp32
    ones, so the lookup stays one gather; the rows are widened and scaled after it,
    on [bs, T, H] values only. A quarter of the fp32 table's bytes (SmolLM2: 28 MB
    instead of 113 MB) on the device, in the shared weights file.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()  # [V, H]
        row_scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # [V, 1]
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight_int8", torch.round(weight / row_scale).clamp(-127, 127).to(torch.int8))  # [V, H]
        self.register_buffer("row_scale", row_scale)  # [V, 1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids, self.weight_int8).to(torch.float32)  # [..., H]
        return rows * torch.nn.functional.embedding(input_ids, self.row_scale)  # [..., H] * [..., 1]


def int8_base(model: torch.nn.Module, adapter: AdapterTensors, train, cfg: ExportConfig,
              progress: Callable[[str], None] = lambda _m: None) -> tuple[torch.nn.Module, AdapterTensors]:
    """The int8 copy of ``model`` an int8 program wraps, and the adapter it holds.

    With ``cfg.int8_smoothing`` > 0, SmoothQuant scales measured on the first
    ``cfg.smoothing_examples`` training prompts are folded in before quantising; the
    smoothed linears then read x / s, so the program's A's become A diag(s) and x Aᵀ
    stays what it was. ``adapter`` (the A's the PEFT adapter gets) is left unchanged.

    Args:
        model: the fp32 model (not changed).
        adapter: the adapter built on it.
        train: the tokenised training split (``shared.task_data.Split``).
        cfg: the export settings.
        progress: receives one-line stage messages.

    Returns:
        The int8 model and the program's adapter.
    """
    ranges = None
    n = min(cfg.smoothing_examples, len(train.labels))
    if cfg.int8_smoothing > 0 and n == 0:
        progress("  no training prompts to measure activation ranges on: int8 without smoothing")
    elif cfg.int8_smoothing > 0:
        with _Ticker(progress, f"measuring activation ranges on {n} training prompts (SmoothQuant)"):
            ranges = input_ranges(model, train.input_ids[:n], train.lengths[:n])
    with _Ticker(progress, "quantising the frozen decoder linears and the embedding to int8"):
        quantized, scales = quantize_base_weights(model, ranges, cfg.int8_smoothing,
                                                  trained=frozenset((s.layer, s.module) for s in adapter.layout))
    return quantized, scale_lora_a(adapter, scales)


def quantize_base_weights(model: torch.nn.Module, ranges: dict | None = None, alpha: float = 0.5,
                          trained: frozenset[tuple[int, str]] = frozenset()
                          ) -> tuple[torch.nn.Module, dict[tuple[int, str], torch.Tensor]]:
    """A copy of ``model`` whose frozen weights are int8: decoder linears and the embedding.

    Linears (torchao): per-output-channel symmetric int8 weights with dynamic per-token
    int8 activations, the pattern XNNPACK's partitioner takes as one quantised GEMM;
    with ``ranges``, SmoothQuant scales are folded in first (export.smoothing).
    The embedding: :class:`Int8RowEmbedding`. The head stays fp32: the verbalizer loss
    keeps only its answer words' rows (SmolLM2 ties it to the embedding; the fp32
    original stays as the head's weight, the copy's input embedding becomes int8).
    The copy keeps the caller's model (benchmarks reuse it) in fp32.

    Args:
        model: the fp32 model.
        ranges: activation ranges from ``export.smoothing.input_ranges``; None: no smoothing.
        alpha: SmoothQuant's migration strength.
        trained: (layer, module) pairs with a LoRA-FA adapter.

    Returns:
        The int8 copy, and the smoothing scales (empty without ``ranges``) that the
        program's A's must take (``export.smoothing.scale_lora_a``).
    """
    import copy

    quantized = copy.deepcopy(model)
    scales = smooth_(quantized, ranges, alpha, trained) if ranges is not None and alpha > 0 else {}
    quantize_linears_int8(quantized, lambda fqn: ".layers." in f".{fqn}")
    quantized.model.embed_tokens = Int8RowEmbedding(quantized.model.embed_tokens.weight)
    return quantized, scales


def quantize_linears_int8(module: torch.nn.Module, include: Callable[[str], bool] = lambda fqn: True) -> None:
    """Make ``module``'s linears (those whose name ``include`` accepts) int8, in place.

    Per-output-channel symmetric int8 weights with dynamic per-token int8 activations
    (torchao), the pattern XNNPACK's partitioner lowers to one quantised GEMM.
    """
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    quantize_(module, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
              filter_fn=lambda child, fqn: isinstance(child, torch.nn.Linear) and include(fqn))


def cache_key(cfg: ExportConfig, model_id: str, model: torch.nn.Module, weights_fingerprint: str,
              lora_cfg: LoraFaConfig, verbalizer_ids: list[int], class_bias: list[float]) -> str:
    """Key of a lowered program: the model's content, its layers, shapes and settings, the toolchain."""
    import executorch

    settings = {
        "format": PROGRAM_FORMAT, "model_id": model_id, "weights": weights_fingerprint,
        "base_weights": _base_weights_id(cfg),
        "config": model.config.to_json_string(use_diff=False),
        "lora": asdict(lora_cfg), "verbalizer": verbalizer_ids, "class_bias": class_bias,
        "prge": asdict(cfg.prge()), "eval_batch_size": cfg.eval_batch_size, "methods": list(cfg.methods),
        "length_buckets": list(_buckets(cfg)),
        "external_weights": cfg.external_weights,
        "torch": torch.__version__, "executorch": getattr(executorch, "__version__", "?"),
    }
    if cfg.delegate != "xnnpack":  # only then: every XNNPACK program already cached keeps its key
        settings["delegate"] = cfg.delegate
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_cache_entry(et_program, target: Path, external_weights: bool) -> None:
    """Write program.pte (+ weights.ptd) into the cache atomically: temp dir, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{time.time_ns()}"
    tmp.mkdir()
    try:
        et_program.save(str(tmp / "program.pte"))
        if external_weights:
            et_program.write_tensor_data_to_file(str(tmp))
            written = sorted(tmp.glob("*.ptd"))
            if len(written) != 1:
                raise RuntimeError(f"expected one weights file, the exporter wrote {[p.name for p in written]}")
            written[0].rename(tmp / "weights.ptd")
            (tmp / "weights.sha256").write_text(sha256_file(tmp / "weights.ptd"))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _peft_config_dict(lora_cfg: LoraFaConfig, model_id: str) -> dict:
    """adapter_config.json content, as PEFT's save_pretrained writes it."""
    config = peft_config(lora_cfg)
    config.base_model_name_or_path = model_id
    data = config.to_dict()
    return json.loads(json.dumps(data, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


class _Ticker:
    """Prints a stage's start, a line every `every` seconds while it runs, and its duration."""

    def __init__(self, progress: Callable[[str], None], what: str, every: float = 15.0) -> None:
        self.progress, self.what, self.every = progress, what, every
        self._done = threading.Event()

    def __enter__(self) -> "_Ticker":
        self.start = time.perf_counter()
        self.progress(f"  {self.what} ...")
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._done.wait(self.every):
            self.progress(f"  {self.what} ... {time.perf_counter() - self.start:.0f} s")

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        if exc[0] is None:
            self.progress(f"  {self.what}: done in {time.perf_counter() - self.start:.1f} s")
