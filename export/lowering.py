"""Lowering P-RGE methods to ExecuTorch, one unit at a time, in parallel worker processes.

Stages, numbered in the code: :func:`method_modules` wraps a ``PrgeProgram`` into one
module per method (1 wrap; a ``step_t<T>`` / ``eval_t<T>`` per length bucket), and
:func:`lower_unit` turns a unit of them into an ``ExecutorchProgramManager``
(2 export and tag the weights → 3 lower to XNNPACK → 4 emit).

Where the time goes (``bench/results/lowering.json``, SmolLM2, one method): the
graph's conversion to the edge dialect and XNNPACK's partitioning take ~90 %,
torch.export ~5 %, emitting ~5 %. Both big stages are single-threaded Python, so
methods are lowered side by side in worker processes (:func:`lower_units`), each
writing its unit into the cache. A worker receives a :class:`ProgramRecipe` (the
fp32 model, shared with it through torch's shared-memory pickling, and how to
build the program from it) rather than the program: torchao's int8 weights do not
pickle, so an int8 worker quantises its own copy, once.

The frozen base weights are tagged external on the exported graph itself (no second
torch.export): XNNPACK-delegated linears put theirs in the named data store by
content hash, and non-delegated constants (the embedding table) go through
``external_constants``; both land in one ``.ptd`` that every method of a model
shares, so a new block ships only its small ``.pte`` files.
"""
from __future__ import annotations

import os
import queue as queue_module
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import torch

from export.cache import CachedUnit, ProgramCache
from export.int8 import int8_model
from export.lora import AdapterTensors
from export.prge import PrgeConfig, PrgeEval, PrgeLoss, PrgeProgram, PrgeStep, PrgeStepInGraphNoise, example_inputs
from export.progress import ProgressTracker
from export.quiet import quiet_lowering
from shared.errors import InputError

WEIGHTS_TAG = "weights"
METHODS = {"step": PrgeStep, "step_rng": PrgeStepInGraphNoise, "eval": PrgeEval, "loss": PrgeLoss}
BUCKETED_METHODS = ("step", "eval")  # the methods that get a variant per length bucket
# "xnnpack": the linears, bmm, softmax and elementwise ops go to the XNNPACK delegate;
# "portable": no delegate, every operator on ExecuTorch's portable kernels (slower), for a
# runtime where XNNPACK cannot start, e.g. an emulated CPU whose cpuinfo it cannot read.
DELEGATES = ("xnnpack", "portable")
DEFAULT_DELEGATE = "xnnpack"
# A worker lowering SmolLM2 reached 2.9 GiB resident (the shared model's 538 MB included;
# its parent 1.6 GiB): never start more workers than the available memory holds.
WORKER_MEMORY_BYTES = 3 << 30
TICK_SECONDS = 10.0  # a running stage reports this often

MethodModules = dict[str, tuple[torch.nn.Module, tuple]]
# (stage, method, state, seconds): what lower_unit reports; state "start" or "end".
StageCallback = Callable[[str, str, str, float | None], None]


def bucket_method(seq_len: int, method: str = "step") -> str:
    """Name of the ``step`` (or ``eval``) method for a shorter length bucket."""
    return f"{method}_t{seq_len}"


def base_method(name: str) -> str:
    """The method a bucket variant is of: ``step_t32`` -> ``step``; others unchanged."""
    head, _, tail = name.rpartition("_t")
    return head if head in BUCKETED_METHODS and tail.isdigit() else name


