"""Build, cache and write the probe program that measures a device (shared/probe.py).

The probe times what the planner's cost model adds up (`shared/costmodel.py`):
τ(l, bs) and τ(l, 2q·bs) of a decoder layer, the last layer at the answer
position, and the per-step head; each layer method also as a chain of the layer run k times in one
call (``layer_bs_x4``, `shared.probe.CHAINS`), whose slope is a layer's cost without what a call
costs beyond its work (which a program pays once a step, the probe once a call); the layer methods
at the full T and at each of the job's shorter length buckets (``layer_wide_t32``), as the programs run.  Its methods run the same code as the P-RGE
programs (`export.prge.PrgeProgram`'s layer, last-layer and norm functions), on
one layer of the job's model with the job's LoRA-FA shapes, so the cost of a
layer in a program is what the probe measured, and the probe is one layer's
weights, not the model's (SmolLM2 fp32: ~14 MB; int8: ~4 MB).

Stages, as in `export.program`: 1 wrap (`probe_modules`: one module per method
over a one-layer stand-in of the model) → 2-4 export and tag, lower, emit
(`export.lowering.lower_unit`, the programs' own pipeline) → cached like a
program's unit (`export.cache.ProgramCache`, under the probe's own key).
Lowering is single-threaded Python and its time goes with the layer copies
(the chains are most of them: the default job's probe lowers 28), so the methods
are split into units of about equal work (`split_units`), one per core, lowered
side by side in worker processes (`export.lowering.lower_units`), one ``.pte``
each; every unit reads the same layer, so one ``.ptd`` serves them all.
`export_probe` writes beside each other:

    probe.pte, probe-2.pte, ...      the methods (the head's unit first)
    weights-<sha12>.ptd              the layer's weights
    probe.probe.json                 the manifest (`shared.probe.ProbeManifest`:
                                     which file holds which method)

int8 probes quantise the layer's linears exactly as int8 programs quantise
decoder linears (`export.program.quantize_linears_int8`), without SmoothQuant's
scales: those change the values the GEMMs read, not their cost.
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

from export.cache import ProgramCache, digest, model_fingerprint, place_file, toolchain, weights_entries
from export.int8 import quantize_linears_int8
from export.lora import AdapterTensors, LoraFaConfig
from export.lowering import DEFAULT_DELEGATE, default_workers, lower_units
from export.prge import PrgeProgram, _LayerB
from export.program import ExportConfig
from export.progress import Callback, ProgressTracker
from shared.errors import InputError
from shared.hashing import sha256_file
from shared.probe import (CHAINS, PROBE_FORMAT, PROBE_SUFFIX, ProbeManifest, chain_method, length_method, program_role,
                          split_method)

PROBED = 0  # the stand-in's only layer


class _OneLayerModel(nn.Module):
    """What `PrgeProgram` reads of a Llama, with one decoder layer: a copy of layer ``index``.

    The embedding is a one-row stand-in (the probe never embeds); the head's rows
    are copied from the real head by `PrgeProgram` (verbalizer rows only).
    """

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.config = copy.deepcopy(model.config)
        self.config.num_hidden_layers = 1
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(1, model.config.hidden_size)
        self.model.layers = nn.ModuleList([copy.deepcopy(model.model.layers[index])])
        self.model.norm = model.model.norm
        self.model.rotary_emb = model.model.rotary_emb
        self._head = (model.get_output_embeddings(),)  # a tuple: not a submodule, not copied

    def get_output_embeddings(self) -> nn.Module:
        return self._head[0]


class _Layer(nn.Module):
    """``layer_*``: one job layer on [n, T, H] rows with c copies of its B [c, P_l], run ``calls`` times.

    ``layer_bs_x4`` runs it four times (the same weights and B), as a program runs its
    layers back to back: the slope between two chains is a layer's cost in a program
    (`shared.probe.layer_cost_s`).
    """

    def __init__(self, program: PrgeProgram, calls: int = 1) -> None:
        super().__init__()
        self.program, self.calls = program, calls

    def forward(self, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            h = self.program._decoder_layer(h, PROBED, _LayerB(b, 0))  # [n, T, H]
        return h


class _FrozenLayer(nn.Module):
    """``frozen_*``: one layer without LoRA on [n, T, H] rows, run ``calls`` times."""

    def __init__(self, program: PrgeProgram, calls: int = 1) -> None:
        super().__init__()
        self.program, self.calls = program, calls

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            h = self.program._decoder_layer(h, PROBED, None)  # [n, T, H]
        return h


class _LastLayer(nn.Module):
    """``last_wide``: the last layer at each row's answer position: [2q·bs, T, H] -> [2q·bs, H].

    ``b`` [2q, P_l] is read only when the last layer is a job layer (``lora``).
    """

    def __init__(self, program: PrgeProgram, lora: bool) -> None:
        super().__init__()
        self.program, self.lora = program, lora

    def forward(self, h: torch.Tensor, positions: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.program._last_layer_at(h, positions, PROBED, _LayerB(b, 0) if self.lora else None)


class _Head(nn.Module):
    """``head``: what a step does once, after the layers: the ±eps copies of b, the final norm
    and head rows at the answer positions, the loss per copy, g and the update (as
    `PrgeProgram.step` and `copy_losses` do)."""

    def __init__(self, program: PrgeProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, h_answer, labels, b, z, lr, eps):
        program, q = self.program, z.shape[0]
        b_copies = torch.cat([b + eps * z, b - eps * z], dim=0)  # [2q, P]
        logits = F.linear(program._rms_norm(h_answer, program.norm.weight), program.head)  # [2q·bs, C]
        logits = logits + program.class_bias
        log_probs = torch.log_softmax(logits, dim=-1)
        picked = torch.gather(log_probs, 1, labels.repeat(2 * q).unsqueeze(1))  # [2q·bs, 1]
        losses = -picked.reshape(2 * q, -1).mean(dim=1)  # [2q]
        g = (losses[:q] - losses[q:]) / (2 * eps)  # [q]
        b_new = b - lr * (g.unsqueeze(1) * z).mean(dim=0)  # [P]
        return b_new, losses.mean().reshape(1), g, b_copies  # b_copies: a program's layers read them


def probe_methods(num_layers: int, job_layers: tuple[int, ...], length_buckets: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The methods a job's layers need: frozen layers only where the model has them.

    Each layer method comes with its chains (``layer_bs_x2``, ``layer_bs_x4``:
    `shared.probe.CHAINS`); the layer methods at the full length, then the single-call
    ones at each shorter bucket (``layer_wide_t32``); the head, which does not depend on T, once.
    """
    first, last = min(job_layers), max(job_layers)
    kinds = ["layer_bs", "layer_wide"]
    if first > 0:
        kinds.append("frozen_bs")
    if last < num_layers - 2:  # frozen layers above the job, below the last layer
        kinds.append("frozen_wide")
    methods = [chain_method(kind, calls) for kind in kinds for calls in dict.fromkeys((1, *CHAINS[kind]))]
    methods.append("last_wide")
    # the chains only at the full length: at a shorter one a layer's cost is scaled by its single
    # calls' ratio (`shared.probe.layer_cost_s`), which keeps the probe's lowering time down (the
    # default job's probe: 24 layer copies to lower at T and 4 at a bucket, not 48)
    at_lengths = [length_method(m, t) for t in length_buckets for m in methods if "_x" not in m]
    return (*methods, *at_lengths, "head")


