"""The desktop-agent wire protocol: typed messages, one encoder, one decoder.

One WebSocket per agent (``shared.protocol_limits.WS_PATH``). The pairing token,
the protocol version and the desktop's id travel in the opening handshake's
headers (``TOKEN_HEADER``, ``PROTOCOL_HEADER``, ``DESKTOP_HEADER``), so a wrong
token is refused with HTTP 401 before any frame. After it:

* **text frames** are JSON objects ``{"type": ..., "v": PROTOCOL_VERSION, <fields>}``,
  one message each (the classes below; ``type`` names the class on the wire);
* **binary frames** are file chunks: a fixed 64-byte header (:data:`CHUNK_HEADER`:
  magic, version, offset, total size, payload length, the payload's CRC-32 and
  the sha256 of the whole file) followed by the payload bytes (≤ ``CHUNK_BYTES``).

A conversation (D = desktop, A = agent)::

    D Hello ─────────────► A Welcome            who the agent is, where it stopped
    D Offer(file) ───────► A OfferReply(have)   bytes it already holds (== size: nothing to send)
    D chunk …  ──────────► A ChunkAck(have)     per chunk; the last one verifies the sha256
    D DataShard(file) ───► A DataReady          a stored .npz becomes the training data
    D StartRound ────────► A Status(training)   paced at its link_bytes_per_s, if given; then, as the round runs:
                           A StepMetrics …      one Metric per step, numbered (seq)
                           A RoundDone          the block's new b, numbered in the same sequence (paced likewise)
    D Ack(seq) ──────────► A                    everything up to seq is safe on the desktop
    D Pause/Resume/Stop ─► A Status             at the next step boundary
    D ProfileRequest ────► A ProfileResponse
                           A Error              for any request (``reply_to``) or none

Requests carry an ``id`` chosen by the desktop; every answer names it in
``reply_to``. Metrics and round results share one sequence number: the agent
keeps each until an ``Ack`` covers it and replays the rest after a reconnect,
so nothing the desktop has not acknowledged is ever lost.

Decoding is strict: malformed JSON, an unknown ``type``, a missing, unknown or
mistyped field, a value out of range, another protocol version, a short or
corrupt chunk: each is a :class:`ProtocolError` (an ``InputError``) naming what
and where, with a machine-readable ``code``; nothing else escapes the decoder.
Pure: values and bytes in, values and bytes out.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Union

import numpy as np

from shared.errors import InputError
from shared.events import Step
from shared.profiles import DeviceProfile
from shared.protocol_limits import CHUNK_BYTES, MAX_FRAME_BYTES
from shared.records import RecordError, from_plain, to_plain

PROTOCOL_VERSION = 1

# Error codes (``Error.code``, ``ProtocolError.code``).
ERROR_CODES = {
    "bad_frame": "a frame that is not a message: malformed JSON, an unknown type, a wrong shape",
    "version": "a frame or handshake of another protocol version",
    "out_of_place": "a message that is not allowed now (a chunk before its offer, a request before hello)",
    "chunk": "a chunk at the wrong offset, past the end of its file, or corrupt",
    "hash_mismatch": "a completed file whose sha256 is not the one offered",
    "unknown_file": "a program or shard names a file the agent does not hold",
    "not_a_program": "a manifest or .pte the runtime cannot load",
    "wrong_model": "a program, data or b that belongs to another model or block",
    "bad_data": "training data that does not parse, or does not fit the program",
    "bad_request": "a request with values the agent cannot act on",
    "busy": "the agent is serving another desktop, or already running a round",
    "memory": "the program does not fit the device's memory",
    "unavailable": "a feature this agent build does not have",
    "internal": "the agent failed; its log says why",
}
FATAL_CODES = frozenset({"bad_frame", "version", "out_of_place"})  # the agent closes with 1008 after these
STATES = ("idle", "loading", "training", "paused")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # StartRound.run
_MAX_INT = 2**63 - 1  # sizes, offsets and counts fit a signed 64-bit integer


class ProtocolError(InputError):
    """A frame or value that breaks the protocol.

    Attributes:
        code: one of :data:`ERROR_CODES`.
    """

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


class VersionError(ProtocolError):
    """A peer that speaks another protocol version."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="version")


# -- value checks (called by each message's __post_init__) --------------------------------