def method_modules(program: PrgeProgram, methods: tuple[str, ...], eval_batch_size: int,
                   length_buckets: tuple[int, ...] = ()) -> MethodModules:
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

    Raises:
        InputError: a method that is not in METHODS.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InputError(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    modules: MethodModules = {}
    for seq_len in (program.cfg.seq_len, *length_buckets):
        # A shorter bucket: the same weights (shared module references), its own rotary tables and mask.
        at = program if seq_len == program.cfg.seq_len else PrgeProgram.like(program, replace(program.cfg, seq_len=seq_len))
        for method in methods:
            if seq_len != program.cfg.seq_len and method not in BUCKETED_METHODS:
                continue
            name = method if at is program else bucket_method(seq_len, method)
            modules[name] = (METHODS[method](at), _example(at, method, eval_batch_size))
    return modules


def _example(program: PrgeProgram, method: str, eval_batch_size: int) -> tuple:
    cfg = replace(program.cfg, batch_size=eval_batch_size) if method == "eval" else program.cfg
    vocab = program.embed_tokens.num_embeddings
    return example_inputs(cfg, program.b_size, vocab, block_size=program.block_size)[method]


# -- one unit ----------------------------------------------------------------------------


def _is_base_weight(name: str) -> bool:
    """Frozen base-model weights (shared by every program of a model) vs program constants."""
    return any(part in name for part in ("embed_tokens", "layers", "norm")) and "lora_a" not in name \
        and "mean_row" not in name


def _has_tensor_subclass_weights(module: torch.nn.Module) -> bool:
    """Whether any weight is a tensor subclass (torchao's quantised weights are)."""
    return any(type(t) not in (torch.Tensor, torch.nn.Parameter)
               for t in (*module.parameters(), *module.buffers()))


def tag_base_weights(ep: torch.export.ExportedProgram) -> int:
    """Tag the frozen base weights of an exported graph for the shared ``.ptd``, in place.

    XNNPACK's serialiser reads the tag from each weight's placeholder
    (``meta["custom"]["delegate_constant_tag"]``), so it is set there directly: what
    ExecuTorch's unlifted pass does followed by a second torch.export, without the
    second export.

    Returns:
        The number of weights tagged.
    """
    signature = ep.graph_signature
    fqns = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
            **signature.inputs_to_lifted_tensor_constants}
    tagged = 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in fqns and _is_base_weight(fqns[node.name]):
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = WEIGHTS_TAG
            tagged += 1
    return tagged


def lower_unit(methods: MethodModules, external_weights: bool = True,
               on_stage: StageCallback = lambda *_: None, delegate: str = DEFAULT_DELEGATE):
    """Lower one unit of P-RGE methods to one ExecuTorch program.

    Args:
        methods: method name -> (module, example inputs), from :func:`method_modules`.
        external_weights: tag the frozen base weights for a separate ``.ptd``.
        on_stage: called as (stage, method, "start"|"end", seconds) around each stage.
        delegate: one of :data:`DELEGATES`: "xnnpack", or "portable" (no delegate: every
            operator on ExecuTorch's portable kernels; see ``ExportConfig.delegate``).

    Returns:
        An ``ExecutorchProgramManager`` (call ``save`` / ``write_tensor_data_to_file``).
    """
    with quiet_lowering():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

        label = ",".join(methods)
        # 2. export each method to an ATen graph and tag the frozen weights on it.
        exported = {}
        for name, (module, inputs) in methods.items():
            with _stage(on_stage, "export", name):
                ep = torch.export.export(module, inputs, strict=False)
                if external_weights:
                    if _has_tensor_subclass_weights(module):
                        # int8 weights are torchao tensor subclasses; lowering would flatten each
                        # into new (data, scale, zero point) parameters that carry no tag and so
                        # land inside the .pte. Flatten first, so the tags go on those.
                        ep = ep.run_decompositions({})
                    tag_base_weights(ep)
                exported[name] = ep

        # 3. lower: XNNPACK takes the linears, bmm, softmax and elementwise ops (portable: nothing
        #    is delegated; the frozen weights then go external through external_constants alone).
        partitioner = [XnnpackPartitioner()] if delegate == "xnnpack" else None
        with _stage(on_stage, "lower", label):
            edge = to_edge_transform_and_lower(exported, partitioner=partitioner,
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False))

        # 4. emit the ExecuTorch program; non-delegated base weights go external too.
        def external_tag(node: torch.fx.Node) -> str | None:
            return WEIGHTS_TAG if _is_base_weight(node.name) else None

        with _stage(on_stage, "emit", label):
            return edge.to_executorch(ExecutorchBackendConfig(
                external_constants=external_tag if external_weights else False))


