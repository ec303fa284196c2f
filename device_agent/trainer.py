"""Local P-RGE training with an exported program: the loop behind `deftly train`.

`run_training(TrainConfig(...), on_event=...)` reads top to bottom:

1. parse: resolve the program and the run directory; refuse a fresh run over an
   old checkpoint, and a resume from another program's checkpoint;
2. build: load and verify the program, its task data and, on resume, the state;
3. run: K steps of ``step`` with host-drawn directions z, a validation
   accuracy every ``eval_every`` steps, a checkpoint after each evaluation;
4. clean up: the final checkpoint, test accuracy, and the trained result as a
   standard PEFT adapter (``<out>/adapter/``).

Reproducible and resumable exactly. Everything random comes from two seeded
numpy sources: z from one PCG64 generator whose state is checkpointed, and the
order of training examples from a permutation per epoch seeded by (seed, epoch),
so the sampler's state is just (epoch, position). With ``batches="stratified"`` the
epoch's order interleaves the classes at their shares, so each batch holds about
the split's class mix (``class_interleaved``). A run of N steps and a run
interrupted at k and resumed to N give bit-identical ``b``.

Tail averaging (``average_from``, Polyak-Ruppert): with a constant learning rate
the zeroth-order ``b`` keeps jittering around where the loss would take it (the
estimate's noise is ~100x the drift per step on SmolLM2, docs/accuracy_experiments.md).
The mean of the iterates after step ``average_from`` cancels much of that jitter.
When it is on, evaluations, the test and the adapter use the mean; the eval
events also carry the last iterate's accuracy. The running sum is part of the
checkpoint, so a resumed run averages exactly as an uninterrupted one. Off by
default: on SmolLM2 every window tried lowered validation accuracy, because b
is still drifting usefully at step 2,000 (docs/accuracy_experiments.md, session 5).

Nothing is lost on a fault: the state is committed only after a step has
completed, and on Ctrl-C or an exception the last committed state is written
before the exception goes on. Checkpoints are written to a temporary file and
renamed. ``checkpoint.npz`` holds ``b`` and the state as JSON (the one the
loader reads); ``checkpoint.json`` is the same state for people to read.

Events (``on_event`` receives each as a dict; the "step", "eval" and "test"
events are also the lines of ``<out>/metrics.jsonl``):

* ``{"kind": "start", "step": first step, "steps": total, "resumed": bool, "lr", "eps", "schedule", "batches", "average_from", "train_examples"}``
* ``{"kind": "step", "step", "loss", "g_abs_mean", "seconds", "rss_mb", "lr"}``
* ``{"kind": "eval", "step", "split": "validation", "accuracy", "examples", "seconds"}``, plus
  ``"averaged_steps"`` and ``"last_iterate_accuracy"`` once tail averaging has begun
* ``{"kind": "checkpoint", "step", "path"}``
* ``{"kind": "test", "step", "split": "test", "accuracy", "examples", "seconds"}``
* ``{"kind": "done", "step", "adapter": path}``
"""
from __future__ import annotations

import functools
import io
import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from device_agent.program import Program, resolve_manifest_path
from shared.calibration import CALIBRATION_FILE  # beside the PEFT adapter: labels, verbalizer ids, class bias
from shared.errors import InputError
from shared.files import write_bytes_atomic
from shared.manifest import BATCH_ORDERS
from shared.safetensors_io import save_file
from shared.task_data import Split

SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_FORMAT = 1
_ARRAY_FIELDS = ("b", "b_sum")  # TrainState fields stored as arrays in checkpoint.npz, not in its JSON
Event = dict[str, Any]