def probe_modules(model: nn.Module, cfg: ExportConfig, verbalizer_ids: list[int]
                  ) -> tuple[dict[str, tuple[nn.Module, tuple]], ProbeManifest]:
    """Stage 1 (wrap): one module per probe method with example inputs, and the manifest's shapes.

    Args:
        model: the job's model (fp32; not changed).
        cfg: the job's export settings (layers, targets, rank, q, bs, T, base weights).
        verbalizer_ids: the task's answer tokens (the head's rows).

    Returns:
        method name -> (module, example inputs); a manifest without files.
    """
    config = model.config
    num_layers = config.num_hidden_layers
    lora_cfg = cfg.lora(num_layers)
    job_layers = lora_cfg.layers
    stand_in = _OneLayerModel(model, max(job_layers))
    if cfg.base_weights == "int8":
        quantize_linears_int8(stand_in, lambda fqn: ".layers." in f".{fqn}")
    elif cfg.base_weights != "fp32":
        raise InputError(f"--weights {cfg.base_weights!r}: expected fp32 or int8")
    one_layer = LoraFaConfig(rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
                             layers=(PROBED,), seed=cfg.seed)
    program = PrgeProgram(stand_in, AdapterTensors.build(stand_in, one_layer), cfg.prge(), verbalizer_ids)
    layer_b = program.b_size
    b_size = layer_b * len(job_layers)  # every job layer has the same targets and width
    bs, q, H = cfg.batch_size, cfg.q, config.hidden_size
    wide = 2 * q * bs
    gen = torch.Generator().manual_seed(0)
    last_lora = num_layers - 1 in job_layers

    def copies(count: int) -> torch.Tensor:
        return torch.randn(count, layer_b, generator=gen) * 1e-3

    def layer_methods(at: PrgeProgram, T: int) -> dict[str, tuple[nn.Module, tuple]]:
        """The T-dependent methods at length T (``at``: the program at T: its rotary tables and mask)."""
        def hidden(rows: int) -> torch.Tensor:
            return torch.randn(rows, T, H, generator=gen)  # [rows, T, H]

        positions = torch.randint(T // 2, T, (wide,), generator=gen)  # [2q·bs]
        methods = {"last_wide": (_LastLayer(at, last_lora), (hidden(wide), positions, copies(2 * q)))}
        for kind, rows, lora in (("layer_bs", bs, True), ("layer_wide", wide, True),
                                 ("frozen_bs", bs, False), ("frozen_wide", wide, False)):
            for calls in dict.fromkeys((1, *CHAINS[kind])):
                module = _Layer(at, calls) if lora else _FrozenLayer(at, calls)
                inputs = (hidden(rows), copies(1 if rows == bs else 2 * q)) if lora else (hidden(rows),)
                methods[chain_method(kind, calls)] = (module, inputs)
        return methods

    available = layer_methods(program, cfg.seq_len)  # (chains at shorter lengths are built, never lowered)
    for T in cfg.buckets():  # the same weights (shared module references) at a shorter length
        at = PrgeProgram.like(program, replace(program.cfg, seq_len=T))
        available.update({length_method(name, T): method for name, method in layer_methods(at, T).items()})
    available["head"] = (_Head(program), (torch.randn(wide, H, generator=gen),
                                          torch.randint(0, len(verbalizer_ids), (bs,)),
                                          torch.randn(b_size, generator=gen) * 1e-3,
                                          torch.randn(q, b_size, generator=gen),
                                          torch.tensor([1e-3]), torch.tensor([1e-2])))
    methods = probe_methods(num_layers, job_layers, cfg.buckets())
    manifest = ProbeManifest(
        model_id="", model_fingerprint="", base_weights=cfg.base_weights, num_layers=num_layers, hidden_size=H,
        job_layers=tuple(job_layers), target_modules=tuple(cfg.target_modules), rank=cfg.rank, q=q,
        batch_size=bs, seq_len=cfg.seq_len, layer_b_size=layer_b, b_size=b_size, classes=len(verbalizer_ids),
        methods=methods, length_buckets=cfg.buckets())
    return {name: available[name] for name in methods}, manifest


MAX_UNITS = 4  # more units than this would each pay a worker's start for a few layer copies


def _layer_copies(method: str) -> float:
    """How much lowering ``method`` is, in decoder-layer copies (the head is a fraction of one)."""
    return 0.25 if method == "head" else float(split_method(method)[1])


def split_units(methods: tuple[str, ...], units: int) -> list[tuple[str, ...]]:
    """The probe's methods in ``units`` groups of about equal lowering work, the head's group first.

    Longest first, each to the lightest group so far: a chain of 8 layers lowers
    about as long as 8 single layers (every copy is a graph to convert and partition).
    """
    groups: list[list[str]] = [[] for _ in range(max(1, min(units, len(methods))))]
    load = [0.0] * len(groups)
    for method in sorted(methods, key=_layer_copies, reverse=True):
        lightest = load.index(min(load))
        groups[lightest].append(method)
        load[lightest] += _layer_copies(method)
    groups = [tuple(m for m in methods if m in group) for group in groups if group]  # the manifest's order
    return sorted(groups, key=lambda group: "head" not in group)


@dataclass
class ProbeUnit:
    """One unit of the probe to lower (`export.lowering.lower_units` reads what `UnitJob` has).

    The worker that lowers it rebuilds the probe's modules from the fp32 model (shared with it
    through torch's shared-memory pickling) and keeps its own methods.
    """

    key: str
    methods: tuple[str, ...]
    model: nn.Module
    cfg: ExportConfig
    verbalizer_ids: list[int]
    program: str = "probe"
    external_weights: bool = True
    delegate: str = DEFAULT_DELEGATE

    def modules(self):
        built, _ = probe_modules(self.model, self.cfg, self.verbalizer_ids)
        return {name: built[name] for name in self.methods}


@dataclass
class ProbeResult:
    manifest_path: Path
    manifest: ProbeManifest
    from_cache: bool
    seconds: float


def export_probe(cfg: ExportConfig, out_dir: Path, cache_dir: Path | None = None,
                 on_progress: Callback | None = None, loaded=None, workers: int | None = None) -> ProbeResult:
    """Export the probe for a job's model and shapes into ``out_dir``.

    Args:
        cfg: the job's export settings (the probe takes its model, layers, targets,
            rank, q, bs, T and base weights; nothing else).
        out_dir: where ``probe.pte``, the weights and ``probe.probe.json`` go.
        cache_dir: cache root (default ``export.models.default_cache_dir()``).
        on_progress: receives ``export.progress.ExportProgress`` events.
        loaded: an already loaded ``export.models.LoadedModel``.
        workers: lower the probe as this many units side by side, one ``.pte`` each, in
            worker processes (None: one per core, as memory allows, at most `MAX_UNITS`;
            1: one ``.pte``, lowered in this process).

    Returns:
        The manifest's path and content; ``lower_seconds`` is 0 when it came from the cache.
    """
    from export.models import default_cache_dir, load_model
    from shared.tasks import load_task_spec, verbalizer_token_ids

    tracker = ProgressTracker(on_progress)
    cache = ProgramCache(cache_dir or default_cache_dir())
    if loaded is None:
        tracker.begin("load", f"loading model {cfg.model}")
        loaded = load_model(cfg.model, cache_dir=cache_dir, progress=lambda line: tracker.note("load", line))
        tracker.end("load", f"loaded {loaded.model_id}")
    verbalizer_ids = verbalizer_token_ids(load_task_spec(cfg.task), loaded.tokenizer)
    modules, shapes = probe_modules(loaded.model, cfg, verbalizer_ids)
    shapes = replace(shapes, model_id=loaded.model_id, model_fingerprint=model_fingerprint(loaded.model))
    key = probe_cache_key(shapes, loaded.model)
    wanted = min(MAX_UNITS, default_workers(len(modules)) if workers is None else max(1, workers))
    groups = split_units(tuple(modules), wanted)
    keys = [key if len(groups) == 1 else digest({"probe": key, "unit": list(group)}) for group in groups]
    found = {k: cache.find(k) for k in keys}
    missing = [ProbeUnit(k, group, loaded.model, cfg, verbalizer_ids)
               for k, group in zip(keys, groups) if found[k] is None]
    lower_seconds = 0.0
    if missing:
        tracker.plan_methods(sum(len(unit.methods) for unit in missing), parallel=len(missing))
        start = time.perf_counter()
        found.update(lower_units(missing, cache, tracker, workers=len(missing)))
        lower_seconds = time.perf_counter() - start
    units = [found[k] for k in keys]
    # every unit reads the one layer's weights: the first unit's file serves them all if it
    # holds each tensor the others name, with the same bytes (read only where the files differ)
    others = [unit for unit in units[1:] if unit.weights_sha256 != units[0].weights_sha256]
    if others:
        head_weights = weights_entries(units[0].weights).items()
        if any(not weights_entries(unit.weights).items() <= head_weights for unit in others):
            raise RuntimeError(f"the probe's units disagree on the layer's weights; clear {cache.root / 'programs'} "
                               f"and export the probe again")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, method_files = {}, {}
    for index, unit in enumerate(units):
        program = out_dir / ("probe.pte" if index == 0 else f"probe-{index + 1}.pte")
        shutil.copyfile(unit.program, program)
        files[program_role(index)] = program.name
        method_files.update({method: program.name for method in unit.methods})
    for stale in out_dir.glob("probe-*.pte"):  # a unit of an earlier probe written here
        if stale.name not in files.values():
            stale.unlink()
    weights = out_dir / f"weights-{units[0].weights_sha256[:12]}.ptd"
    if not weights.exists():
        place_file(units[0].weights, weights)
    files["weights"] = weights.name
    manifest = replace(shapes, files=files, method_files=method_files,
                       sha256={**{name: sha256_file(out_dir / name) for name in dict.fromkeys(method_files.values())},
                               weights.name: units[0].weights_sha256},
                       lower_seconds=round(lower_seconds, 2), cache_key=key)
    manifest_path = out_dir / f"probe{PROBE_SUFFIX}"
    manifest.save(manifest_path)
    from_cache = not missing
    tracker.finish(f"Wrote {manifest_path}" + (" (probe found in the cache)" if from_cache else ""))
    return ProbeResult(manifest_path, manifest, from_cache, tracker.clock() - tracker.start)


def probe_cache_key(shapes: ProbeManifest, model: nn.Module) -> str:
    """Key of a lowered probe: its format, the model's content and config, the shapes, the toolchain."""
    return digest({"probe": PROBE_FORMAT, "shapes": asdict(replace(shapes, files={}, sha256={})),
                   "config": model.config.to_json_string(use_diff=False), **toolchain()})