class _stage:
    """Reports a stage's start and its end with the seconds it took."""

    def __init__(self, on_stage: StageCallback, stage: str, method: str) -> None:
        self.on_stage, self.stage, self.method = on_stage, stage, method

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.on_stage(self.stage, self.method, "start", None)

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.on_stage(self.stage, self.method, "end", time.perf_counter() - self.start)


# -- what a worker builds -----------------------------------------------------------------


@dataclass
class ProgramRecipe:
    """How to build a job's ``PrgeProgram`` anywhere: picklable, with no torchao object in it."""

    key: str  # names the base weights (model fingerprint and fp32 / int8 recipe): equal keys, equal bases
    model: torch.nn.Module  # the fp32 model
    adapter: AdapterTensors  # the job's adapter on it (the fp32 A's)
    prge: PrgeConfig  # shapes at the full sequence length
    verbalizer_ids: list[int]
    class_bias: list[float]
    int8: bool = False  # quantise the frozen decoder linears and the embedding (export.int8)
    int8_ranges: dict | None = None  # SmoothQuant's activation ranges, measured where the prompts are
    int8_smoothing: float = 0.0


_bases: dict[str, tuple[torch.nn.Module, AdapterTensors]] = {}  # recipe key -> (base model, program adapter)


def recipe_program(recipe: ProgramRecipe, block: tuple[int, int] | None = None) -> PrgeProgram:
    """The recipe's program for ``block`` (None: every layer); an int8 base is quantised once per process."""
    if recipe.key not in _bases:
        _bases.clear()  # one job at a time: do not hold an old job's int8 copy
        _bases[recipe.key] = (int8_model(recipe.model, recipe.adapter, recipe.int8_ranges, recipe.int8_smoothing)
                              if recipe.int8 else (recipe.model, recipe.adapter))
    model, adapter = _bases[recipe.key]
    program = PrgeProgram(model, adapter, recipe.prge, recipe.verbalizer_ids, block)
    program.class_bias.copy_(torch.tensor(recipe.class_bias))
    return program


def release_bases() -> None:
    """Drop the bases :func:`recipe_program` keeps (an int8 copy of the model) once a job is lowered."""
    _bases.clear()


# -- many units, side by side ------------------------------------------------------------


@dataclass
class UnitJob:
    """One unit to lower into the cache: what the workers receive."""

    key: str  # the unit's cache key
    program: str  # the program it belongs to, for progress ("L22-24", "eval", ...)
    recipe: ProgramRecipe
    block: tuple[int, int]  # the block the program perturbs
    methods: tuple[str, ...]  # the unit's methods (bucket variants by name, e.g. step_t32)
    eval_batch_size: int
    length_buckets: tuple[int, ...]
    external_weights: bool
    delegate: str = DEFAULT_DELEGATE

    def modules(self) -> MethodModules:
        """Stage 1 for this unit: its methods wrapped, built from the recipe."""
        program = recipe_program(self.recipe, self.block)
        wrapped = method_modules(program, tuple(dict.fromkeys(base_method(m) for m in self.methods)),
                                 self.eval_batch_size, self.length_buckets)
        return {name: wrapped[name] for name in self.methods}


class Lowerable(Protocol):
    """What :func:`lower_units` needs of a unit: a `UnitJob`, or the probe's `export.probe.ProbeUnit`."""

    key: str
    program: str
    methods: tuple[str, ...]
    external_weights: bool
    delegate: str

    def modules(self) -> MethodModules: ...


