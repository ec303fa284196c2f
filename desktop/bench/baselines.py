"""Eager PyTorch trainers that the benchmark runs beside the ExecuTorch P-RGE step.

Three methods train the *same* LoRA-FA B vector ``b`` (layout of
:func:`export.lora.b_layout`) through the *same* forward,
:meth:`export.prge.PrgeProgram.copy_losses`, so their curves differ only by the
optimiser:

* ``prge_eager`` — P-RGE (Gao et al., arXiv 2409.15520): the exported program's
  step in eager PyTorch, all 2q perturbed copies folded into one batched
  forward with prefix sharing.  ExecuTorch's step is its twin.
* ``mezo`` — MeZO (Malladi et al., "Fine-Tuning Language Models with Just
  Forward Passes", NeurIPS 2023) on the same B: one direction at a time, a
  forward at ``b + eps·z_i`` then one at ``b − eps·z_i`` (2q forwards of bs rows
  per step, nothing batched, nothing shared).  As MeZO does, ``b`` is perturbed
  in place and every ``z_i`` is regenerated from a seed instead of being kept,
  so no [q, P] tensor is ever held.  The estimate and the update rule are those
  of P-RGE: ``g_i = (L_i+ − L_i−) / (2·eps)``, ``b ← b − lr · mean_i(g_i · z_i)``,
  with all ``g_i`` taken at the same ``b`` (MeZO's ``zo_step`` then ``zo_update``).
  A one-copy forward runs every layer on bs rows whatever the program's
  ``prefix_sharing`` flag (the flag only decides where 2q copies fan out), so
  any :class:`PrgeProgram` of the model serves.
* ``first_order_lora`` — LoRA-FA with backprop (Zhang et al., 2023, a
  first-order method): ``b`` is a leaf tensor requiring grad, AdamW, default
  bs 8, lr 1e-3 (``FIRST_ORDER_LR``).  Only B trains, A stays frozen at its seeded init: the same
  trainable state as the zeroth-order methods, so the comparison isolates
  "gradient estimate vs true gradient" and its result loads through the same
  adapter path.  The frozen weights never require grad, so autograd keeps only
  the activations from the shallowest trainable layer up.

The loss of all three is the program's: cross-entropy at the answer position,
by default over the task's verbalizer tokens.  Accuracy is the argmax of
:meth:`PrgeProgram.class_logits` against the labels.

What the eager twins share with the ExecuTorch trainer (``device_agent.trainer``),
so that a comparison differs only where the methods do:

* the directions: ``draw_z`` from ``initial_rng_state(seed)``, numpy's PCG64, the
  trainer's own draw, so for one seed ``prge_eager`` and ``mezo`` see the z the
  trainer would and follow the same trajectory (up to float rounding): the
  benchmark shows one curve at two speeds. MeZO proper regenerates each z_i from
  a seed rather than keep it; here its step receives z_i from the step's draw,
  which holds q·P floats (0.8 MB for SmolLM2's top-8 q/v adapter) and does not
  change what its step computes or how long its forwards take;
* the learning-rate schedules: ``lr_at`` and ``SCHEDULES``;
* the zeroth-order default lr: ``export.program.DEFAULT_LR`` of fp32 weights (the
  eager twins run fp32 weights);
* accuracy on an empty split: nan, as ``Program.accuracy``.

Events are ``shared.events`` records (Step, Eval, Test), as the trainer's.

Memory is compared across separate processes (:func:`measure_peak_rss`): peak
RSS is a per-process high-water mark, so two methods measured in one process
would hide each other.
"""
from __future__ import annotations

import math
import multiprocessing
import resource
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import torch

from device_agent.trainer import SCHEDULES, draw_z, initial_rng_state, lr_at
from export.prge import PrgeProgram
from export.program import DEFAULT_LR
from shared.errors import InputError
from shared.events import Eval, Event, Step, Test

BASELINES = ("prge_eager", "mezo", "first_order_lora")
ZEROTH_ORDER = ("prge_eager", "mezo")
FIRST_ORDER_LR = 1e-3  # AdamW's, for first-order LoRA (its own optimiser, so its own default)
# Per-method defaults where the methods differ (None in BaselineConfig means "use these").
DEFAULT_BATCH_SIZE = {"prge_eager": 4, "mezo": 4, "first_order_lora": 8}