@dataclass
class TrainConfig:
    """Settings of one local training run; defaults commented."""

    program: Path  # the program's .pte or its .manifest.json
    out: Path  # run directory: metrics.jsonl, checkpoint.*, adapter/
    steps: int = 1000  # total steps of the run; a resume continues up to this step
    eval_every: int = 100  # validation accuracy (and a checkpoint) every this many steps; 0 = at the end only
    lr: float | None = None  # None: the manifest's suggestion, or the checkpoint's on resume
    eps: float | None = None  # likewise
    # None: "constant", or the checkpoint's on resume. Constant is MeZO's reference setting
    # for zeroth-order fine-tuning, and it lets a finished run be extended exactly with a
    # larger --steps (a decaying schedule depends on the total).
    schedule: str | None = None
    # None: the manifest's suggestion, or the checkpoint's on resume. "shuffled": batches
    # drawn from a plain permutation; "stratified": every batch holds each class in about
    # its share of the training split (see ``class_interleaved``).
    batches: str | None = None
    seed: int = 0  # seeds z and the order of training examples (ignored on resume: the state is restored)
    resume: bool = False  # continue from <out>/checkpoint.npz
    eval_limit: int | None = None  # validation examples per evaluation; None: the whole split
    test_limit: int | None = None  # test examples at the end; None: the whole split
    eval_at_start: bool = True  # evaluate b = 0 before the first step of a fresh run (the zero-shot point)
    # Methods held loaded at once; each holds a packed copy of the frozen weights (~520 MB
    # for SmolLM2). 1 keeps a device at one copy for ~2 % more time (a method is loaded
    # again, 0.3-1.1 s, when the length bucket or eval takes over); None: keep all.
    resident_methods: int | None = 1
    # Tail averaging: from this step on, evaluate and deliver the mean of b over the
    # steps after it (None: the last b; on resume None keeps the checkpoint's setting).
    average_from: int | None = None


@dataclass
class TrainResult:
    """What a finished run leaves behind, and its headline numbers."""

    step: int  # steps done in total (including those before a resume)
    b: np.ndarray = field(repr=False)  # [P] the trained B's: the tail average when averaging, else the last b
    last_loss: float | None  # loss of the last step run in this call (None if none ran)
    val_accuracy: float | None  # at the last evaluation
    best_val_accuracy: float | None
    test_accuracy: float
    seconds_per_step: float | None  # mean wall time of the steps run in this call
    out: Path
    adapter_dir: Path
    metrics_path: Path
    checkpoint_path: Path


@dataclass
class TrainState:
    """Everything a resumed run needs; committed only after a step has completed."""

    step: int  # steps completed
    b: np.ndarray  # [P] float32
    rng_state: dict  # PCG64 bit-generator state that draws the next z
    epoch: int  # sampler: current epoch ...
    position: int  # ... and the next index into its permutation
    lr: float
    eps: float
    schedule: str
    seed: int
    val_step: int | None = None  # the step val_accuracy was measured at
    val_accuracy: float | None = None
    best_val_accuracy: float | None = None
    average_from: int | None = None  # tail averaging starts after this step (None: off)
    averaged_steps: int = 0  # iterates summed into b_sum
    b_sum: np.ndarray | None = None  # [P] float64 sum of b after each step past average_from
    batches: str = "shuffled"  # the batch order (BATCH_ORDERS); checkpoints written before it were shuffled

    def delivered_b(self) -> np.ndarray:
        """[P] the b this run evaluates and writes: the tail mean once it holds an iterate."""
        if self.averaged_steps == 0 or self.b_sum is None:
            return self.b
        return (self.b_sum / self.averaged_steps).astype(np.float32)

    def add_iterate(self) -> None:
        """Fold the current b into the tail sum if averaging has begun."""
        if self.average_from is None or self.step <= self.average_from:
            return
        if self.b_sum is None:
            self.b_sum = np.zeros(self.b.shape, dtype=np.float64)
        self.b_sum += self.b
        self.averaged_steps += 1


# -- pure pieces ------------------------------------------------------------------