def lower_units(jobs: list[Lowerable], cache: ProgramCache, tracker: ProgressTracker,
                workers: int = 1) -> dict[str, CachedUnit]:
    """Lower ``jobs`` into ``cache``, up to ``workers`` at once, reporting each stage to ``tracker``.

    With one worker (or one job) the units are lowered in this process. Otherwise
    each goes to a worker process started with ``spawn`` (a fork would inherit
    torch's thread pools mid-use); the recipe's fp32 model travels through torch's
    shared-memory pickling, so the workers read its weights without a copy.

    Returns:
        unit key -> the cached unit.
    """
    if not jobs:
        return {}
    if workers <= 1 or len(jobs) == 1:
        return {job.key: _lower_and_store(job, cache, _tracker_callback(tracker, job.program)) for job in jobs}
    import torch.multiprocessing as torch_mp  # registers the shared-memory reductions for tensors

    context = torch_mp.get_context("spawn")
    events = context.Queue()
    done: dict[str, CachedUnit] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                             initializer=_init_worker, initargs=(events,)) as pool:
        futures: dict[Future, Lowerable] = {pool.submit(_worker_lower, job, cache.root): job for job in jobs}
        pending = set(futures)
        running: dict[tuple[str, str, str], str] = {}  # (stage, program, method) -> its message
        last_tick = time.perf_counter()
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            _drain(events, tracker, running)
            for future in finished:
                job = futures[future]
                try:
                    done[job.key] = future.result()  # re-raises a worker's error here
                except BrokenProcessPool as exc:
                    raise RuntimeError(
                        "a lowering worker process died before it finished (out of memory, killed, or a "
                        "script without an `if __name__ == \"__main__\":` guard, which a spawned worker "
                        "runs again); export with workers=1 to lower in this process") from exc
            if time.perf_counter() - last_tick >= TICK_SECONDS:
                last_tick = time.perf_counter()
                for (stage, program, method), message in running.items():
                    tracker.tick(stage, message, program, method)
        _drain(events, tracker, running)
    return done


def default_workers(units: int) -> int:
    """Workers for ``units`` units: one per core, no more than the available memory holds, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    available = available_memory_bytes()
    by_memory = cores if available is None else max(1, available // WORKER_MEMORY_BYTES)
    return max(1, min(units, cores, by_memory))


def available_memory_bytes() -> int | None:
    """Memory a new process can have without swapping: Linux's MemAvailable (free pages plus the
    page cache it can drop; the free pages alone undercount it by the cache, gigabytes after
    a few exports), else the free pages; None where neither is known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _stage_message(stage: str, program: str, method: str) -> str:
    verb = {"export": "exporting", "lower": "lowering", "emit": "emitting", "store": "storing"}[stage]
    return f"{verb} {method}" + (f" of {program}" if program else "")


def _tracker_callback(tracker: ProgressTracker, program: str) -> StageCallback:
    def on_stage(stage: str, method: str, state: str, seconds: float | None) -> None:
        message = _stage_message(stage, program, method)
        if state == "start":
            tracker.begin(stage, message, program, method)
        else:
            tracker.end(stage, message, program, method, seconds=seconds)
    return on_stage


def _drain(events, tracker: ProgressTracker, running: dict[tuple[str, str, str], str]) -> None:
    """Hand the workers' stage reports to the tracker, on this thread."""
    while True:
        try:
            program, stage, method, state, seconds = events.get_nowait()
        except queue_module.Empty:
            return
        message = _stage_message(stage, program, method)
        if state == "start":
            running[(stage, program, method)] = message
            tracker.begin(stage, message, program, method)
        else:
            running.pop((stage, program, method), None)
            tracker.end(stage, message, program, method, seconds=seconds)


def _lower_and_store(job: Lowerable, cache: ProgramCache, on_stage: StageCallback) -> CachedUnit:
    seconds: dict[str, float] = {}

    def timed(stage: str, method: str, state: str, took: float | None) -> None:
        if took is not None:
            seconds[f"{stage}:{method}"] = round(took, 3)
        on_stage(stage, method, state, took)

    et_program = lower_unit(job.modules(), job.external_weights, timed, job.delegate)
    label = ",".join(job.methods)
    timed("store", label, "start", None)
    started = time.perf_counter()
    unit = cache.store(job.key, et_program, job.methods, job.external_weights, seconds)
    timed("store", label, "end", time.perf_counter() - started)
    return unit


_worker_events = None  # the queue a worker reports its stages on (set by _init_worker)


def _init_worker(events) -> None:
    global _worker_events
    _worker_events = events
    # Lowering is single-threaded Python; torch's own thread pool would only fight the other worker.
    torch.set_num_threads(1)


def _worker_lower(job: Lowerable, cache_root: Path) -> CachedUnit:
    def on_stage(stage: str, method: str, state: str, seconds: float | None) -> None:
        _worker_events.put((job.program, stage, method, state, seconds))

    return _lower_and_store(job, ProgramCache(cache_root), on_stage)