def _check_sha256(value: str, where: str) -> None:
    if not _SHA256.fullmatch(value):
        raise ProtocolError(f"{where}: expected 64 lower-case hex digits (a sha256), got {value[:80]!r}")


def _check_count(value: int, where: str, least: int = 0) -> None:
    if not least <= value <= _MAX_INT:
        raise ProtocolError(f"{where}: expected an integer >= {least}, got {value}")


def _check_counts(record: object, *names: str) -> None:
    """Each named integer field of ``record`` is >= 0."""
    for name in names:
        _check_count(getattr(record, name), f"{type(record).__name__}.{name}")


def _check_finite(value: float, where: str, positive: bool = False) -> None:
    if not np.isfinite(value) or (positive and value <= 0):
        raise ProtocolError(f"{where}: expected a finite{' positive' if positive else ''} number, got {value}")


def encode_f32(array: np.ndarray) -> str:
    """A float32 vector as base64 of its little-endian bytes (exact, and 1/3 the size of JSON numbers)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def decode_f32(text: str, size: int, where: str) -> np.ndarray:
    """The float32 vector [size] that :func:`encode_f32` wrote.

    Raises:
        ProtocolError: not base64, or not ``size`` float32 values.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ProtocolError(f"{where}: not base64 float32 data") from None
    if len(raw) != 4 * size:
        raise ProtocolError(f"{where}: {len(raw)} bytes hold {len(raw) / 4:g} float32 values, expected {size}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


# -- records carried inside messages ------------------------------------------------------


@dataclass(frozen=True)
class AgentInfo:
    """Who an agent is: what it advertises, and more."""

    id: str  # stable across restarts (kept in the state dir)
    name: str
    version: str  # the deftly package version
    protocol: int
    runtime: str  # e.g. "executorch 1.5.1"
    arch: str  # e.g. "x86_64", "aarch64"
    system: str  # e.g. "Linux"
    cores: int
    memory_mb: float  # physical memory, or the simulated device's limit
    simulated: str | None = None  # the device class it simulates (--simulate); None on a real device
    tls_fingerprint: str | None = None  # sha256 of its certificate, when it serves TLS


@dataclass(frozen=True)
class DataSummary:
    """What an agent may say about its training data: counts and label shares, never a row."""

    source: str  # "private" (the device's own file) or "shard" (sent by the desktop)
    examples: int
    label_shares: dict[str, float]  # label -> fraction of the examples
    seq_len: int | None = None  # tokens per row, once tokenised
    sha256: str | None = None  # the shard's file; None for private data (its content never leaves)

    def __post_init__(self) -> None:
        if self.source not in ("private", "shard"):
            raise ProtocolError(f"DataSummary.source: expected 'private' or 'shard', got {self.source!r}")
        _check_counts(self, "examples")


@dataclass(frozen=True)
class AgentState:
    """Where an agent stands, so a desktop that (re)connects knows what survived."""

    state: str  # one of STATES
    program: str | None = None  # sha256 of the loaded program's manifest
    round: int | None = None  # the round running or paused; else the last one run, or one a restart interrupted
    step: int = 0  # steps of that round done (and checkpointed)
    completed_round: int | None = None  # the last round whose result the agent holds
    last_seq: int = 0  # the highest metric/round sequence number it has emitted
    acked_seq: int = 0  # the highest one a desktop has acknowledged
    data: DataSummary | None = None
    data_error: str | None = None  # why its private data cannot be used, if it cannot

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ProtocolError(f"AgentState.state: expected one of {', '.join(STATES)}, got {self.state!r}")


@dataclass(frozen=True)
class Metric:
    """One training step on one device, numbered in the agent's outgoing sequence."""

    seq: int
    step: Step  # with device and round set

    def __post_init__(self) -> None:
        _check_count(self.seq, "Metric.seq", least=1)
        if self.step.device is None or self.step.round is None:
            raise ProtocolError(f"Metric {self.seq}: its step must carry device and round")


# -- messages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """D→A, first: the desktop introduces itself; answered by Welcome."""

    type: ClassVar[str] = "hello"
    id: int
    desktop: str  # the desktop's name (its id travels in the handshake header)
    acked: int = 0  # the highest sequence number the desktop already holds (replay starts after it)

    def __post_init__(self) -> None:
        _check_counts(self, "id", "acked")


@dataclass(frozen=True)
class Welcome:
    """A→D: the answer to Hello."""

    type: ClassVar[str] = "welcome"
    reply_to: int
    agent: AgentInfo
    state: AgentState


@dataclass(frozen=True)
class ProfileRequest:
    """D→A: measure this device with a stored probe program (``device_agent.profile``)."""

    type: ClassVar[str] = "profile_request"
    id: int
    probe: str  # sha256 of the probe's manifest (``shared.probe.ProbeManifest``); it and its files stored
    # The device's link rate as the desktop measured it; None: the agent's own measurement on the
    # transfers it received (or, simulated, its class's rate).
    link_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        _check_sha256(self.probe, "ProfileRequest.probe")
        if self.link_bytes_per_s is not None:
            _check_finite(self.link_bytes_per_s, "ProfileRequest.link_bytes_per_s", positive=True)


@dataclass(frozen=True)
class ProfileResponse:
    """A→D: the measured profile."""

    type: ClassVar[str] = "profile_response"
    reply_to: int
    profile: DeviceProfile
    simulated: str | None = None


@dataclass(frozen=True)
class Offer:
    """D→A: a file the desktop would send (a program, its weights, a manifest, a data shard)."""

    type: ClassVar[str] = "offer"
    id: int
    sha256: str
    size: int
    name: str  # for logs and for the program's directory view; the store keys on sha256

    def __post_init__(self) -> None:
        _check_counts(self, "id", "size")
        _check_sha256(self.sha256, "Offer.sha256")
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ProtocolError(f"Offer.name: expected a plain file name, got {self.name[:80]!r}")


@dataclass(frozen=True)
class OfferReply:
    """A→D: how many verified bytes of the offered file the agent holds; send from there."""

    type: ClassVar[str] = "offer_reply"
    reply_to: int
    sha256: str
    have: int  # == the offer's size: complete, send nothing

    def __post_init__(self) -> None:
        _check_counts(self, "have")


@dataclass(frozen=True)
class ChunkAck:
    """A→D: a chunk is written (and, for the last one, the whole file verified)."""

    type: ClassVar[str] = "chunk_ack"
    sha256: str
    have: int  # verified bytes held after this chunk
    complete: bool  # the file is whole and its sha256 checked

    def __post_init__(self) -> None:
        _check_counts(self, "have")


@dataclass(frozen=True)
class DataShard:
    """D→A: train on this stored ``.npz`` (``shared.task_data`` format, a ``train`` split)."""

    type: ClassVar[str] = "data_shard"
    id: int
    sha256: str

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "DataShard.sha256")