class SplitLike(Protocol):
    """An encoded split: :class:`shared.task_data.Split`."""

    input_ids: np.ndarray  # [n, T] int64, right-padded
    lengths: np.ndarray  # [n] int64
    labels: np.ndarray  # [n] int64 class index


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of one baseline run; None picks the method's default (resolved_lr, DEFAULT_BATCH_SIZE)."""

    steps: int = 200  # optimiser steps
    eval_every: int = 50  # validation accuracy every this many steps (and at step 0 and the last step)
    lr: float | None = None  # learning rate; zeroth-order DEFAULT_LR["fp32"], first-order (AdamW) FIRST_ORDER_LR
    schedule: str = "constant"  # one of the trainer's SCHEDULES, over `steps`
    eps: float = 1e-2  # perturbation size (zeroth-order methods only)
    q: int = 4  # random directions per step (zeroth-order methods only)
    batch_size: int | None = None  # examples per step; zeroth-order 4, first-order 8
    weight_decay: float = 0.0  # AdamW's (first-order only); 0 keeps B's start at the identity edit
    eval_batch_size: int = 32  # rows per class_logits call at evaluation
    eval_limit: int | None = None  # evaluate on the first N validation examples; None = all
    test: bool = True  # compute the final test accuracy
    seed: int = 0  # seeds the batch order and the directions

    def resolved_lr(self, name: str) -> float:
        if self.lr is not None:
            return self.lr
        return FIRST_ORDER_LR if name == "first_order_lora" else DEFAULT_LR["fp32"]

    def resolved_batch_size(self, name: str) -> int:
        return DEFAULT_BATCH_SIZE[name] if self.batch_size is None else self.batch_size


@dataclass
class BaselineResult:
    """What one run produced: per-step curves, the accuracy curve, the trained ``b``.

    Attributes:
        name: the method.
        config: the settings it ran with (defaults resolved: lr, batch_size).
        losses: [steps] mean training loss of each step (mean over the 2q copies
            for the zeroth-order methods, the batch loss for first-order).
        step_seconds: [steps] wall seconds of each step (evaluation excluded).
        eval_steps: steps at which validation accuracy was taken (0 first).
        eval_accuracy: validation accuracy at each of ``eval_steps``.
        test_accuracy: accuracy on the whole test split after the last step, or None.
        b: [P] the trained flat B vector.
    """

    name: str
    config: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    test_accuracy: float | None = None
    b: torch.Tensor | None = field(default=None, repr=False)

    @property
    def train_seconds(self) -> float:
        return float(sum(self.step_seconds))

    def summary(self) -> dict[str, Any]:
        """Everything but ``b``, JSON-ready."""
        out = {key: value for key, value in asdict(self).items() if key != "b"}
        out["train_seconds"] = self.train_seconds
        return out


# --- one step of each method ---------------------------------------------------


