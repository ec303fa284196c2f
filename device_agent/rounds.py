"""Rounds on a device: K steps of a block program from the global b, checkpointed after every step.

A round (``shared.protocol.StartRound``) gives the global ``b`` [P], lr, eps, a
seed, the round number and K. The device runs K steps of its block program
(``step(input_ids, lengths, labels, b [P], z [q, P_blk], lr, eps) -> (b_blk [P_blk], loss, g)``):
each step perturbs and updates only its block's slice, which is written back
into its copy of the global b, so the next step sees it. The round's result is
the block's slice.

Reproducible: z comes from a PCG64 generator seeded by (seed, round); the batch
order is ``device_agent.trainer``'s shuffled (or class-interleaved) epochs seeded
by ``seed``, continued across rounds from where the last finished round left it.
Resumable: after each step the round's state (its b, the generator, the sampler,
the device seconds so far) is written to ``round.npz``; an agent killed mid-round
and asked for the same round again continues from the last written step and
ends with the same b as a round that ran in one go.

Every method of :class:`RoundRunner` runs on the agent's compute thread. The
module itself imports no runtime (the server reads a checkpoint at start, before
any program is loaded); a runner exists only once a program is.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import psutil

from shared.blocks import BlockSpan, program_block
from shared.files import write_bytes_atomic
from shared.protocol import ProtocolError, StartRound
from shared.task_data import Split

if TYPE_CHECKING:
    from device_agent.program import Program

ROUND_FORMAT = 1


def request_key(request: StartRound) -> str:
    """What makes two StartRound requests the same round (the request id does not)."""
    values = (request.round, request.program, request.k, request.lr, request.eps, request.seed, request.b_size,
              request.b)
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def round_rng_state(seed: int, round_number: int) -> dict:
    """The state of the generator that draws a round's z."""
    return np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0, round_number))).state


@dataclass
class RoundState:
    """A round in progress: what a restarted agent needs to continue it exactly."""

    key: str  # request_key of its StartRound
    round: int
    program: str
    k: int
    lr: float
    eps: float
    seed: int
    data_key: str
    step: int  # steps done
    b: np.ndarray = field(repr=False)  # [P] the global b with the block's slice as the steps left it
    rng_state: dict = field(repr=False)
    epoch: int = 0
    position: int = 0
    seconds: float = 0.0  # device-clock seconds of the steps done
    loss_sum: float = 0.0
    resumed_at: int = 0  # the step this run of it continued from
    last_result: dict | None = None  # the last step's StepResult, so its metric survives a kill before it is sent


@dataclass
class StepResult:
    step: int
    loss: float
    g_abs_mean: float
    seconds: float  # device clock
    seq_len: int
    lr: float
    rss_mb: float
    peak_rss_mb: float | None
    ended_at: float  # Unix time at the step's end (wall clock, even when simulated)