def lr_at(step: int, base_lr: float, schedule: str, total_steps: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``total_steps``.

    constant: base; cosine: base·½(1+cos(π·t/N)); linear: base·(1 − t/N).
    """
    if schedule == "constant":
        return base_lr
    progress = min(step / max(total_steps, 1), 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    raise InputError(f"schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")


# Examples are grouped by length bucket within windows of this many batches: batches
# come out nearly length-homogeneous (so most run at a short bucket) while the order
# stays shuffled at the scale of an epoch.
BUCKET_WINDOW_BATCHES = 64


def epoch_order(seed: int, epoch: int, n: int, bucket_ids: np.ndarray | None = None,
                batch_size: int = 1, labels: np.ndarray | None = None) -> np.ndarray:
    """The training examples' order in one epoch: a permutation seeded by (seed, epoch).

    With ``bucket_ids`` ([n], the length bucket of each example), each window of
    ``BUCKET_WINDOW_BATCHES`` batches is stably sorted by bucket. With ``labels`` ([n]),
    each window's classes are then interleaved at their shares of the window
    (``class_interleaved``), so every batch holds each class in about its share.
    """
    # spawn_key keeps this stream apart from the z generator's, which has spawn_key (0,).
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, epoch))).permutation(n)
    window = BUCKET_WINDOW_BATCHES * batch_size
    for start in range(0, n, window):
        chunk = order[start:start + window]
        if bucket_ids is not None:
            chunk = chunk[np.argsort(bucket_ids[chunk], kind="stable")]
        if labels is not None:
            chunk = class_interleaved(chunk, labels[chunk])
        order[start:start + window] = chunk
    return order


def class_interleaved(examples: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``examples`` [m] reordered so that every prefix holds each class in about its share.

    Each class keeps its own order; position k takes the next example of the class
    furthest behind its share, (k + 1)·share − taken. With 57.9 % "fresh" reviews a
    batch of 4 then holds 2 or 3 of them, never 0, 1 or 4.

    Why: on SmolLM2 + Rotten Tomatoes one direction of b carries ~74 % of each
    example's gradient energy, pushed one way by "fresh" reviews and the other way by
    "rotten" ones. A random batch of 4 has a random class count, so that direction
    swings with it and, through the zeroth-order estimate, into every direction's
    noise. Batches at the class shares cut the batch gradient's energy by ~40 % with
    the same expectation (each example still appears once per epoch), which lets a
    larger learning rate pay (docs/accuracy_experiments.md, session 12).
    """
    classes, counts = np.unique(labels, return_counts=True)
    by_class = [examples[labels == c] for c in classes]
    shares = counts / len(examples)
    taken = np.zeros(len(classes), dtype=np.int64)
    out = np.empty_like(examples)
    for k in range(len(examples)):
        behind = (k + 1) * shares - taken
        behind[taken >= counts] = -np.inf  # a class whose examples are used up
        c = int(np.argmax(behind))
        out[k] = by_class[c][taken[c]]
        taken[c] += 1
    return out


def next_batch(seed: int, epoch: int, position: int, n: int, batch_size: int,
               bucket_ids: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """Indices of the next batch and the sampler state after it.

    Shuffled epochs without replacement (class-interleaved when ``labels`` are
    given); an epoch's last incomplete batch is skipped (the step's batch size is
    fixed in the program).

    Returns:
        (indices [batch_size], epoch, position) after taking the batch.
    """
    if n < batch_size:
        raise InputError(f"the training split has {n} examples, fewer than the program's batch size {batch_size}")
    if position + batch_size > n:
        epoch, position = epoch + 1, 0
    buckets = None if bucket_ids is None else bucket_ids.astype(np.int64).tobytes()
    classes = None if labels is None else labels.astype(np.int64).tobytes()
    indices = _cached_epoch_order(seed, epoch, n, buckets, classes, batch_size)[position:position + batch_size]
    return indices.copy(), epoch, position + batch_size


@functools.lru_cache(maxsize=2)
def _cached_epoch_order(seed: int, epoch: int, n: int, bucket_bytes: bytes | None, label_bytes: bytes | None,
                        batch_size: int) -> np.ndarray:
    """`epoch_order` computed once per epoch rather than once per step (the key holds
    the bucket ids and labels as bytes, so a different split can never hit a stale order)."""
    bucket_ids = None if bucket_bytes is None else np.frombuffer(bucket_bytes, dtype=np.int64)
    labels = None if label_bytes is None else np.frombuffer(label_bytes, dtype=np.int64)
    order = epoch_order(seed, epoch, n, bucket_ids, batch_size, labels)
    order.flags.writeable = False
    return order


def initial_rng_state(seed: int) -> dict:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,)))).bit_generator.state


