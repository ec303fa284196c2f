"""P-RGE training with an exported program, one step at a time: `deftly train` and the agent's rounds.

Two faces over one step:

* :class:`Trainer` holds one loaded ``Program``, its training ``Split`` (the
  program's own data or a shard the desktop sent), the seeded state and the
  current global ``b``. It runs steps of the program's *block* and nothing else:
  no files, no evaluation. A device drives it a round at a time::

      trainer = Trainer.fresh(program, shard, seed=7)
      trainer.start_round(global_b, lr=lr, eps=eps, round=r, steps=k)
      trainer.run(should_stop=stop_requested, on_step=send_metric)  # stops at a step boundary
      reply(trainer.block_b)                                        # [P_blk] the block's new slice
      saved = trainer.to_bytes()  # Trainer.restore(program, shard, saved) continues bit-exactly

* :func:`run_training` is `deftly train`: ``run_training(TrainConfig(...), on_event=...)``
  reads top to bottom: 1. parse (``TrainConfig.check``, the program and the run
  directory; refuse a fresh run over an old checkpoint, and a resume from another
  program's checkpoint); 2. build (the program, its task data, the trainer, on
  resume from the checkpoint); 3. run (steps, a validation accuracy every
  ``eval_every`` steps, a checkpoint after each); 4. clean up (the final
  checkpoint, test accuracy, and the trained result as a standard PEFT adapter,
  ``<out>/adapter/``).

Blocks (``shared.blocks``): a program trains the block its manifest names
(``program_block``; every trainable layer when it names none). Each step draws
z [q, P_blk] of the block's size, gives the program the *global* b [P], and
writes the slice it returns into the global b. Today's whole-block programs
return the whole b, which is the same slice.

Reproducible and resumable exactly. Everything random comes from two seeded
numpy sources: z from one PCG64 generator whose state is saved, and the order of
training examples from a permutation per epoch seeded by (seed, epoch), so the
sampler's state is just (epoch, position). With ``batches="stratified"`` the
epoch's order interleaves the classes at their shares, so each batch holds about
the split's class mix (``class_interleaved``). A run of N steps and a run
interrupted at k and resumed to N give bit-identical ``b``; so do two rounds of k
steps and one run of 2k that carries b over, and a round saved midway and restored.

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

Events are the records of ``shared.events`` (``Start``, ``Step``, ``Eval``,
``Checkpoint``, ``Test``, ``Done``; their fields are documented there). ``on_event``
receives each; the Step, Eval and Test events are also the lines of
``<out>/metrics.jsonl``, written and read with ``shared.events``. A Step's
``seconds`` are the trainer's clock's (wall time unless the caller plugs in
another, as a simulated device does).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import sys
import time
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import psutil
from safetensors.numpy import save as safetensors_bytes

from device_agent.program import Program, resolve_manifest_path
from shared.blocks import check_global_b, layout_size, merge_b, program_block
from shared.calibration import CALIBRATION_FILE  # beside the PEFT adapter: labels, verbalizer ids, class bias
from shared.errors import InputError
from shared.events import Checkpoint, Done, Eval, Event, Start, Step, Test, append_events, event_from_line
from shared.files import write_bytes_atomic
from shared.manifest import BATCH_ORDERS
from shared.task_data import Split

SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_FORMAT = 1
_ARRAY_FIELDS = ("b", "b_sum")  # TrainState fields stored as arrays in checkpoint.npz, not in its JSON
Clock = Callable[[], float]  # seconds on a monotonic clock; a step lasts the difference of two readings


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
    # again, 0.3-1.1 s, when the length bucket or eval takes over); None or 0: keep all.
    resident_methods: int | None = 1
    # Tail averaging: from this step on, evaluate and deliver the mean of b over the
    # steps after it (None: the last b; on resume None keeps the checkpoint's setting).
    average_from: int | None = None
    # Validate and test (the program needs its eval methods). False: train, checkpoint
    # and write the adapter only, as with a device's block program, which has none.
    evaluate: bool = True

    def check(self) -> None:
        """Refuse settings no run could use, before anything is loaded or written.

        Raises:
            InputError: naming the setting and what it must be.
        """
        if self.steps < 0 or self.eval_every < 0:
            raise InputError(f"steps ({self.steps}) and eval_every ({self.eval_every}) must not be negative")
        if self.average_from is not None and not 0 <= self.average_from < max(self.steps, 1):
            raise InputError(f"average_from {self.average_from}: must be at least 0 and below steps ({self.steps})")
        check_schedule(self.schedule)
        check_batches(self.batches)
        check_seed(self.seed)
        check_rates(self.lr, self.eps)
        for name in ("eval_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} {value}: must be at least 1 (None: the whole split)")
        if self.resident_methods is not None and self.resident_methods < 0:
            raise InputError(f"resident_methods {self.resident_methods}: must be 1 or more (0 or None: keep all)")


def check_schedule(schedule: str | None) -> None:
    if schedule is not None and schedule not in SCHEDULES:
        raise InputError(f"schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")


def check_batches(batches: str | None) -> None:
    if batches is not None and batches not in BATCH_ORDERS:
        raise InputError(f"batches {batches!r}: choose from {', '.join(BATCH_ORDERS)}")


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed {seed!r}: must be an integer of 0 or more")


def check_rates(lr: float | None, eps: float | None, where: str = "") -> None:
    """``lr`` finite and >= 0, ``eps`` finite and > 0 (None: not given, nothing to check)."""
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise InputError(f"{where}lr {lr}: must be a finite number of 0 or more")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise InputError(f"{where}eps {eps}: must be a finite number above 0 (the perturbation divides by it)")


@dataclass
class TrainResult:
    """What a finished run leaves behind, and its headline numbers."""

    step: int  # steps done in total (including those before a resume)
    b: np.ndarray = field(repr=False)  # [P] the trained B's: the tail average when averaging, else the last b
    last_loss: float | None  # loss of the last step run in this call (None if none ran)
    val_accuracy: float | None  # at the last evaluation
    best_val_accuracy: float | None
    test_accuracy: float | None  # None when the run did not evaluate
    seconds_per_step: float | None  # mean of the steps run in this call, on the trainer's clock
    out: Path
    adapter_dir: Path
    metrics_path: Path
    checkpoint_path: Path


# Examples are grouped by length bucket within windows of this many batches: batches
# come out nearly length-homogeneous (so most run at a short bucket) while the order
# stays shuffled at the scale of an epoch. The window is small so that every round of
# a few steps runs about the epoch's mix of lengths, which the planner predicts (a
# round of 10 steps inside a window of 64 batches is all short or all long). Measured
# on Rotten Tomatoes' training split with the SmolLM2 tokenizer (bs 4, buckets 32/64,
# shuffled; 58.5 % of examples fit 32 tokens): the share of batches at T=32 and the
# standard deviation of that share over rounds of 10 steps were, by window,
#   1 (no grouping): 0.12, 0.10;  4: 0.49, 0.12;  8: 0.54, 0.11;  16: 0.56, 0.22;  64: 0.58, 0.44
# (stratified: 8 gives 0.48, 0.12; a device's third of the split: 0.54, 0.12).
# 8 keeps 93 % of the short steps of 64 with a quarter of its spread per round.
BUCKET_WINDOW_BATCHES = 8
# The window of checkpoints written before the state recorded it.
LEGACY_BUCKET_WINDOW_BATCHES = 64


@dataclass
class TrainState:
    """Everything a resumed run or a restarted round needs; committed only after a step has completed."""

    step: int  # steps completed
    b: np.ndarray  # [P] float32, the global b (the program's block is one slice of it)
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
    total_steps: int | None = None  # the steps a decaying schedule decays over (None: constant only)
    round: int | None = None  # the round in progress (None: not training rounds)
    round_end: int | None = None  # the step the round ends at
    # Batches per length-bucket window of the order (`epoch_order`); checkpoints written
    # before it was recorded used the legacy window, and resume to the order they were written with.
    bucket_window: int = LEGACY_BUCKET_WINDOW_BATCHES

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




def epoch_order(seed: int, epoch: int, n: int, bucket_ids: np.ndarray | None = None,
                batch_size: int = 1, labels: np.ndarray | None = None,
                window_batches: int = BUCKET_WINDOW_BATCHES) -> np.ndarray:
    """The training examples' order in one epoch: a permutation seeded by (seed, epoch).

    With ``bucket_ids`` ([n], the length bucket of each example), each window of
    ``window_batches`` batches is stably sorted by bucket. With ``labels`` ([n]),
    each window's classes are then interleaved at their shares of the window
    (``class_interleaved``), so every batch holds each class in about its share.
    """
    # spawn_key keeps this stream apart from the z generator's, which has spawn_key (0,).
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, epoch))).permutation(n)
    if window_batches < 1:
        raise InputError(f"the length-bucket window must be at least one batch, got {window_batches}")
    window = window_batches * batch_size
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
               bucket_ids: np.ndarray | None = None, labels: np.ndarray | None = None,
               window_batches: int = BUCKET_WINDOW_BATCHES) -> tuple[np.ndarray, int, int]:
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
    indices = _cached_epoch_order(seed, epoch, n, buckets, classes, batch_size,
                                  window_batches)[position:position + batch_size]
    return indices.copy(), epoch, position + batch_size


@functools.lru_cache(maxsize=2)
def _cached_epoch_order(seed: int, epoch: int, n: int, bucket_bytes: bytes | None, label_bytes: bytes | None,
                        batch_size: int, window_batches: int) -> np.ndarray:
    """`epoch_order` computed once per epoch rather than once per step (the key holds
    the bucket ids and labels as bytes, so a different split can never hit a stale order)."""
    bucket_ids = None if bucket_bytes is None else np.frombuffer(bucket_bytes, dtype=np.int64)
    labels = None if label_bytes is None else np.frombuffer(label_bytes, dtype=np.int64)
    order = epoch_order(seed, epoch, n, bucket_ids, batch_size, labels, window_batches)
    order.flags.writeable = False
    return order


def bucket_ids_of(buckets: Sequence[int], lengths: np.ndarray) -> np.ndarray:
    """[n] index of the shortest of ``buckets`` (ascending) that holds each of ``lengths`` [n]."""
    return np.searchsorted(np.asarray(buckets), lengths)


def step_lengths(train: Split, buckets: Sequence[int], batch_size: int, steps: int, *, seed: int = 0,
                 batches: str = "shuffled", window_batches: int = BUCKET_WINDOW_BATCHES) -> np.ndarray:
    """The length bucket each of the first ``steps`` steps of a fresh trainer runs at, without running it.

    The trainer's own batch order (`next_batch`, from epoch 0, position 0, as
    `Trainer.fresh` starts) over ``train``: what a device training ``steps`` steps on
    it will run, so the desktop can predict the mix of step lengths exactly.

    Args:
        train: the split the device trains on.
        buckets: the program's step lengths, ascending (``Program.buckets``: the
            shorter buckets and the full length).
        batch_size: the program's.
        steps: how many steps.
        seed: the trainer's seed.
        batches: its batch order (BATCH_ORDERS).
        window_batches: its length-bucket window.

    Returns:
        [steps] int64 sequence lengths.
    """
    check_batches(batches)
    buckets = np.asarray(sorted(buckets))
    ids = bucket_ids_of(buckets, train.lengths)  # [n]
    labels = train.labels if batches == "stratified" else None
    out = np.empty(steps, dtype=np.int64)
    epoch = position = 0
    for step in range(steps):
        indices, epoch, position = next_batch(seed, epoch, position, len(train), batch_size, ids, labels,
                                              window_batches)
        out[step] = buckets[ids[indices].max()]  # the shortest bucket that holds the batch's longest row
    return out


def initial_rng_state(seed: int) -> dict:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,)))).bit_generator.state


def draw_z(rng_state: dict, q: int, b_size: int) -> tuple[np.ndarray, dict]:
    """q directions z ~ N(0, I) [q, P] float32, and the generator state after drawing them."""
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = rng_state
    z = generator.standard_normal((q, b_size), dtype=np.float32)
    return z, generator.bit_generator.state


# -- the step-by-step trainer ------------------------------------------------------


class Trainer:
    """One loaded program training its block of the global ``b``, a step at a time.

    Holds the program (kept loaded between rounds), the training split, the seeded
    :class:`TrainState` and the trainer's clock. It never evaluates and writes no
    file of its own: `run_training` and the device agent do that around it.
    Between two steps the state is whole, so a caller may pause there, save it
    (:meth:`to_bytes`, :meth:`save`) or stop.

    Attributes:
        program: the loaded program.
        train: the training split its batches come from.
        state: the seeded state and the current global b; committed after each step.
        span: the block the program trains (``shared.blocks.program_block``).
        clock: what a step's ``seconds`` are measured on.
    """

    def __init__(self, program: Program, train: Split, state: TrainState, *, clock: Clock = time.perf_counter) -> None:
        """Wrap a program, its training split and a state (see :meth:`fresh` and :meth:`restore`).

        Raises:
            InputError: a split the program cannot take, or a state that does not fit it.
        """
        check_split(train, program, "the training split")
        self.program = program
        self.train = train
        self.span = program_block(program.manifest)
        self.clock = clock
        state.b = check_global_b(state.b, program.manifest.b_layout, "the trainer state's b")
        check_schedule(state.schedule)
        check_batches(state.batches)
        if state.schedule != "constant" and state.total_steps is None:
            raise InputError(f"schedule {state.schedule!r} decays over total_steps, which the state lacks")
        self.state = state
        # Index of the shortest length bucket that holds each training example.
        self._bucket_ids = bucket_ids_of(program.buckets, train.lengths)  # [n]
        self._process = psutil.Process()

    @classmethod
    def fresh(cls, program: Program, train: Split, *, seed: int = 0, lr: float | None = None,
              eps: float | None = None, schedule: str = "constant", batches: str | None = None,
              average_from: int | None = None, total_steps: int | None = None,
              clock: Clock = time.perf_counter) -> "Trainer":
        """A trainer at step 0 with b = 0 and the generators seeded by ``seed``.

        Args:
            program: the loaded program.
            train: its training split, or a data shard.
            seed: seeds z and the order of training examples.
            lr, eps: None: the manifest's suggestions.
            schedule: one of SCHEDULES; a decaying one needs ``total_steps``.
            batches: one of BATCH_ORDERS; None: the manifest's suggestion.
            average_from: tail averaging after this step (None: off).
            total_steps: the steps a decaying schedule decays over.
            clock: what a step's seconds are measured on (default wall time).

        Raises:
            InputError: a bad setting, or a split the program cannot take.
        """
        check_seed(seed)
        check_rates(lr, eps)
        manifest = program.manifest
        state = TrainState(step=0, b=np.zeros(layout_size(manifest.b_layout), dtype=np.float32),
                           rng_state=initial_rng_state(seed), epoch=0, position=0,
                           lr=float(manifest.lr if lr is None else lr), eps=float(manifest.eps if eps is None else eps),
                           schedule=schedule, seed=seed, average_from=average_from,
                           batches=batches or manifest.batches, total_steps=total_steps,
                           bucket_window=BUCKET_WINDOW_BATCHES)
        return cls(program, train, state, clock=clock)

    @classmethod
    def restore(cls, program: Program, train: Split, saved: bytes | str | Path, *,
                clock: Clock = time.perf_counter) -> "Trainer":
        """The trainer that :meth:`to_bytes` or :meth:`save` saved, to continue exactly where it stopped.

        Args:
            program: the same program, loaded again.
            train: the same split (its contents are checked against the saved fingerprint).
            saved: the bytes, or the file they were saved to.

        Raises:
            InputError: unreadable bytes, or a state saved with another program or split.
        """
        where = str(saved) if isinstance(saved, (str, Path)) else "the saved trainer state"
        if isinstance(saved, (str, Path)):
            try:
                saved = Path(saved).read_bytes()
            except OSError as exc:
                raise InputError(f"{where}: cannot read ({exc.strerror})") from None
        state = decode_state(saved, trainer_identity(program, train), where)
        return cls(program, train, state, clock=clock)

    # -- what it holds ------------------------------------------------------------

    @property
    def b(self) -> np.ndarray:
        """[P] a copy of the current global b."""
        return self.state.b.copy()

    @property
    def block_b(self) -> np.ndarray:
        """[P_blk] a copy of the block's slice of the current b: what a round returns."""
        return self.state.b[self.span.offset:self.span.stop].copy()

    @property
    def steps_left(self) -> int:
        """Steps until the round in progress ends (0 when it is done, or none was started)."""
        if self.state.round_end is None:
            return 0
        return max(self.state.round_end - self.state.step, 0)

    @functools.cached_property
    def identity(self) -> dict[str, str]:
        """The program's identity and the training split's fingerprint: what a saved state must match."""
        return trainer_identity(self.program, self.train)

    # -- rounds and steps -------------------------------------------------------------

    def start_round(self, b: np.ndarray, *, lr: float, eps: float, round: int, steps: int) -> None:
        """Begin a round: train ``steps`` steps of the block from the global ``b``.

        The seeded state (z's generator, the sampler, the step count) carries on from
        the last round, so rounds continue one sequence of directions and batches.
        The round's ``lr`` holds for each of its steps (the coordinator schedules
        across rounds).

        Args:
            b: [P] the global b the round starts from (every device's last merged slices).
            lr, eps: this round's learning rate and perturbation size.
            round: the round's number, carried by its Step events.
            steps: K, the round's steps.

        Raises:
            InputError: a b of the wrong size or with non-finite values, or a bad number.
        """
        where = f"round {round}: "
        for name, value in (("round", round), ("steps", steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InputError(f"{where}{name} {value!r}: must be an integer of 0 or more")
        check_rates(lr, eps, where)
        state = self.state
        state.b = check_global_b(b, self.program.manifest.b_layout, f"{where}b").copy()
        state.lr, state.eps, state.schedule = float(lr), float(eps), "constant"
        state.round, state.round_end = round, state.step + steps

    def step(self) -> Step:
        """One P-RGE step of the block, committed to the state.

        Returns:
            The step's event (``step`` 1-based after it; ``seconds`` on the trainer's clock).

        Raises:
            InputError: the step diverged (non-finite b), or the program returned a
                slice of another size than its block.
        """
        state, program, train = self.state, self.program, self.train
        start = self.clock()
        labels = train.labels if state.batches == "stratified" else None  # [n] or None
        indices, epoch, position = next_batch(state.seed, state.epoch, state.position, len(train),
                                              program.batch_size, self._bucket_ids, labels, state.bucket_window)
        z, rng_state = draw_z(state.rng_state, program.q, self.span.size)  # [q, P_blk]
        lr = lr_at(state.step, state.lr, state.schedule, state.total_steps or 0)
        lengths = train.lengths[indices]  # [bs]
        # The program takes the global b and returns its block's slice (today's whole-block
        # programs: the whole b, the same slice).
        b_block, loss, g = program.step(train.input_ids[indices], lengths, train.labels[indices],
                                        state.b, z, lr, state.eps)  # [P_blk], float, [q]
        if not np.all(np.isfinite(b_block)):
            raise InputError(f"step {state.step + 1} diverged: the program returned non-finite B's (loss {loss}, "
                             f"lr {lr:g}, eps {state.eps:g}); train again with a smaller lr")
        b_new = merge_b(state.b, program.manifest.b_layout, {self.span: b_block})  # [P]
        # Commit: from here on this step is part of the state that is saved.
        state.b, state.rng_state, state.epoch, state.position = b_new, rng_state, epoch, position
        state.step += 1
        state.add_iterate()
        seconds = self.clock() - start
        return Step(step=state.step, loss=float(loss), g_abs_mean=float(np.abs(g).mean()), seconds=float(seconds),
                    seq_len=program.bucket_for(int(lengths.max())), rss_mb=self._process.memory_info().rss / 2**20,
                    lr=float(lr), peak_rss_mb=peak_rss_mb(), round=state.round)

    def run(self, steps: int | None = None, *, should_stop: Callable[[], bool] | None = None,
            on_step: Callable[[Step], None] | None = None) -> list[Step]:
        """Run ``steps`` steps (None: the rest of the round), stopping early at a step boundary.

        Args:
            steps: how many; None: until the round in progress ends.
            should_stop: asked before each step; True stops there, after every completed step.
            on_step: called with each step's event once the step is committed (an
                exception it raises goes on, and the step stays done).

        Returns:
            The events of the steps run.

        Raises:
            InputError: ``steps`` None with no round started, or negative.
        """
        if steps is None:
            if self.state.round_end is None:
                raise InputError("run(): no round in progress; call start_round first or give a number of steps")
            steps = self.steps_left
        if steps < 0:
            raise InputError(f"run(): steps {steps} must not be negative")
        events: list[Step] = []
        for _ in range(steps):
            if should_stop is not None and should_stop():
                break
            events.append(self.step())
            if on_step is not None:
                on_step(events[-1])
        return events

    # -- saving -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole state as bytes (an ``.npz``); :meth:`restore` continues from it exactly."""
        return encode_state(self.state, self.identity)[0]

    def save(self, path: Path) -> None:
        """:meth:`to_bytes`, written to ``path`` atomically."""
        write_bytes_atomic(Path(path), self.to_bytes())


def check_split(split: Split, program: Program, where: str) -> None:
    """A split the program's step can take: [n, seq_len] rows, n >= batch_size, lengths and labels in range.

    Raises:
        InputError: naming what does not fit.
    """
    n, T = len(split), program.seq_len
    if split.input_ids.ndim != 2 or split.input_ids.shape != (n, T):
        raise InputError(f"{where}: input_ids of shape {tuple(split.input_ids.shape)}, the program takes [{n}, {T}]")
    if split.lengths.shape != (n,):
        raise InputError(f"{where}: lengths of shape {tuple(split.lengths.shape)}, expected [{n}]")
    if n < program.batch_size:
        raise InputError(f"{where} has {n} examples, fewer than the program's batch size {program.batch_size}")
    if split.lengths.min() < 1 or split.lengths.max() > T:
        raise InputError(f"{where}: a row's length is outside 1..{T}")
    classes = len(program.manifest.labels)
    if split.labels.min() < 0 or split.labels.max() >= classes:
        raise InputError(f"{where}: a label is outside 0..{classes - 1} (the program has {classes} classes)")


def split_sha256(split: Split) -> str:
    """Hex sha256 of a split's arrays: tells one training split (or shard) from another."""
    digest = hashlib.sha256()
    for array in (split.input_ids, split.lengths, split.labels):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def trainer_identity(program: Program, train: Split) -> dict[str, str]:
    return {**program.identity, "train_sha256": split_sha256(train)}


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, MiB (None where the system does not say)."""
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return None if peak is None else peak / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- files --------------------------------------------------------------------------


def encode_state(state: TrainState, identity: dict[str, str]) -> tuple[bytes, str]:
    """The state as ``.npz`` bytes (b, b_sum and the rest as JSON) and that JSON, for people to read."""
    arrays = {"b": state.b.astype(np.float32)}
    if state.b_sum is not None:
        arrays["b_sum"] = state.b_sum.astype(np.float64)
    meta = {"format": CHECKPOINT_FORMAT, **identity,
            **{k: v for k, v in asdict(state).items() if k not in _ARRAY_FIELDS}}
    meta_text = json.dumps(meta, indent=2)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(meta_text), **arrays)
    return buffer.getvalue(), meta_text


def decode_state(data: bytes, identity: dict[str, str], where: str) -> TrainState:
    """The state :func:`encode_state` wrote.

    Raises:
        InputError: unreadable bytes, another format, or a state written under another identity.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            b = npz["b"].astype(np.float32)
            b_sum = npz["b_sum"].astype(np.float64) if "b_sum" in npz.files else None
            meta = json.loads(str(npz["meta"]))
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{where}: not a readable deftly checkpoint ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise InputError(f"{where}: checkpoint format {version!r}, this deftly reads {CHECKPOINT_FORMAT}")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise InputError(f"{where}: written by another program or data ({key} {str(meta.get(key))[:12]}…, "
                             f"this one has {value[:12]}…); resume with the program and data it was trained with")
    # Fields with defaults were added later (tail averaging, rounds); older checkpoints lack them.
    optional = {f.name for f in fields(TrainState) if f.default is not MISSING}
    try:
        values = {f.name: meta[f.name] for f in fields(TrainState)
                  if f.name not in _ARRAY_FIELDS and (f.name in meta or f.name not in optional)}
    except KeyError as exc:
        raise InputError(f"{where}: checkpoint lacks {exc}") from None
    if values.get("averaged_steps", 0) and b_sum is None:
        raise InputError(f"{where}: checkpoint lacks the tail sum b_sum of its {values['averaged_steps']} averaged steps")
    return TrainState(b=b, b_sum=b_sum, **values)


def save_checkpoint(out: Path, state: TrainState, identity: dict[str, str]) -> Path:
    """Write ``checkpoint.npz`` (authoritative) and ``checkpoint.json`` (readable copy), each atomically."""
    data, meta_text = encode_state(state, identity)
    path = out / "checkpoint.npz"
    write_bytes_atomic(path, data)
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
    return decode_state(path.read_bytes(), identity, str(path))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint: a killed run may have logged steps it never saved.

    A last line cut short by the kill is dropped too; any other line that is not an
    event is an InputError naming it.
    """
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept: list[str] = []  # as written, byte for byte
    for number, line in enumerate(lines, start=1):
        try:
            event = event_from_line(line, where=f"{path}:{number}")
        except InputError:
            if number < len(lines):
                raise
            break
        if event.step <= step:
            kept.append(line)
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
        tensors[slot.peft_a_key] = np.ascontiguousarray(a_by_path[slot.path])
        tensors[slot.peft_b_key] = b[slot.offset:slot.offset + slot.size].reshape(slot.shape).astype(np.float32)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    # safetensors' own writer, to bytes, so the file is written atomically and synced like every other.
    write_bytes_atomic(adapter_dir / "adapter_model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
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
        on_event: called with each ``shared.events`` record (progress bars, the agent's
            metric stream). An exception it raises (Ctrl-C included) stops the run after
            a checkpoint.

    Returns:
        The run's result; the files are under ``cfg.out``.

    Raises:
        InputError: a missing or altered program, bad settings, evaluation asked of a
            program that cannot evaluate, a fresh run over an existing checkpoint, or a
            resume without one / from another program.
    """
    emit = on_event or (lambda _event: None)

    # 1. parse
    cfg.check()
    resolve_manifest_path(cfg.program)  # a clear error before any output directory is made
    out = Path(cfg.out)
    checkpoint_path, metrics_path, adapter_dir = out / "checkpoint.npz", out / "metrics.jsonl", out / "adapter"
    if not cfg.resume and checkpoint_path.exists():
        raise InputError(f"{out} already holds a run (checkpoint.npz); pass --resume to continue it "
                         f"or choose another --out")

    # 2. build
    trainer, splits = build_trainer(cfg, out)
    program, state, train = trainer.program, trainer.state, trainer.train
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        truncate_metrics(metrics_path, state.step)
    else:
        metrics_path.unlink(missing_ok=True)  # left by a run killed before its first checkpoint

    def validate() -> None:
        event = accuracy_event(program, splits["validation"], state, cfg.eval_limit, Eval, "validation")
        record_validation(state, event)
        append_events(metrics_path, [event])
        emit(event)

    def checkpoint() -> int:
        emit(Checkpoint(step=state.step, path=str(save_checkpoint(out, state, program.identity))))
        return state.step

    # 3. run
    emit(Start(step=state.step, steps=cfg.steps, resumed=cfg.resume, lr=state.lr, eps=state.eps,
               schedule=state.schedule, batches=state.batches, average_from=state.average_from,
               train_examples=len(train)))
    first_step = state.step
    saved_step = state.step if cfg.resume else -1
    step_seconds: list[float] = []
    last_loss: float | None = None
    try:
        if cfg.evaluate and not cfg.resume and cfg.eval_at_start and cfg.eval_every > 0:
            validate()
        elif (cfg.evaluate and cfg.eval_every and state.step and state.step % cfg.eval_every == 0
              and state.val_step != state.step):
            validate()  # the run stopped between a step and its evaluation
        while state.step < cfg.steps:
            event = trainer.step()
            step_seconds.append(event.seconds)
            last_loss = event.loss
            append_events(metrics_path, [event])
            emit(event)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                if cfg.evaluate:
                    validate()
                saved_step = checkpoint()
    except BaseException:
        # Ctrl-C, a failing callback, a runtime fault: keep every completed step.
        if state.step > first_step:
            save_checkpoint(out, state, program.identity)
        raise

    # 4. clean up
    if cfg.evaluate and state.val_step != state.step:
        validate()
        checkpoint()
    elif saved_step != state.step:
        checkpoint()
    test_accuracy = None
    if cfg.evaluate:
        test_event = accuracy_event(program, splits["test"], state, cfg.test_limit, Test, "test")
        append_events(metrics_path, [test_event])
        emit(test_event)
        test_accuracy = test_event.accuracy
    trained_b = state.delivered_b()
    write_adapter(program, trained_b, adapter_dir)
    emit(Done(step=state.step, adapter=str(adapter_dir)))
    return TrainResult(
        step=state.step, b=trained_b, last_loss=last_loss, val_accuracy=state.val_accuracy,
        best_val_accuracy=state.best_val_accuracy, test_accuracy=test_accuracy,
        seconds_per_step=float(np.mean(step_seconds)) if step_seconds else None, out=out,
        adapter_dir=adapter_dir, metrics_path=metrics_path, checkpoint_path=checkpoint_path)


def build_trainer(cfg: TrainConfig, out: Path) -> tuple[Trainer, dict[str, Split]]:
    """The run's program, its task splits and its trainer: fresh, or from ``out``'s checkpoint.

    Raises:
        InputError: an altered program, evaluation asked of one that cannot evaluate,
            a split missing, or a checkpoint missing or from another program.
    """
    program = Program(cfg.program, max_resident_methods=cfg.resident_methods or None)
    if cfg.evaluate:
        check_can_evaluate(program)
    splits = program.load_data()
    for name in ("train", "validation", "test") if cfg.evaluate else ("train",):
        if name not in splits:
            raise InputError(f"{program.manifest.file('data', program.manifest_path)}: no {name!r} split")
    if cfg.resume:
        return Trainer(program, splits["train"], resumed_state(cfg, load_checkpoint(out, program.identity))), splits
    trainer = Trainer.fresh(program, splits["train"], seed=cfg.seed, lr=cfg.lr, eps=cfg.eps,
                            schedule=cfg.schedule or "constant", batches=cfg.batches,
                            average_from=cfg.average_from, total_steps=cfg.steps)
    return trainer, splits


def check_can_evaluate(program: Program) -> None:
    """A program evaluates with its eval methods; a device's block program has none.

    Raises:
        InputError: naming the missing methods and the way out.
    """
    missing = sorted(set(program.eval_buckets.values()) - set(program.manifest.methods))
    if missing:
        raise InputError(f"{program.manifest_path}: the program has no {', '.join(missing)} method (it has "
                         f"{', '.join(program.manifest.methods)}), so it cannot evaluate; train without evaluation "
                         f"(evaluate=False, `deftly train --no-eval`) or export it with --methods step,eval")


def resumed_state(cfg: TrainConfig, state: TrainState) -> TrainState:
    """A checkpoint's state with the settings ``cfg`` overrides (None keeps the checkpoint's).

    Raises:
        InputError: a change of ``average_from`` after averaging has begun.
    """
    state.lr = cfg.lr if cfg.lr is not None else state.lr
    state.eps = cfg.eps if cfg.eps is not None else state.eps
    state.schedule = cfg.schedule or state.schedule
    state.batches = cfg.batches or state.batches
    state.total_steps = cfg.steps
    if cfg.average_from is not None and cfg.average_from != state.average_from:
        if state.averaged_steps:
            raise InputError(f"{cfg.out / 'checkpoint.npz'}: this run averages from step {state.average_from} and "
                             f"has already summed {state.averaged_steps} steps; resume without --average-from "
                             f"or with {state.average_from}")
        state.average_from = cfg.average_from
    return state


def accuracy_event(program: Program, split: Split, state: TrainState, limit: int | None,
                   kind: type[Eval] | type[Test], name: str) -> Eval | Test:
    """Accuracy of the delivered b on the first ``limit`` rows of ``split`` (wall seconds)."""
    start = time.perf_counter()
    accuracy = program.accuracy(split, state.delivered_b(), limit)
    averaged: dict[str, float | int] = {}
    if state.averaged_steps:
        # Beside the mean, what the last iterate would have given (the case for averaging).
        averaged = {"averaged_steps": state.averaged_steps,
                    "last_iterate_accuracy": program.accuracy(split, state.b, limit)}
    return kind(step=state.step, split=name, accuracy=accuracy,
                examples=len(split) if limit is None else min(limit, len(split)),
                seconds=time.perf_counter() - start, **averaged)


def record_validation(state: TrainState, event: Eval) -> None:
    """Keep the last and best validation accuracy in the state (they are checkpointed)."""
    state.val_step, state.val_accuracy = state.step, event.accuracy
    if state.best_val_accuracy is None or event.accuracy > state.best_val_accuracy:
        state.best_val_accuracy = event.accuracy
