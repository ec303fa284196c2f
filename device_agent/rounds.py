"""Rounds on a device: ``device_agent.trainer.Trainer`` driven a step at a time, saved after every step.

A round (``shared.protocol.StartRound``) gives the global ``b`` [P], lr, eps, a
seed, the round number and K. :class:`RoundRunner` hands them to the trainer
(``start_round``), which runs K steps of the program's block and leaves the
block's new slice in ``block_b``: the round's result. The trainer's seeded state
(z's generator, the sampler) carries on from one round to the next within a run
(``StartRound.run``); ``seed`` seeds it when a device starts on a program and rows
it has no state for in that run. So a second run from the same seed trains as the
first did, rather than going on from where the first left the batch order.

Resumable: after each step the trainer's state (``Trainer.to_bytes``) and the
round's bookkeeping go to ``round.npz`` in one atomic write. An agent killed
mid-round and asked for the same round again (the same values: the request's
``request_key``) restores the trainer from it and continues; it ends with the
same b as a round that ran in one go. After a round, the trainer's state moves
to the run's trainer file (`trainer_path`), so the next round continues its
sequence even after a restart.

Every method of :class:`RoundRunner` runs on the agent's compute thread. The
module itself imports no runtime (the server reads a checkpoint at start, before
any program is loaded); a runner exists only once a program is.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from shared.blocks import BlockSpan, program_block
from shared.errors import InputError
from shared.events import Step
from shared.files import write_bytes_atomic
from shared.protocol import ProtocolError, StartRound
from shared.task_data import Split

if TYPE_CHECKING:
    from device_agent.program import Program

ROUND_FORMAT = 3  # 3: RoundState.run


def trainer_path(directory: Path, run: str | None) -> Path:
    """Where the trainer's state between rounds of ``run`` lives (None: a desktop that names no run)."""
    return Path(directory) / ("trainer.npz" if run is None else f"trainer-{run}.npz")


def request_key(request: StartRound) -> str:
    """What makes two StartRound requests the same round (the request id does not)."""
    values = (request.round, request.program, request.k, request.lr, request.eps, request.seed, request.b_size,
              request.b, request.run)
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


@dataclass
class RoundState:
    """A round in progress, beside the trainer's own state."""

    key: str  # request_key of its StartRound
    round: int
    program: str  # sha256 of the program's manifest
    k: int
    data_key: str  # the rows it trains on
    start_step: int  # the trainer's step count when the round began
    run: str | None = None  # StartRound.run: whose trainer file the round's end state goes to
    step: int = 0  # steps of the round done
    seconds: float = 0.0  # device-clock seconds of those steps
    loss_sum: float = 0.0
    resumed_at: int = 0  # the step this run of it continued from (0: from the start)
    last_step: dict | None = None  # the last step's event, so its metric survives a kill before it is sent