def prge_eager_step(program: PrgeProgram, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                    b: torch.Tensor, z: torch.Tensor, lr: float, eps: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One P-RGE step: the exported program's maths, in eager PyTorch.

    Args:
        program: the step module (its prefix_sharing decides where the 2q copies fan out).
        input_ids: [bs, T] token ids.
        lengths: [bs] real tokens per row.
        labels: [bs] class indices.
        b: [P] current B vector.
        z: [q, P] directions.
        lr: learning rate.
        eps: perturbation size.

    Returns:
        (new b [P], mean loss over the 2q copies, g [q]).
    """
    with torch.no_grad():
        b_new, loss, g = program.step(input_ids, lengths, labels, b, z, torch.tensor([lr]), torch.tensor([eps]))
    return b_new, float(loss), g


def mezo_step(program: PrgeProgram, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
              b: torch.Tensor, z_of: Callable[[int], torch.Tensor], q: int, lr: float,
              eps: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One MeZO-style step: 2q sequential one-copy forwards, +eps then −eps per direction.

    Args:
        program: the step module; called with a single copy each time.
        input_ids: [bs, T] token ids.
        lengths: [bs] real tokens per row.
        labels: [bs] class indices.
        b: [P] current B vector (not modified).
        z_of: i -> [P] direction i; called twice per direction (once to perturb, once
            to update, as MeZO regenerates z_i instead of keeping it), so it must be
            deterministic.
        q: number of directions.
        lr: learning rate.
        eps: perturbation size.

    Returns:
        (new b [P], mean loss over the 2q forwards, g [q]).
    """
    work = b.clone()  # perturbed in place, as MeZO perturbs the model's parameters
    grads: list[float] = []
    total = 0.0
    with torch.no_grad():
        for i in range(q):
            z = z_of(i)  # [P]
            work.add_(z, alpha=eps)  # b + eps·z_i
            loss_plus = float(program.copy_losses(input_ids, lengths, labels, work)[0])
            work.add_(z, alpha=-2 * eps)  # b − eps·z_i
            loss_minus = float(program.copy_losses(input_ids, lengths, labels, work)[0])
            work.copy_(b)  # back to b exactly: every g_i is taken at the same point
            grads.append((loss_plus - loss_minus) / (2 * eps))
            total += loss_plus + loss_minus
        # The update regenerates each z_i instead of having kept it (MeZO's zo_update).
        for i, g in enumerate(grads):
            work.add_(z_of(i), alpha=-lr * g / q)  # b ← b − lr · mean_i(g_i · z_i)
    return work, total / (2 * q), torch.tensor(grads)


@contextmanager
def frozen_weights(program: PrgeProgram) -> Iterator[None]:
    """Switch off requires_grad on every weight the program reads, and restore it after.

    The wrapped Hugging Face model's parameters are the program's parameters (its
    A's, head rows and rope tables are buffers, which never require grad).
    """
    params = list(program.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def first_order_step(program: PrgeProgram, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                     b: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
    """One backprop step on the leaf ``b`` (requires_grad) that ``optimizer`` holds.

    Call inside :func:`frozen_weights`.

    Returns:
        The batch loss before the update.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = program.copy_losses(input_ids, lengths, labels, b)[0]  # [] the same forward as P-RGE's
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# --- evaluation ----------------------------------------------------------------


def evaluate(program: PrgeProgram, split: SplitLike, b: torch.Tensor, batch_size: int = 32,
             limit: int | None = None) -> float:
    """Accuracy of ``argmax class_logits`` against the labels.

    Args:
        program: the step module.
        split: the examples.
        b: [P] B vector.
        batch_size: rows per forward.
        limit: only the first ``limit`` examples; None = all.

    Returns:
        Accuracy in [0, 1]; nan for an empty split, as ``Program.accuracy``.
    """
    n = len(split.labels) if limit is None else min(limit, len(split.labels))
    if n == 0:
        return math.nan
    correct = 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            ids = torch.as_tensor(split.input_ids[start:stop])  # [rows, T]
            lengths = torch.as_tensor(split.lengths[start:stop])  # [rows]
            labels = torch.as_tensor(split.labels[start:stop])  # [rows]
            predicted = program.class_logits(ids, lengths, b.detach()).argmax(dim=1)  # [rows]
            correct += int((predicted == labels).sum())
    return correct / n


# --- the runner ----------------------------------------------------------------


class _Batches:
    """Seeded shuffled batches, a fresh permutation each epoch."""

    def __init__(self, split: SplitLike, batch_size: int, seed: int) -> None:
        n = len(split.labels)
        if n < batch_size:
            raise InputError(f"the training split has {n} examples, fewer than a batch of {batch_size}")
        self.ids = torch.as_tensor(split.input_ids)
        self.lengths = torch.as_tensor(split.lengths)
        self.labels = torch.as_tensor(split.labels)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.order), generator=self.generator)
            self.pos = 0
        index = self.order[self.pos:self.pos + self.batch_size]  # [bs]
        self.pos += self.batch_size
        return self.ids[index], self.lengths[index], self.labels[index]


class _Trainer:
    """The per-method state behind one ``step()`` call: b, the direction generator, AdamW for first-order."""

    def __init__(self, name: str, program: PrgeProgram, cfg: BaselineConfig, b0: torch.Tensor) -> None:
        self.name, self.program, self.cfg = name, program, cfg
        self.lr = cfg.resolved_lr(name)
        self.b = b0.detach().clone()  # [P]
        self.rng_state = initial_rng_state(cfg.seed)  # the trainer's z generator, seeded as `deftly train --seed`
        self.optimizer: torch.optim.Optimizer | None = None
        if name == "first_order_lora":
            self.b.requires_grad_(True)
            self.optimizer = torch.optim.AdamW([self.b], lr=self.lr, weight_decay=cfg.weight_decay)

    def lr_of(self, step: int) -> float:
        """Learning rate of 1-based ``step`` (the trainer's ``lr_at`` counts steps done, from 0)."""
        return lr_at(step - 1, self.lr, self.cfg.schedule, self.cfg.steps)

    def step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        """One step of 1-based ``step``; returns (loss, mean |g|), nan for first-order, which has no g."""
        lr, cfg = self.lr_of(step), self.cfg
        if self.name in ZEROTH_ORDER:
            z_np, self.rng_state = draw_z(self.rng_state, cfg.q, self.b.shape[0])
            z = torch.from_numpy(z_np)  # [q, P]
            if self.name == "prge_eager":
                self.b, loss, g = prge_eager_step(self.program, *batch, self.b, z, lr, cfg.eps)
            else:
                self.b, loss, g = mezo_step(self.program, *batch, self.b, lambda i: z[i], cfg.q, lr, cfg.eps)
            return loss, float(g.abs().mean())
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return first_order_step(self.program, *batch, self.b, self.optimizer), math.nan


def run_baseline(name: str, program: PrgeProgram, splits: Mapping[str, SplitLike],
                 cfg: BaselineConfig = BaselineConfig(), b0: torch.Tensor | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> BaselineResult:
    """Train with one method, evaluating as it goes.

    Args:
        name: one of :data:`BASELINES`.
        program: the step module over the model and adapter to train.
        splits: "train", "validation" and (if ``cfg.test``) "test" splits, encoded at
            the program's seq_len.
        cfg: the run's settings.
        b0: [P] starting B vector; zeros (the identity edit) when None.
        on_event: receives a ``shared.events`` record: a Step after each step
            (``g_abs_mean`` nan for first-order; ``rss_mb`` / ``peak_rss_mb`` the
            process's, nan where /proc is not readable), an Eval after each
            evaluation and a Test at the end.

    Returns:
        The curves, the accuracies and the trained ``b``.

    Raises:
        InputError: an unknown method or schedule, or a training split smaller than a batch.
    """
    if name not in BASELINES:
        raise InputError(f"baseline {name!r}: expected one of {BASELINES}")
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")
    emit: Callable[[Event], None] = on_event or (lambda _event: None)
    settings = asdict(cfg) | {"lr": cfg.resolved_lr(name), "batch_size": cfg.resolved_batch_size(name)}
    result = BaselineResult(name=name, config=settings)
    b0 = torch.zeros(program.b_size) if b0 is None else b0
    trainer = _Trainer(name, program, cfg, b0)
    batches = _Batches(splits["train"], cfg.resolved_batch_size(name), cfg.seed)

    def record_eval(step: int) -> None:
        split = splits["validation"]
        start = time.perf_counter()
        accuracy = evaluate(program, split, trainer.b, cfg.eval_batch_size, cfg.eval_limit)
        result.eval_steps.append(step)
        result.eval_accuracy.append(accuracy)
        examples = len(split.labels) if cfg.eval_limit is None else min(cfg.eval_limit, len(split.labels))
        emit(Eval(step=step, split="validation", accuracy=accuracy, examples=examples,
                  seconds=time.perf_counter() - start))

    record_eval(0)
    with frozen_weights(program):
        for step in range(1, cfg.steps + 1):
            batch = batches.next()
            start = time.perf_counter()
            loss, g_abs_mean = trainer.step(step, batch)
            seconds = time.perf_counter() - start
            result.losses.append(loss)
            result.step_seconds.append(seconds)
            emit(Step(step=step, loss=loss, g_abs_mean=g_abs_mean, seconds=seconds, seq_len=int(batch[0].shape[1]),
                      rss_mb=_status_bytes("VmRSS") / 2**20, peak_rss_mb=_status_bytes("VmHWM") / 2**20,
                      lr=trainer.lr_of(step)))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record_eval(step)
    result.b = trainer.b.detach().clone()
    if cfg.test:
        start = time.perf_counter()
        result.test_accuracy = evaluate(program, splits["test"], result.b, cfg.eval_batch_size)
        emit(Test(step=cfg.steps, split="test", accuracy=result.test_accuracy, examples=len(splits["test"].labels),
                  seconds=time.perf_counter() - start))
    return result


# --- peak memory in a separate process ---------------------------------------


@dataclass
class PeakRss:
    """Peak resident memory of a callable run in a fresh process, and what it returned."""

    bytes: int
    value: Any


def _status_bytes(field: str) -> float:
    """A memory line of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its peak), in bytes; nan elsewhere.

    Read here rather than with psutil, which desktop/ does not import and which
    has no peak on Linux anyway.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(int(line.split()[1]) * 1024)  # kB
    except OSError:
        pass
    return math.nan


def _max_rss_bytes() -> int:
    """This process's own peak RSS.

    On Linux, VmHWM of /proc/self/status: ``ru_maxrss`` is no good in a spawned
    child, because the kernel carries the parent's high-water mark across fork
    and exec (a benchmark parent holding a model made every child read 3 GB).
    """
    peak = _status_bytes("VmHWM")
    if not math.isnan(peak):
        return int(peak)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _rss_child(fn: Callable[..., Any], args: tuple, kwargs: dict, queue: multiprocessing.Queue) -> None:
    try:
        value = fn(*args, **kwargs)
        queue.put(("ok", _max_rss_bytes(), value))
    except BaseException:  # noqa: BLE001 — everything goes back to the parent, which raises
        queue.put(("error", 0, traceback.format_exc()))


def measure_peak_rss(fn: Callable[..., Any], *args: Any, timeout: float = 3600.0, **kwargs: Any) -> PeakRss:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned process and return its peak RSS.

    Spawned, not forked: a forked child would start with the parent's pages
    (a loaded model, say) already counted.  The peak is the process's
    high-water mark, ``getrusage(RUSAGE_SELF).ru_maxrss``, which includes the
    interpreter and the imports ``fn``'s module pulls in (torch: ~0.3 GB);
    compare methods measured the same way.  Measured as VmHWM on Linux (see
    ``_max_rss_bytes``), since ``ru_maxrss`` inherits the parent's peak.

    Args:
        fn: a module-level (picklable) function; its return value must pickle too.
        *args: its positional arguments (picklable).
        timeout: seconds to wait for the child.
        **kwargs: its keyword arguments (picklable).

    Returns:
        The peak RSS in bytes and ``fn``'s return value.

    Raises:
        RuntimeError: ``fn`` raised in the child (its traceback is in the message),
            the child died, or it ran past ``timeout``.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_rss_child, args=(fn, args, kwargs, queue), daemon=True)
    process.start()
    try:
        status, peak, value = queue.get(timeout=timeout)
    except Exception as exc:  # queue.Empty on timeout; EOFError if the child died
        raise RuntimeError(f"peak-RSS child for {getattr(fn, '__name__', fn)!r} returned nothing "
                           f"(exit code {process.exitcode})") from exc
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
            process.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)!r} failed in the peak-RSS child:\n{value}")
    return PeakRss(bytes=peak, value=value)


@dataclass(frozen=True)
class EagerJob:
    """A self-contained eager training run for :func:`eager_training_job` (picklable).

    Everything is loaded inside the job, so its peak RSS covers model, data and
    training, as a device running the method would pay.
    """

    method: str  # one of BASELINES
    model: str = "smollm2"  # load_model spec, or "tiny" (tiny_llama with SmolLM2's tokenizer)
    cache_dir: str | None = None  # load_model's cache_dir
    task: str = "rotten_tomatoes"  # load_task_spec spec
    layers: str = "top:8"  # parse_layers text
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 8
    alpha: float = 16.0
    seq_len: int = 64
    steps: int = 20
    config: BaselineConfig = BaselineConfig(test=False, eval_every=10**9, eval_limit=0)  # no evaluation by default
    max_train_examples: int | None = 512  # encode only this many training examples (enough for `steps`)
    threads: int | None = None  # torch.set_num_threads in the child; None = torch's default


def eager_training_job(job: EagerJob) -> dict[str, Any]:
    """Load, encode and train as ``job`` says; return the result's summary.

    Meant for :func:`measure_peak_rss` (``measure_peak_rss(eager_training_job, job)``).
    """
    from export.lora import AdapterTensors, LoraFaConfig, parse_layers
    from export.models import load_model, load_tokenizer, tiny_llama
    from export.prge import PrgeConfig
    from shared.tasks import encode_split, load_examples, load_task_spec, verbalizer_token_ids

    if job.threads is not None:
        torch.set_num_threads(job.threads)
    cache_dir = Path(job.cache_dir) if job.cache_dir else None
    quiet = lambda _msg: None  # noqa: E731
    if job.model == "tiny":
        loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=load_tokenizer("smollm2", cache_dir, quiet))
    else:
        loaded = load_model(job.model, cache_dir, quiet)
    task = load_task_spec(job.task)
    examples = load_examples(task)
    if job.max_train_examples is not None:
        examples["train"] = examples["train"][:job.max_train_examples]
    splits = {name: encode_split(rows, task, loaded.tokenizer, job.seq_len) for name, rows in examples.items()}
    layers = parse_layers(job.layers, loaded.model.config.num_hidden_layers)
    adapter_cfg = LoraFaConfig(rank=job.rank, alpha=job.alpha, target_modules=job.target_modules, layers=layers)
    adapter = AdapterTensors.build(loaded.model, adapter_cfg)
    cfg = job.config
    prge_cfg = PrgeConfig(q=cfg.q, batch_size=cfg.resolved_batch_size(job.method), seq_len=job.seq_len,
                          prefix_sharing=job.method != "mezo")
    program = PrgeProgram(loaded.model, adapter, prge_cfg, verbalizer_token_ids(task, loaded.tokenizer))
    run_cfg = BaselineConfig(**(asdict(cfg) | {"steps": job.steps}))
    return run_baseline(job.method, program, splits, run_cfg).summary()