def draw_z(rng_state: dict, q: int, b_size: int) -> tuple[np.ndarray, dict]:
    """q directions z ~ N(0, I) [q, P] float32, and the generator state after drawing them."""
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = rng_state
    z = generator.standard_normal((q, b_size), dtype=np.float32)
    return z, generator.bit_generator.state


# -- files --------------------------------------------------------------------------


def save_checkpoint(out: Path, state: TrainState, identity: dict[str, str]) -> Path:
    """Write ``checkpoint.npz`` (authoritative) and ``checkpoint.json`` (readable copy), each atomically."""
    arrays = {"b": state.b.astype(np.float32)}
    if state.b_sum is not None:
        arrays["b_sum"] = state.b_sum.astype(np.float64)
    meta = {"format": CHECKPOINT_FORMAT, **identity,
            **{k: v for k, v in asdict(state).items() if k not in _ARRAY_FIELDS}}
    meta_text = json.dumps(meta, indent=2)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(meta_text), **arrays)
    path = out / "checkpoint.npz"
    write_bytes_atomic(path, buffer.getvalue())
    write_bytes_atomic(out / "checkpoint.json", meta_text.encode())
    return path


def load_checkpoint(out: Path, identity: dict[str, str]) -> TrainState:
    """Read ``<out>/checkpoint.npz``.

    Raises:
        InputError: no checkpoint, an unreadable one, or one written by another program.
    """
    path = out / "checkpoint.npz"
    if not path.exists():
        raise InputError(f"--resume: {path} does not exist (nothing to resume; drop --resume to start fresh)")
    try:
        with np.load(path, allow_pickle=False) as data:
            b = data["b"].astype(np.float32)
            b_sum = data["b_sum"].astype(np.float64) if "b_sum" in data.files else None
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a readable deftly checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {meta.get('format')!r}, this deftly reads {CHECKPOINT_FORMAT}")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise InputError(f"{path}: written by another program ({key} {str(meta.get(key))[:12]}…, this program "
                             f"has {value[:12]}…); resume with the program it was trained with")
    # Fields with defaults were added later (tail averaging); older checkpoints lack them.
    optional = {f.name for f in fields(TrainState) if f.default is not MISSING}
    try:
        values = {f.name: meta[f.name] for f in fields(TrainState)
                  if f.name not in _ARRAY_FIELDS and (f.name in meta or f.name not in optional)}
    except KeyError as exc:
        raise InputError(f"{path}: checkpoint lacks {exc}") from None
    if values.get("averaged_steps", 0) and b_sum is None:
        raise InputError(f"{path}: checkpoint lacks the tail sum b_sum of its {values['averaged_steps']} averaged steps")
    return TrainState(b=b, b_sum=b_sum, **values)


def _append_jsonl(path: Path, record: Event) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint: a killed run may have logged steps it never saved."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())


def write_adapter(program: Program, b: np.ndarray, adapter_dir: Path) -> None:
    """Write ``b`` as a standard PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    The tensors are keyed as PEFT's ``save_pretrained`` keys them: A [r, in] from the
    program's frozen A's, B [out, r] sliced from ``b``.
    """
    manifest = program.manifest
    a_by_path = program.load_lora_a()
    tensors: dict[str, np.ndarray] = {}
    for slot in manifest.b_layout:
        if slot.path not in a_by_path:
            raise InputError(f"{program.manifest_path}: the A file lacks {slot.path}")
        tensors[slot.peft_a_key] = a_by_path[slot.path]
        tensors[slot.peft_b_key] = b[slot.offset:slot.offset + slot.size].reshape(slot.shape).astype(np.float32)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    write_bytes_atomic(adapter_dir / "adapter_config.json", json.dumps(manifest.peft_config, indent=2).encode())
    # The classifier is argmax(verbalizer logits + class_bias): PEFT has no place for the
    # bias, so it travels beside the adapter.
    calibration = {"labels": manifest.labels, "verbalizer_token_ids": manifest.verbalizer_token_ids,
                   "class_bias": manifest.class_bias}
    write_bytes_atomic(adapter_dir / CALIBRATION_FILE, json.dumps(calibration, indent=2).encode())