@dataclass(frozen=True)
class DataReady:
    """A→D: the shard (or private data) is checked and will be trained on."""

    type: ClassVar[str] = "data_ready"
    reply_to: int
    data: DataSummary


@dataclass(frozen=True)
class StartRound:
    """D→A: run ``k`` steps of a stored program from the global ``b``; answered by Status, then RoundDone.

    Sent again with the same round and values after an interruption, the agent
    continues from its last checkpointed step instead of starting over.
    """

    type: ClassVar[str] = "start_round"
    id: int
    round: int
    program: str  # sha256 of the program's manifest (every file it names must be stored)
    k: int  # local steps
    lr: float
    eps: float
    seed: int  # seeds z and the batch order where the device has no trainer state for this program and data
    b_size: int  # P, the global b's length
    b: str  # the global b [P] float32, encode_f32
    # The rate the plan allots this device for the round's transfers (its share β_k of its link's
    # rate R_k, bytes/s): the desktop sends this frame no faster, and the agent sends the round's
    # RoundDone no faster (shared.pacing), so the split the plan predicts with is the one on the
    # wire. None (a desktop without a plan, or an older one): both go at full speed.
    link_bytes_per_s: float | None = None
    # The run this round belongs to (the desktop's run id): a device continues its trainer's
    # sequence (z's generator, its place in the batch order) only within one run, so a new run
    # from the same seed on the same program and data trains as the first one did. None (an
    # older desktop): the device continues whatever sequence it holds for the program and data.
    run: str | None = None

    def __post_init__(self) -> None:
        _check_counts(self, "id", "round", "seed", "b_size")
        if self.run is not None and not _RUN_ID.fullmatch(self.run):
            raise ProtocolError(f"StartRound.run: expected 1-64 letters, digits, '-' or '_', got {self.run[:80]!r}")
        _check_sha256(self.program, "StartRound.program")
        _check_count(self.k, "StartRound.k", least=1)
        _check_finite(self.lr, "StartRound.lr")
        _check_finite(self.eps, "StartRound.eps", positive=True)
        if self.link_bytes_per_s is not None:
            _check_finite(self.link_bytes_per_s, "StartRound.link_bytes_per_s", positive=True)
        decode_f32(self.b, self.b_size, "StartRound.b")

    def b_array(self) -> np.ndarray:
        """[P] float32."""
        return decode_f32(self.b, self.b_size, "StartRound.b")