def peak_rss_mb(process: psutil.Process) -> float | None:
    """The process's peak resident memory (Linux/macOS: getrusage; Windows: psutil's peak working set)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if psutil.MACOS else peak / 1024  # bytes on macOS, KiB on Linux
    except ImportError:
        info = process.memory_info()
        return getattr(info, "peak_wset", 0) / 2**20 or None


class RoundRunner:
    """Runs rounds of one loaded program on one set of rows; see the module docstring."""

    def __init__(self, program: "Program", program_sha: str, rows: Split, data_key: str, directory: Path,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """
        Args:
            program: the loaded block program.
            program_sha: sha256 of its manifest.
            rows: training rows at the program's length (``device_agent.data.fit_to_program``).
            data_key: identifies the rows (the sampler's position is kept per rows).
            directory: where ``round.npz`` and ``sampler.json`` live.
            clock: the device clock a step is timed on (wall time, or a simulated clock).
        """
        from device_agent import trainer  # the sampler and z draws; imports the runtime with the program

        self._next_batch, self._draw_z = trainer.next_batch, trainer.draw_z
        self.program, self.program_sha, self.rows, self.data_key = program, program_sha, rows, data_key
        self.directory = Path(directory)
        self.clock = clock
        self.span: BlockSpan = program_block(program.manifest)
        self._process = psutil.Process()
        self._bucket_ids = np.searchsorted(np.array(program.buckets), rows.lengths)  # [n] shortest bucket per row
        self._labels = rows.labels if program.manifest.batches == "stratified" else None

    # -- start ---------------------------------------------------------------------------

    def start(self, request: StartRound) -> RoundState:
        """The round's state: continued from its checkpoint if it is this round, else fresh.

        Raises:
            ProtocolError (wrong_model): b is not the size of this program's adapter.
        """
        if request.b_size != self.program.b_size:
            raise ProtocolError(f"round {request.round}: b has {request.b_size} values, the program's adapter "
                                f"has {self.program.b_size}", code="wrong_model")
        key = request_key(request)
        saved = load_round(self.directory)
        if saved is not None and saved.key == key and saved.data_key == self.data_key:
            saved.resumed_at = saved.step
            return saved
        epoch, position = self._sampler_position()
        return RoundState(key=key, round=request.round, program=request.program, k=request.k, lr=request.lr,
                          eps=request.eps, seed=request.seed, data_key=self.data_key, step=0,
                          b=request.b_array().copy(), rng_state=round_rng_state(request.seed, request.round),
                          epoch=epoch, position=position)

    def _sampler_position(self) -> tuple[int, int]:
        path = self.directory / "sampler.json"
        try:
            saved = json.loads(path.read_text())
            if saved["data_key"] == self.data_key:
                return int(saved["epoch"]), int(saved["position"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0, 0

    # -- one step ------------------------------------------------------------------------

    def step(self, state: RoundState) -> StepResult:
        """Run the round's next step, commit it to ``state`` and write the checkpoint."""
        program, rows, span = self.program, self.rows, self.span
        start = self.clock()
        indices, epoch, position = self._next_batch(state.seed, state.epoch, state.position, len(rows),
                                                    program.batch_size, self._bucket_ids, self._labels)
        z, rng_state = self._draw_z(state.rng_state, program.q, span.size)  # [q, P_blk]
        b_block, loss, g = program.step(rows.input_ids[indices], rows.lengths[indices], rows.labels[indices],
                                        state.b, z, state.lr, state.eps)
        seconds = self.clock() - start
        # Commit: the block's slice of the global b, then the generator and the sampler.
        state.b[span.offset:span.stop] = b_block
        state.rng_state, state.epoch, state.position = rng_state, epoch, position
        state.step += 1
        state.seconds += seconds
        state.loss_sum += loss
        result = StepResult(step=state.step, loss=loss, g_abs_mean=float(np.abs(g).mean()), seconds=seconds,
                            seq_len=program.bucket_for(int(rows.lengths[indices].max())), lr=state.lr,
                            rss_mb=self._process.memory_info().rss / 2**20, peak_rss_mb=peak_rss_mb(self._process),
                            ended_at=time.time())
        state.last_result = asdict(result)
        save_round(self.directory, state)
        return result

    # -- finish --------------------------------------------------------------------------

    def block_of(self, state: RoundState) -> np.ndarray:
        """[P_blk] the block's slice of the round's b."""
        return state.b[self.span.offset:self.span.stop].copy()

    def finish(self, state: RoundState) -> None:
        """The round's result is safe elsewhere: keep the sampler's position, drop the checkpoint."""
        write_bytes_atomic(self.directory / "sampler.json", json.dumps(
            {"data_key": self.data_key, "epoch": state.epoch, "position": state.position}).encode())
        discard_round(self.directory)


# -- the checkpoint file ------------------------------------------------------------------


def save_round(directory: Path, state: RoundState) -> None:
    meta = {"format": ROUND_FORMAT, **{k: v for k, v in asdict(state).items() if k != "b"}}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), b=state.b.astype(np.float32))
    # No fsync each step (that is for power cuts); a killed process loses nothing written.
    write_bytes_atomic(Path(directory) / "round.npz", buffer.getvalue(), sync=False)


def load_round(directory: Path) -> RoundState | None:
    """The checkpointed round, or None (none, or unreadable: then the round starts over)."""
    path = Path(directory) / "round.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            b = data["b"].astype(np.float32)
        if meta.pop("format") != ROUND_FORMAT:
            return None
        return RoundState(b=b, **meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard_round(directory: Path) -> None:
    (Path(directory) / "round.npz").unlink(missing_ok=True)