# -- the run --------------------------------------------------------------------------


def run_training(cfg: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Train ``b`` with the program's ``step`` method; see the module docstring.

    Args:
        cfg: the run's settings.
        on_event: called with each event dict (progress bars, the agent's metric stream).
            An exception it raises (Ctrl-C included) stops the run after a checkpoint.

    Returns:
        The run's result; the files are under ``cfg.out``.

    Raises:
        InputError: a missing or altered program, bad settings, a fresh run over an
            existing checkpoint, or a resume without one / from another program.
    """
    emit = on_event or (lambda _event: None)

    # 1. parse
    if cfg.steps < 0 or cfg.eval_every < 0:
        raise InputError(f"steps ({cfg.steps}) and eval_every ({cfg.eval_every}) must not be negative")
    if cfg.average_from is not None and not 0 <= cfg.average_from < max(cfg.steps, 1):
        raise InputError(f"average_from {cfg.average_from}: must be at least 0 and below steps ({cfg.steps})")
    if cfg.schedule is not None and cfg.schedule not in SCHEDULES:
        raise InputError(f"schedule {cfg.schedule!r}: choose from {', '.join(SCHEDULES)}")
    if cfg.batches is not None and cfg.batches not in BATCH_ORDERS:
        raise InputError(f"batches {cfg.batches!r}: choose from {', '.join(BATCH_ORDERS)}")
    resolve_manifest_path(cfg.program)  # a clear error before any output directory is made
    out = Path(cfg.out)
    checkpoint_path, metrics_path, adapter_dir = out / "checkpoint.npz", out / "metrics.jsonl", out / "adapter"
    if not cfg.resume and checkpoint_path.exists():
        raise InputError(f"{out} already holds a run (checkpoint.npz); pass --resume to continue it "
                         f"or choose another --out")

    # 2. build
    program = Program(cfg.program, max_resident_methods=cfg.resident_methods)
    manifest = program.manifest
    splits = program.load_data()
    for name in ("train", "validation", "test"):
        if name not in splits:
            raise InputError(f"{manifest.file('data', program.manifest_path)}: no {name!r} split")
    train, validation, test = splits["train"], splits["validation"], splits["test"]
    if cfg.resume:
        state = load_checkpoint(out, program.identity)
        state.lr = cfg.lr if cfg.lr is not None else state.lr
        state.eps = cfg.eps if cfg.eps is not None else state.eps
        state.schedule = cfg.schedule or state.schedule
        state.batches = cfg.batches or state.batches
        if cfg.average_from is not None and cfg.average_from != state.average_from:
            if state.averaged_steps:
                raise InputError(f"{checkpoint_path}: this run averages from step {state.average_from} and has "
                                 f"already summed {state.averaged_steps} steps; resume without --average-from "
                                 f"or with {state.average_from}")
            state.average_from = cfg.average_from
        _truncate_metrics(metrics_path, state.step)
    else:
        state = TrainState(step=0, b=np.zeros(manifest.b_size, dtype=np.float32),
                           rng_state=initial_rng_state(cfg.seed), epoch=0, position=0,
                           lr=cfg.lr if cfg.lr is not None else manifest.lr,
                           eps=cfg.eps if cfg.eps is not None else manifest.eps,
                           schedule=cfg.schedule or "constant", seed=cfg.seed, average_from=cfg.average_from,
                           batches=cfg.batches or manifest.batches)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        metrics_path.unlink(missing_ok=True)  # left by a run killed before its first checkpoint
    process = psutil.Process()

    def evaluate(split: Split, name: str, limit: int | None, kind: str) -> Event:
        start = time.perf_counter()
        accuracy = program.accuracy(split, state.delivered_b(), limit)
        event = {"kind": kind, "step": state.step, "split": name, "accuracy": accuracy,
                 "examples": len(split) if limit is None else min(limit, len(split))}
        if state.averaged_steps:
            # Beside the mean, what the last iterate would have given (the case for averaging).
            event["averaged_steps"] = state.averaged_steps
            event["last_iterate_accuracy"] = program.accuracy(split, state.b, limit)
        return {**event, "seconds": time.perf_counter() - start}

    def validate() -> None:
        event = evaluate(validation, "validation", cfg.eval_limit, "eval")
        state.val_step, state.val_accuracy = state.step, event["accuracy"]
        if state.best_val_accuracy is None or event["accuracy"] > state.best_val_accuracy:
            state.best_val_accuracy = event["accuracy"]
        _append_jsonl(metrics_path, event)
        emit(event)

    saved_step = state.step if cfg.resume else -1

    def checkpoint() -> None:
        nonlocal saved_step
        path = save_checkpoint(out, state, program.identity)
        saved_step = state.step
        emit({"kind": "checkpoint", "step": state.step, "path": str(path)})

    # 3. run
    emit({"kind": "start", "step": state.step, "steps": cfg.steps, "resumed": cfg.resume, "lr": state.lr,
          "eps": state.eps, "schedule": state.schedule, "batches": state.batches, "average_from": state.average_from,
          "train_examples": len(train)})
    first_step = state.step
    # Index of the shortest length bucket that holds each training example.
    bucket_ids = np.searchsorted(np.array(program.buckets), train.lengths)  # [n]
    batch_labels = train.labels if state.batches == "stratified" else None  # [n] or None
    step_seconds: list[float] = []
    last_loss: float | None = None
    try:
        if not cfg.resume and cfg.eval_at_start and cfg.eval_every > 0:
            validate()
        elif cfg.eval_every and state.step and state.step % cfg.eval_every == 0 and state.val_step != state.step:
            validate()  # the run stopped between a step and its evaluation
        while state.step < cfg.steps:
            start = time.perf_counter()
            indices, epoch, position = next_batch(state.seed, state.epoch, state.position, len(train),
                                                  program.batch_size, bucket_ids, batch_labels)
            z, rng_state = draw_z(state.rng_state, program.q, program.b_size)
            lr = lr_at(state.step, state.lr, state.schedule, cfg.steps)
            b_new, loss, g = program.step(train.input_ids[indices], train.lengths[indices], train.labels[indices],
                                          state.b, z, lr, state.eps)
            # Commit: from here on this step is part of the state a checkpoint saves.
            state.b, state.rng_state, state.epoch, state.position = b_new, rng_state, epoch, position
            state.step += 1
            state.add_iterate()
            seconds = time.perf_counter() - start
            step_seconds.append(seconds)
            last_loss = loss
            event = {"kind": "step", "step": state.step, "loss": loss, "g_abs_mean": float(np.abs(g).mean()),
                     "seconds": seconds, "seq_len": program.bucket_for(int(train.lengths[indices].max())), "rss_mb": process.memory_info().rss / 2**20, "lr": lr}
            _append_jsonl(metrics_path, event)
            emit(event)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                validate()
                checkpoint()
    except BaseException:
        # Ctrl-C, a failing callback, a runtime fault: keep every completed step.
        if state.step > first_step:
            save_checkpoint(out, state, program.identity)
        raise

    # 4. clean up
    if state.val_step != state.step:
        validate()
        checkpoint()
    elif saved_step != state.step:
        checkpoint()
    test_event = evaluate(test, "test", cfg.test_limit, "test")
    _append_jsonl(metrics_path, test_event)
    emit(test_event)
    trained_b = state.delivered_b()
    write_adapter(program, trained_b, adapter_dir)
    emit({"kind": "done", "step": state.step, "adapter": str(adapter_dir)})
    return TrainResult(
        step=state.step, b=trained_b, last_loss=last_loss, val_accuracy=state.val_accuracy,
        best_val_accuracy=state.best_val_accuracy, test_accuracy=test_event["accuracy"],
        seconds_per_step=float(np.mean(step_seconds)) if step_seconds else None, out=out,
        adapter_dir=adapter_dir, metrics_path=metrics_path, checkpoint_path=checkpoint_path)