class RoundRunner:
    """Runs rounds of one loaded program on one set of rows; see the module docstring."""

    def __init__(self, program: "Program", program_sha: str, rows: Split, data_key: str, directory: Path,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """
        Args:
            program: the loaded block program.
            program_sha: sha256 of its manifest.
            rows: training rows at the program's length (``device_agent.data.fit_to_program``).
            data_key: identifies the rows.
            directory: where ``round.npz`` and the trainer files (`trainer_path`) live.
            clock: the device clock a step is timed on (wall time, or a simulated clock).
        """
        from device_agent.trainer import Trainer  # imports the runtime, as the program did

        self._trainer_class = Trainer
        self.program, self.program_sha, self.rows, self.data_key = program, program_sha, rows, data_key
        self.directory = Path(directory)
        self.clock = clock
        self.span: BlockSpan = program_block(program.manifest)
        self.trainer: Trainer | None = None
        self._trainer_run: str | None = None  # the run whose sequence ``trainer`` holds

    def start(self, request: StartRound) -> RoundState:
        """The round's state: continued from ``round.npz`` if it is this round, else a new round.

        Raises:
            ProtocolError (wrong_model): b is not the size of this program's adapter.
        """
        if request.b_size != self.program.b_size:
            raise ProtocolError(f"round {request.round}: b has {request.b_size} values, the program's adapter "
                                f"has {self.program.b_size}", code="wrong_model")
        key = request_key(request)
        saved = load_round(self.directory)
        if saved is not None and (saved[0].key, saved[0].data_key) == (key, self.data_key):
            state, trainer_bytes = saved
            self.trainer = self._restore(trainer_bytes)
            if self.trainer is not None:
                self._trainer_run = state.run
                state.resumed_at = state.step
                return state
        if self.trainer is not None and self._trainer_run != request.run:
            self.trainer = None  # another run's sequence: not continued
        if self.trainer is None:
            self.trainer = self._restore_file(trainer_path(self.directory, request.run))
        if self.trainer is None:
            self.trainer = self._trainer_class.fresh(self.program, self.rows, seed=request.seed, clock=self.clock)
        self._trainer_run = request.run
        self.trainer.start_round(request.b_array(), lr=request.lr, eps=request.eps, round=request.round,
                                 steps=request.k)
        return RoundState(key=key, round=request.round, program=request.program, k=request.k,
                          data_key=self.data_key, start_step=self.trainer.state.step, run=request.run)

    def _restore(self, saved: bytes):
        try:
            return self._trainer_class.restore(self.program, self.rows, saved, clock=self.clock)
        except InputError:  # another program's or rows' state: start over
            return None

    def _restore_file(self, path: Path):
        return self._restore(path.read_bytes()) if path.exists() else None

    def step(self, state: RoundState) -> Step:
        """Run the round's next step and save the trainer and the round together."""
        event = replace(self.trainer.step(), ended_at=time.time())
        state.step = self.trainer.state.step - state.start_step
        state.seconds += event.seconds
        state.loss_sum += event.loss
        state.last_step = asdict(event)
        save_round(self.directory, state, self.trainer.to_bytes())
        return event

    @property
    def block_b(self) -> np.ndarray:
        """[P_blk] the block's slice of the round's b."""
        return self.trainer.block_b

    def finish(self, state: RoundState) -> None:
        """The round's result is safe elsewhere: keep the trainer's state for the next round, drop the round's."""
        settle_finished_round(self.directory, state, self.trainer.to_bytes())


# -- the checkpoint file ------------------------------------------------------------------


def save_round(directory: Path, state: RoundState, trainer_bytes: bytes) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps({"format": ROUND_FORMAT, **asdict(state)})),
             trainer=np.frombuffer(trainer_bytes, dtype=np.uint8))
    # No fsync each step (that is for power cuts); a killed process loses nothing written.
    write_bytes_atomic(Path(directory) / "round.npz", buffer.getvalue(), sync=False)


def load_round(directory: Path) -> tuple[RoundState, bytes] | None:
    """The round in progress and the trainer's saved state, or None (none, or unreadable: the round starts over)."""
    path = Path(directory) / "round.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            trainer_bytes = data["trainer"].tobytes()
        if meta.pop("format") != ROUND_FORMAT or set(meta) != {f.name for f in fields(RoundState)}:
            return None
        return RoundState(**meta), trainer_bytes
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard_round(directory: Path) -> None:
    (Path(directory) / "round.npz").unlink(missing_ok=True)


def settle_finished_round(directory: Path, state: RoundState, trainer_bytes: bytes) -> None:
    """The trainer's state to its run's file, other runs' dropped, the round's checkpoint discarded.

    :meth:`RoundRunner.finish` at a round's end, and the server at start for a round whose
    result was saved by an agent killed before it got here.
    """
    keep = trainer_path(directory, state.run)
    write_bytes_atomic(keep, trainer_bytes)
    for other in Path(directory).glob("trainer*.npz"):  # a device continues one run at a time
        if other != keep:
            other.unlink(missing_ok=True)
    discard_round(directory)