@dataclass(frozen=True)
class StepMetrics:
    """A→D: one or more step metrics (several when the link was slower than the steps)."""

    type: ClassVar[str] = "step_metrics"
    metrics: tuple[Metric, ...]
    simulated: str | None = None  # the simulated device class, if the agent simulates one

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ProtocolError("StepMetrics.metrics: empty")


@dataclass(frozen=True)
class RoundDone:
    """A→D: a round's result: the block's new slice of b."""

    type: ClassVar[str] = "round_done"
    seq: int  # in the same sequence as the metrics; acknowledged the same way
    round: int
    program: str
    device: str
    steps: int  # steps run (fewer than k when stopped)
    stopped: bool
    block_offset: int  # the block's slice of the global b: [offset, offset + size)
    block_size: int
    b_block: str  # [block_size] float32, encode_f32
    seconds: float  # the round's compute time on the device's clock (simulated, when simulated)
    mean_loss: float | None = None
    simulated: str | None = None
    resumed_at: int = 0  # the step it continued from after a restart (0: ran in one go)
    # The rate it goes out no faster than: its StartRound's link_bytes_per_s. Kept in the message, so the
    # agent's outbox holds it with the result and a replay after a restart is paced the same. None: unpaced.
    paced_bytes_per_s: float | None = None

    def __post_init__(self) -> None:
        _check_count(self.seq, "RoundDone.seq", least=1)
        _check_counts(self, "steps", "block_offset", "block_size")
        if self.paced_bytes_per_s is not None:
            _check_finite(self.paced_bytes_per_s, "RoundDone.paced_bytes_per_s", positive=True)
        decode_f32(self.b_block, self.block_size, "RoundDone.b_block")

    def b_block_array(self) -> np.ndarray:
        """[block_size] float32."""
        return decode_f32(self.b_block, self.block_size, "RoundDone.b_block")


@dataclass(frozen=True)
class _Control:
    """D→A: a request about the round, taken at the next step boundary; answered by Status."""

    id: int

    def __post_init__(self) -> None:
        _check_counts(self, "id")


@dataclass(frozen=True)
class Pause(_Control):
    """Hold the round at the next step boundary."""

    type: ClassVar[str] = "pause"


@dataclass(frozen=True)
class Resume(_Control):
    """Continue a paused round."""

    type: ClassVar[str] = "resume"


@dataclass(frozen=True)
class Stop(_Control):
    """End the round at the next step boundary; its RoundDone says ``stopped``."""

    type: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Ack:
    """D→A: every metric and round result numbered up to ``seq`` is safe on the desktop."""

    type: ClassVar[str] = "ack"
    seq: int

    def __post_init__(self) -> None:
        _check_counts(self, "seq")


@dataclass(frozen=True)
class Status:
    """A→D: the agent's state, in answer to StartRound, Pause, Resume, Stop."""

    type: ClassVar[str] = "status"
    reply_to: int | None
    state: str
    round: int | None = None
    step: int = 0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ProtocolError(f"Status.state: expected one of {', '.join(STATES)}, got {self.state!r}")


@dataclass(frozen=True)
class Error:
    """A→D: a request (``reply_to``) or a frame failed; ``fatal``: the agent closes the connection next."""

    type: ClassVar[str] = "error"
    reply_to: int | None
    code: str
    message: str
    fatal: bool = False

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ProtocolError(f"Error.code: unknown code {self.code!r}")


Message = Union[Hello, Welcome, ProfileRequest, ProfileResponse, Offer, OfferReply, ChunkAck, DataShard, DataReady,
                StartRound, StepMetrics, RoundDone, Pause, Resume, Stop, Ack, Status, Error]
MESSAGE_TYPES: dict[str, type] = {cls.type: cls for cls in (
    Hello, Welcome, ProfileRequest, ProfileResponse, Offer, OfferReply, ChunkAck, DataShard, DataReady,
    StartRound, StepMetrics, RoundDone, Pause, Resume, Stop, Ack, Status, Error)}
DESKTOP_TO_AGENT = frozenset({"hello", "profile_request", "offer", "data_shard", "start_round", "pause", "resume",
                              "stop", "ack"})


# -- text frames ----------------------------------------------------------------------------


def encode(message: Message) -> str:
    """One message as a text frame: JSON with ``type`` and ``v`` first."""
    if type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"{message!r} is not a protocol message")
    return json.dumps({"type": message.type, "v": PROTOCOL_VERSION, **to_plain(message)}, separators=(",", ":"))


def decode(frame: str) -> Message:
    """The message in a text frame.

    Raises:
        VersionError: the frame names another protocol version.
        ProtocolError: anything else wrong with it, named.
    """
    if not isinstance(frame, str):
        raise ProtocolError(f"expected a text frame, got {type(frame).__name__}")
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"text frame of {len(frame)} characters, the limit is {MAX_FRAME_BYTES}")
    try:
        data = json.loads(frame)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    except (RecursionError, ValueError) as exc:  # nesting too deep; an integer too long to convert
        raise ProtocolError(f"not usable JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if "v" not in data:
        raise ProtocolError("frame without a protocol version 'v'")
    if not isinstance(version, int) or isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise VersionError(f"frame of protocol version {version!r}; this side speaks {PROTOCOL_VERSION}")
    kind = data.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r} (expected one of {', '.join(MESSAGE_TYPES)})")
    try:
        return from_plain(cls, data, f"{kind} message", ignore=frozenset({"type", "v"}))
    except ProtocolError:
        raise
    except RecordError as exc:
        raise ProtocolError(str(exc)) from None


# -- binary chunk frames ----------------------------------------------------------------------

CHUNK_MAGIC = b"DFTC"
# magic, version, 3 pad bytes, offset, total, payload length, CRC-32 of the payload, sha256 of the whole file
CHUNK_HEADER = struct.Struct("!4sB3xQQII32s")  # 64 bytes, network byte order


@dataclass(frozen=True)
class Chunk:
    """``data`` = bytes ``[offset, offset + len(data))`` of the file with this sha256 and ``total`` size."""

    sha256: str
    offset: int
    total: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "chunk sha256")
        if len(self.data) > CHUNK_BYTES:
            raise ProtocolError(f"chunk of {len(self.data)} bytes, the limit is {CHUNK_BYTES}")
        if not 0 <= self.offset <= _MAX_INT or not 0 <= self.total <= _MAX_INT:
            raise ProtocolError(f"chunk offset {self.offset} / total {self.total}: out of range")


def encode_chunk(chunk: Chunk) -> bytes:
    """The chunk as a binary frame: header, then payload."""
    header = CHUNK_HEADER.pack(CHUNK_MAGIC, PROTOCOL_VERSION, chunk.offset, chunk.total, len(chunk.data),
                               zlib.crc32(chunk.data), bytes.fromhex(chunk.sha256))
    return header + chunk.data


def decode_chunk(frame: bytes) -> Chunk:
    """The chunk in a binary frame; its payload's length and CRC-32 are checked.

    Raises:
        VersionError: another protocol version.
        ProtocolError: a short or corrupt frame, or one over the limits.
    """
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary frame, got {type(frame).__name__}")
    frame = bytes(frame)
    if len(frame) < CHUNK_HEADER.size:
        raise ProtocolError(f"binary frame of {len(frame)} bytes is shorter than a chunk header ({CHUNK_HEADER.size})")
    magic, version, offset, total, length, crc, digest = CHUNK_HEADER.unpack_from(frame)
    if magic != CHUNK_MAGIC:
        raise ProtocolError(f"binary frame does not start with a chunk header (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise VersionError(f"chunk of protocol version {version}; this side speaks {PROTOCOL_VERSION}")
    data = frame[CHUNK_HEADER.size:]
    if len(data) != length:
        raise ProtocolError(f"chunk header says {length} payload bytes, the frame holds {len(data)}", code="chunk")
    if zlib.crc32(data) != crc:
        raise ProtocolError(f"chunk at offset {offset}: payload CRC-32 mismatch (corrupt in transit)", code="chunk")
    return Chunk(sha256=digest.hex(), offset=offset, total=total, data=data)

