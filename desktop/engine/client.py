"""The desktop's side of one agent connection (asyncio, ``websockets.asyncio.client``).

:class:`AgentClient` speaks ``shared.protocol`` to one ``deftly-agent``: it
connects with the pairing token, says hello, ships files in chunks (skipping
what the agent already holds and resuming a cut transfer where the agent's
verified bytes end), chooses the training data, starts rounds and awaits their
results, receives every step metric and acknowledges it, and pauses, resumes
and stops a round. It imports only ``shared`` and ``websockets``; the fleet
engine drives one client per agent.

A lost connection is re-opened by itself (``reconnect=True``) with capped
exponential backoff and jitter (``shared.protocol_limits``). Requests in flight
when the link drops fail with :class:`ConnectionLost`; a file transfer waits for
the new connection and resumes; a round's result is awaited across reconnects
(the agent keeps it until acknowledged and replays it), and a round the agent
lost to a restart is asked for again with the same values, which the agent
continues from its last checkpointed step.

Metrics are delivered once each, in order (``on_metric``), and acknowledged
after the callback returns, so a metric the desktop has not taken is replayed.

TLS (``tls=True``, an agent started with ``--tls``): the agent's certificate is
self-signed, so no CA is asked; its SHA-256 fingerprint is checked instead,
inside the TLS handshake, before the token or any other byte is sent: against
``tls_fingerprint`` if given, else the first connection's is trusted
(:attr:`AgentClient.tls_fingerprint` says which it was) and every reconnection
must present the same. Another certificate is :class:`CertificateMismatch`.

Example::

    async with AgentClient("192.168.1.20:8765", token, desktop_id="lab-desktop") as agent:
        manifest_sha = await agent.send_program(Path("runs/step.manifest.json"))
        await agent.send_data_shard(Path("shard-0.npz"))
        done = await agent.run_round(round=0, program=manifest_sha, b=b, k=10, lr=0.1, eps=1e-3, seed=0)
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage, InvalidStatus, InvalidURI

from shared.errors import InputError
from shared.hashing import sha256_file
from shared.manifest import Manifest
from shared.pacing import paced_fragments
from shared.probe import ProbeManifest
from shared.protocol import (PROTOCOL_VERSION, Ack, Chunk, ChunkAck, DataReady, DataShard, DataSummary, Error, Hello,
                             Metric, Offer, OfferReply, Pause, ProfileRequest, ProfileResponse, ProtocolError, Resume,
                             RoundDone, StartRound, Status, StepMetrics, Stop, Welcome, decode, encode, encode_chunk,
                             encode_f32)
from shared.protocol_limits import (CHUNK_BYTES, CHUNK_WINDOW, CLOSE_TIMEOUT_S, DESKTOP_HEADER, MAX_FRAME_BYTES,
                                    OPEN_TIMEOUT_S, PING_INTERVAL_S, PING_TIMEOUT_S, PROGRAM_LOAD_TIMEOUT_S,
                                    PROTOCOL_HEADER,
                                    RECONNECT_CAP_S, RECONNECT_FIRST_S, RECONNECT_JITTER, REQUEST_TIMEOUT_S,
                                    TOKEN_HEADER, WS_PATH)
from shared.tls import certificate_fingerprint

log = logging.getLogger("deftly.client")


# -- errors ---------------------------------------------------------------------------------------


class AgentError(InputError):
    """Something about an agent the user can act on; ``code`` is a protocol error code where there is one."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code


class AuthError(AgentError):
    """The agent refused the pairing token (HTTP 401)."""


class VersionMismatch(AgentError):
    """The agent speaks another protocol version."""


class AgentBusy(AgentError):
    """The agent serves another desktop (HTTP 409), or is already running a round."""


class AgentUnreachable(AgentError):
    """Nothing answers at the address, or the handshake never finished."""


class ConnectionLost(AgentError):
    """The connection dropped while a request was in flight."""


class RequestFailed(AgentError):
    """The agent answered a request with an Error."""


class CertificateMismatch(AgentError):
    """The agent's TLS certificate is not the one expected; nothing was sent to it."""

    def __init__(self, message: str, expected: str, presented: str) -> None:
        super().__init__(message, code="tls")
        self.expected, self.presented = expected, presented


_PERMANENT = (AuthError, VersionMismatch, CertificateMismatch)  # reconnecting cannot fix these


class _PinRefused(ssl.SSLCertVerificationError):
    """Raised inside the TLS handshake: the peer's certificate has another fingerprint."""

    def __init__(self, expected: str, presented: str) -> None:
        super().__init__(f"certificate sha256:{presented}, expected sha256:{expected}")
        self.expected, self.presented = expected, presented


class _PinnedSSLObject(ssl.SSLObject):
    """asyncio's TLS object for a pinned connection: checks the fingerprint as the handshake completes."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is complete
        context = self.context
        context.presented = certificate_fingerprint(self.getpeercert(binary_form=True))
        if context.expected is not None and context.presented != context.expected:
            raise _PinRefused(context.expected, context.presented)


class _PinningContext(ssl.SSLContext):
    """A client context for a self-signed agent: no CA, no host name; the fingerprint is the check."""

    sslobject_class = _PinnedSSLObject
    expected: str | None = None  # the fingerprint the certificate must have (None: take the first)
    presented: str | None = None  # the one the handshake showed


def _pinning_context(expected: str | None) -> _PinningContext:
    context = _PinningContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed: _PinnedSSLObject checks the fingerprint instead
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.expected = expected
    return context


def _error_from(message: Error) -> AgentError:
    cls = {"version": VersionMismatch, "busy": AgentBusy}.get(message.code, RequestFailed)
    return cls(f"agent: {message.message}", code=message.code)


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    """What one :meth:`AgentClient.send_file` moved."""

    sha256: str
    size: int
    sent_bytes: int  # payload bytes sent (across every attempt)
    skipped_bytes: int  # bytes the agent already held when first offered
    resumed_at: list[int]  # offsets an attempt resumed from after a lost connection
    seconds: float

    @property
    def rate_bytes_per_s(self) -> float:
        return self.sent_bytes / self.seconds if self.seconds > 0 else float("inf")


def backoff_delays(first_s: float = RECONNECT_FIRST_S, cap_s: float = RECONNECT_CAP_S,
                   jitter: float = RECONNECT_JITTER, rng: random.Random | None = None):
    """Reconnect waits: doubling from ``first_s`` up to ``cap_s``, each scaled by U[1 - jitter, 1]."""
    rng = rng or random.Random()
    delay = first_s
    while True:
        yield delay * (1.0 - jitter * rng.random())
        delay = min(delay * 2.0, cap_s)


class _Transfer:
    """One file being sent: the acks of its chunks as they arrive, and the bytes sent over every attempt."""

    def __init__(self) -> None:
        self.acks: asyncio.Queue[ChunkAck | Exception] = asyncio.Queue()
        self.sent_bytes = 0


# -- the client ------------------------------------------------------------------------------------


class AgentClient:
    """One desktop-to-agent connection; see the module docstring."""

    def __init__(self, address: str, token: str, desktop_id: str, desktop_name: str = "deftly desktop", *,
                 on_metric: Callable[[Metric], Awaitable[None] | None] | None = None,
                 on_round_done: Callable[[RoundDone], Awaitable[None] | None] | None = None,
                 on_connection: Callable[[Welcome | None], None] | None = None,
                 reconnect: bool = True, chunk_bytes: int = CHUNK_BYTES, window: int = CHUNK_WINDOW,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, ping_interval_s: float = PING_INTERVAL_S,
                 ping_timeout_s: float = PING_TIMEOUT_S, backoff: Callable[[], object] = backoff_delays,
                 tls: bool = False, tls_fingerprint: str | None = None) -> None:
        """
        Args:
            address: ``host:port`` of the agent (or a full ``ws://`` / ``wss://host:port/path`` URI).
            token: its pairing token.
            desktop_id: this desktop's stable id (an agent serves one desktop at a time).
            desktop_name: shown in the agent's log.
            on_metric: called with each step metric, once, in order; acknowledged when it returns.
            on_round_done: called with each round result, once.
            on_connection: called with the Welcome of each (re)connection, and None when one drops.
            reconnect: re-open a lost connection by itself.
            chunk_bytes: payload bytes per chunk frame (at most CHUNK_BYTES).
            window: chunks in flight before waiting for an ack.
            tls: connect with wss:// (implied by a wss:// address).
            tls_fingerprint: the sha256 (hex) the agent's certificate must have; None: trust the first.
        """
        if not 0 < chunk_bytes <= CHUNK_BYTES:
            raise InputError(f"chunk_bytes {chunk_bytes}: must be in 1..{CHUNK_BYTES}")
        tls = tls or address.startswith("wss://")
        self.uri = address if address.startswith(("ws://", "wss://")) else \
            f"{'wss' if tls else 'ws'}://{address}{WS_PATH}"
        self.tls = tls
        self.tls_pin = tls_fingerprint  # the certificate every connection must present (set by the first)
        self.tls_fingerprint: str | None = None  # the one the last connection's handshake presented
        self.token, self.desktop_id, self.desktop_name = token, desktop_id, desktop_name
        self.on_metric, self.on_round_done, self.on_connection = on_metric, on_round_done, on_connection
        self.reconnect, self.chunk_bytes, self.window = reconnect, chunk_bytes, window
        self.request_timeout_s = request_timeout_s
        self.ping_interval_s, self.ping_timeout_s = ping_interval_s, ping_timeout_s
        self._backoff = backoff
        self.welcome: Welcome | None = None  # of the current (or last) connection
        self.delivered_seq = 0  # the highest metric / round result taken
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._fatal: AgentError | None = None  # a permanent failure that ended reconnecting
        self._next_id = 1
        self._pending: dict[int, asyncio.Future] = {}
        self._transfers: dict[str, _Transfer] = {}
        self._offer_ids: dict[int, str] = {}  # offer id -> sha256, so an error can find its transfer
        self._rounds: dict[int, asyncio.Future] = {}  # round -> its RoundDone
        self._round_requests: dict[int, StartRound] = {}  # rounds accepted and awaited, asked again after a restart
        self._start_ids: dict[int, int] = {}  # StartRound id -> round

    # -- connecting ----------------------------------------------------------------------------

    async def __aenter__(self) -> "AgentClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> Welcome:
        """Open the connection and say hello.

        Raises:
            AuthError, VersionMismatch, AgentBusy, AgentUnreachable: each naming the agent's answer.
        """
        welcome = await self._open()
        if self.reconnect and self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise())
        return welcome

    async def _open(self) -> Welcome:
        headers = {TOKEN_HEADER: f"Bearer {self.token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION),
                   DESKTOP_HEADER: self.desktop_id}
        context = _pinning_context(self.tls_pin) if self.tls else None
        try:
            ws = await connect(self.uri, additional_headers=headers, compression=None, proxy=None,
                               max_size=MAX_FRAME_BYTES, open_timeout=OPEN_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                               ping_interval=self.ping_interval_s, ping_timeout=self.ping_timeout_s,
                               **({"ssl": context} if context is not None else {}))
        except InvalidStatus as exc:
            raise _refusal(self.uri, exc) from None
        except InvalidURI as exc:
            raise AgentUnreachable(f"{self.uri}: not an agent address ({exc})", code="bad_request") from None
        except _PinRefused as exc:
            raise CertificateMismatch(f"{self.uri}: its TLS certificate is sha256:{exc.presented}, not the expected "
                                      f"sha256:{exc.expected}", exc.expected, exc.presented) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            hint = ""
            if isinstance(exc, InvalidMessage) and not self.tls:
                hint = "; an agent started with --tls is reached at wss://HOST:PORT"
            elif self.tls and not isinstance(exc, (ConnectionRefusedError, TimeoutError)):
                hint = "; does the agent serve TLS (deftly-agent --tls)?"
            what = f"the TLS handshake failed ({exc.reason or exc})" if isinstance(exc, ssl.SSLError) else \
                f"no agent answers ({type(exc).__name__}: {exc})"
            raise AgentUnreachable(f"{self.uri}: {what}{hint}") from None
        self.tls_fingerprint = context.presented if context is not None else None
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws))
        try:
            welcome = await self._request(Hello(id=self._take_id(), desktop=self.desktop_name,
                                                acked=self.delivered_seq), Welcome, wait_connected=False)
        except AgentError:
            await ws.close()
            raise
        self.welcome = welcome
        if self.tls_pin is None:
            self.tls_pin = self.tls_fingerprint  # trusted on first use: a reconnection must present it again
        self._connected.set()
        log.info("connected to %s (%s), state %s", welcome.agent.name, self.uri, welcome.state.state)
        if self.on_connection is not None:
            self.on_connection(welcome)
        self._ask_again_for_lost_rounds(welcome)
        return welcome

    async def close(self) -> None:
        """Close the connection and stop reconnecting; pending requests fail with ConnectionLost."""
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._supervisor is not None:
            await asyncio.gather(self._supervisor, return_exceptions=True)
        for future in self._rounds.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"{self.uri}: the client was closed"))

    async def _supervise(self) -> None:
        """Re-open the connection whenever it drops, with capped exponential backoff and jitter."""
        while not self._closing:
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            if self._closing:
                return
            for delay in self._backoff():
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    await self._open()
                    break
                except _PERMANENT as exc:
                    self._give_up(exc)
                    return
                except AgentError as exc:
                    log.info("reconnecting to %s: %s", self.uri, exc)

    def _give_up(self, exc: AgentError) -> None:
        log.error("stopped reconnecting to %s: %s", self.uri, exc)
        self._fatal = exc
        self._connected.set()  # wake waiters, who will see _fatal
        for future in self._rounds.values():
            if not future.done():
                future.set_exception(exc)

    async def wait_connected(self) -> None:
        """Return once a connection is open (raises the permanent error that ended reconnecting, if any)."""
        await self._connected.wait()
        if self._fatal is not None:
            raise self._fatal

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._connected.is_set() and self._fatal is None

    # -- reading -------------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    log.warning("%s: ignored a binary frame from the agent", self.uri)
                    continue
                try:
                    message = decode(frame)
                except ProtocolError as exc:
                    log.error("%s: a frame from the agent is not a message: %s", self.uri, exc)
                    continue
                await self._dispatch(ws, message)
        except ConnectionClosed:
            pass
        finally:
            self._lost(ws)

    def _lost(self, ws: ClientConnection) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        self._connected.clear()
        reason = f"{self.uri}: connection lost (close code {ws.close_code}{f', {ws.close_reason}' if ws.close_reason else ''})"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(reason))
        self._pending.clear()
        for transfer in self._transfers.values():
            transfer.acks.put_nowait(ConnectionLost(reason))
        if self.on_connection is not None and not self._closing:
            self.on_connection(None)
        if not self.reconnect:
            for future in self._rounds.values():
                if not future.done():
                    future.set_exception(ConnectionLost(reason))

    async def _dispatch(self, ws: ClientConnection, message) -> None:
        if isinstance(message, StepMetrics):
            fresh = [m for m in message.metrics if m.seq > self.delivered_seq]
            for metric in fresh:
                if self.on_metric is not None:
                    await _maybe_await(self.on_metric(metric))
                self.delivered_seq = metric.seq
            await self._ack(ws)
        elif isinstance(message, RoundDone):
            if message.seq > self.delivered_seq:
                if self.on_round_done is not None:
                    await _maybe_await(self.on_round_done(message))
                self.delivered_seq = message.seq
                future = self._rounds.get(message.round)
                if future is not None and not future.done():
                    future.set_result(message)
                self._round_requests.pop(message.round, None)
            await self._ack(ws)
        elif isinstance(message, ChunkAck):
            transfer = self._transfers.get(message.sha256)
            if transfer is not None:
                transfer.acks.put_nowait(message)
        elif isinstance(message, Error):
            self._on_error(message)
        else:
            future = self._pending.pop(getattr(message, "reply_to", None), None)
            if future is not None and not future.done():
                future.set_result(message)

    def _on_error(self, message: Error) -> None:
        error = _error_from(message)
        if message.reply_to in self._offer_ids:  # a chunk of this offer's file failed
            transfer = self._transfers.get(self._offer_ids[message.reply_to])
            if transfer is not None:
                transfer.acks.put_nowait(error)
        round_number = self._start_ids.get(message.reply_to)
        if round_number is not None:  # the round failed after it was accepted
            future = self._rounds.get(round_number)
            if future is not None and not future.done():
                future.set_exception(error)
            self._round_requests.pop(round_number, None)
        future = self._pending.pop(message.reply_to, None)
        if future is not None and not future.done():
            future.set_exception(error)
        elif round_number is None and message.reply_to not in self._offer_ids:
            log.error("%s: %s", self.uri, error)

    async def _ack(self, ws: ClientConnection) -> None:
        try:
            await ws.send(encode(Ack(seq=self.delivered_seq)))
        except ConnectionClosed:
            pass  # acknowledged on the next connection's hello

    # -- requests --------------------------------------------------------------------------------

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    async def _send(self, message, pace_bytes_per_s: float | None = None) -> None:
        """Send one message; with ``pace_bytes_per_s``, as fragments no faster than that rate (shared.pacing)."""
        ws = self._ws
        if ws is None:
            raise ConnectionLost(f"{self.uri}: not connected")
        frame = encode(message)
        try:
            await ws.send(frame if pace_bytes_per_s is None else paced_fragments(frame, pace_bytes_per_s))
        except ConnectionClosed as exc:
            raise ConnectionLost(f"{self.uri}: connection lost ({exc})") from None
        except asyncio.CancelledError:
            if pace_bytes_per_s is not None:  # a message cut between its fragments leaves the connection unusable
                asyncio.ensure_future(ws.close())  # closed cleanly (the reconnect asks for the round again)
            raise

    async def _request(self, message, expect: type, wait_connected: bool = True, timeout_s: float | None = None,
                       pace_bytes_per_s: float | None = None):
        if wait_connected:
            await self.wait_connected()
        future = asyncio.get_running_loop().create_future()
        self._pending[message.id] = future
        try:
            await self._send(message, pace_bytes_per_s)  # the answer's timeout starts once it is sent
            reply = await asyncio.wait_for(future, timeout_s or self.request_timeout_s)
        except TimeoutError:
            raise ConnectionLost(f"{self.uri}: no answer to {message.type} within "
                                 f"{timeout_s or self.request_timeout_s:g} s") from None
        finally:
            self._pending.pop(message.id, None)
        if not isinstance(reply, expect):
            raise RequestFailed(f"{self.uri}: {message.type} was answered by {reply.type}", code="bad_frame")
        return reply

    # -- files -----------------------------------------------------------------------------------

    async def send_file(self, path: Path, name: str | None = None, sha256: str | None = None,
                        on_progress: Callable[[int, int], None] | None = None) -> Transfer:
        """Ship one file, unless the agent holds it; resume after a lost connection.

        Args:
            path: the file.
            name: its name on the agent (default: the file's name).
            sha256: its hash if known (else computed here, once).
            on_progress: called with (bytes the agent holds, size) after each acknowledged chunk.

        Raises:
            RequestFailed: the agent refused a chunk or the file (e.g. hash_mismatch).
        """
        path = Path(path)
        size = path.stat().st_size
        sha256 = sha256 or await asyncio.to_thread(sha256_file, path)
        started = time.perf_counter()
        skipped, resumed = None, []
        transfer = _Transfer()
        self._transfers[sha256] = transfer
        try:
            while True:
                try:
                    offer_id = self._take_id()
                    self._offer_ids[offer_id] = sha256
                    reply = await self._request(Offer(id=offer_id, sha256=sha256, size=size,
                                                      name=name or path.name), OfferReply)
                    if skipped is None:
                        skipped = reply.have
                    elif reply.have < size:
                        resumed.append(reply.have)
                    if on_progress is not None:
                        on_progress(reply.have, size)
                    if reply.have < size:
                        await self._stream(path, sha256, size, reply.have, transfer, on_progress)
                    break
                except ConnectionLost:
                    if not self.reconnect or self._closing:
                        raise
                    await self.wait_connected()
        finally:
            self._transfers.pop(sha256, None)
            for offer_id in [i for i, s in self._offer_ids.items() if s == sha256]:
                del self._offer_ids[offer_id]
        return Transfer(sha256=sha256, size=size, sent_bytes=transfer.sent_bytes, skipped_bytes=skipped or 0,
                        resumed_at=resumed,
                        seconds=time.perf_counter() - started)

    async def _stream(self, path: Path, sha256: str, size: int, offset: int, transfer: _Transfer,
                      on_progress: Callable[[int, int], None] | None) -> None:
        """Chunks from ``offset`` to the end, ``window`` in flight, until the agent says the file is complete."""
        while not transfer.acks.empty():  # acks of an earlier attempt
            transfer.acks.get_nowait()
        in_flight = 0
        ws = self._ws
        with open(path, "rb") as f:
            f.seek(offset)
            position = offset
            while True:
                while in_flight < self.window and position < size:
                    data = f.read(min(self.chunk_bytes, size - position))
                    if ws is None:
                        raise ConnectionLost(f"{self.uri}: not connected")
                    try:
                        await ws.send(encode_chunk(Chunk(sha256=sha256, offset=position, total=size, data=data)))
                    except ConnectionClosed as exc:
                        raise ConnectionLost(f"{self.uri}: connection lost mid-transfer ({exc})") from None
                    position += len(data)
                    transfer.sent_bytes += len(data)
                    in_flight += 1
                if in_flight == 0:
                    raise RequestFailed(f"{path.name}: sent to the end without the agent completing it",
                                        code="chunk")
                ack = await asyncio.wait_for(transfer.acks.get(), self.request_timeout_s)
                if isinstance(ack, Exception):
                    raise ack
                in_flight -= 1
                if on_progress is not None:
                    on_progress(ack.have, size)
                if ack.complete:
                    return

    async def send_program(self, manifest_path: Path,
                           on_progress: Callable[[str, int, int], None] | None = None) -> str:
        """Ship a program: the files its manifest names that a device needs, then the manifest.

        Each method's ``.pte``, the weights (sent once per model: every program of a
        model names the same ``.ptd``) and a ``tokenizer`` if named; the data and the
        A's stay here.

        Returns:
            The manifest's sha256 (what StartRound names).
        """
        manifest = Manifest.load(Path(manifest_path))
        names = [*manifest.method_files.values(),
                 *(manifest.files[role] for role in ("weights", "tokenizer") if role in manifest.files)]
        return await self._send_bundle(Path(manifest_path), names, manifest.sha256, on_progress)

    async def send_probe(self, manifest_path: Path) -> str:
        """Ship a probe program (``shared.probe.ProbeManifest``: its ``.pte`` and weights, then the manifest).

        Returns:
            The probe manifest's sha256 (what :meth:`profile` names).
        """
        probe = ProbeManifest.load(Path(manifest_path))
        return await self._send_bundle(Path(manifest_path), list(probe.files.values()), probe.sha256, None)

    async def _send_bundle(self, manifest_path: Path, names: list[str], sha256: dict[str, str],
                           on_progress: Callable[[str, int, int], None] | None) -> str:
        for name in dict.fromkeys(names):  # a file named twice crosses once
            await self.send_file(manifest_path.parent / name, name=name, sha256=sha256.get(name),
                                 on_progress=(lambda have, size, name=name: on_progress(name, have, size))
                                 if on_progress else None)
        transfer = await self.send_file(manifest_path, name=manifest_path.name)
        return transfer.sha256

    async def send_data_shard(self, path: Path) -> DataSummary:
        """Ship a ``shared.task_data`` ``.npz`` and make it the agent's training data."""
        transfer = await self.send_file(path)
        reply = await self._request(DataShard(id=self._take_id(), sha256=transfer.sha256), DataReady)
        return reply.data

    # -- rounds ---------------------------------------------------------------------------------------

    def _round_request(self, round: int, program: str, b: np.ndarray, k: int, lr: float, eps: float,
                       seed: int, link_bytes_per_s: float | None, run: str | None) -> StartRound:
        """The StartRound for a round, with its result future (kept across reconnects) made ready."""
        b = np.asarray(b, dtype=np.float32).reshape(-1)
        request = StartRound(id=self._take_id(), round=round, program=program, k=k, lr=float(lr), eps=float(eps),
                             seed=seed, b_size=int(b.shape[0]), b=encode_f32(b),
                             link_bytes_per_s=None if link_bytes_per_s is None else float(link_bytes_per_s),
                             run=run)
        if round not in self._rounds or self._rounds[round].done():
            self._rounds[round] = asyncio.get_running_loop().create_future()
        self._start_ids[request.id] = round
        return request

    async def start_round(self, round: int, program: str, b: np.ndarray, k: int, lr: float, eps: float,
                          seed: int = 0, link_bytes_per_s: float | None = None, run: str | None = None) -> Status:
        """Ask for a round; returns once the agent has accepted it (then await :meth:`round_result`).

        Args:
            link_bytes_per_s: the rate the plan allots this device (β_k · R_k): the StartRound
                is sent no faster, and the agent sends the round's result no faster. None: full speed.
            run: the run's id (``StartRound.run``): the device continues its trainer's sequence only
                within one run. None: it continues whatever it holds.

        Raises:
            AgentBusy: a round is running. RequestFailed: the request is wrong (e.g. b's size).
            ProtocolError: ``link_bytes_per_s`` is not a finite positive number.
        """
        request = self._round_request(round, program, b, k, lr, eps, seed, link_bytes_per_s, run)
        status = await self._request(request, Status, pace_bytes_per_s=request.link_bytes_per_s)
        self._round_requests[round] = request  # accepted: asked for again if a restart loses it
        return status

    async def continue_round(self, round: int, program: str, b: np.ndarray, k: int, lr: float, eps: float,
                             seed: int = 0, link_bytes_per_s: float | None = None, run: str | None = None) -> None:
        """Take up a round asked for before this desktop restarted; then await :meth:`round_result`.

        The agent may be running it still, or hold its result unacknowledged (then it arrives
        with the replay): it is asked for again, with the same values, only if it does neither,
        and the agent continues it from its last checkpointed step.
        """
        request = self._round_request(round, program, b, k, lr, eps, seed, link_bytes_per_s, run)
        await self.wait_connected()
        state = self.welcome.state
        running = state.state != "idle" and state.round == round
        # Its result is there to be replayed if anything is unacknowledged (by any client of this desktop).
        finished = state.completed_round == round and state.last_seq > max(self.delivered_seq, state.acked_seq)
        if not running and not finished:
            await self._request(request, Status, pace_bytes_per_s=request.link_bytes_per_s)
        self._round_requests[round] = request  # awaited: asked for again if a restart loses it

    def forget_round(self, round: int) -> None:
        """Stop awaiting a round (the desktop gave up on it): it is not asked for again after a reconnect."""
        self._round_requests.pop(round, None)
        future = self._rounds.pop(round, None)
        if future is not None and not future.done():
            future.cancel()

    async def round_result(self, round: int, timeout_s: float | None = None) -> RoundDone:
        """The result of a round started with :meth:`start_round`, across reconnects and agent restarts."""
        future = self._rounds.get(round)
        if future is None:
            raise InputError(f"round {round} was not started on {self.uri}")
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)

    async def run_round(self, round: int, program: str, b: np.ndarray, k: int, lr: float, eps: float,
                        seed: int = 0, timeout_s: float | None = None,
                        link_bytes_per_s: float | None = None, run: str | None = None) -> RoundDone:
        """Start a round and wait for its result."""
        await self.start_round(round, program, b, k, lr, eps, seed, link_bytes_per_s, run)
        return await self.round_result(round, timeout_s)

    def _ask_again_for_lost_rounds(self, welcome: Welcome) -> None:
        """After a reconnect: a round awaited that the agent is not running and has not finished is sent again."""
        state = welcome.state
        for round_number, request in list(self._round_requests.items()):
            running = state.state != "idle" and state.round == round_number
            finished = state.completed_round == round_number and state.last_seq > self.delivered_seq
            if not running and not finished:
                log.info("%s: round %d was interrupted (agent at step %d); asking again", self.uri, round_number,
                         state.step if state.round == round_number else 0)
                again = replace(request, id=self._take_id())
                self._round_requests[round_number] = again
                self._start_ids[again.id] = round_number
                asyncio.create_task(self._send_quietly(again))

    async def _send_quietly(self, message: StartRound) -> None:
        try:
            await self._send(message, message.link_bytes_per_s)
        except ConnectionLost:
            pass  # the next connection asks again

    async def pause(self) -> Status:
        """Hold the running round at its next step boundary; returns once it holds."""
        return await self._request(Pause(id=self._take_id()), Status)

    async def resume(self) -> Status:
        return await self._request(Resume(id=self._take_id()), Status)

    async def stop(self) -> Status:
        """End the running round at its next step boundary (its RoundDone says ``stopped``)."""
        return await self._request(Stop(id=self._take_id()), Status)

    async def profile(self, probe: str, link_bytes_per_s: float | None = None) -> ProfileResponse:
        """Measure the device with a probe sent by :meth:`send_probe` (a real device: minutes at most).

        Args:
            probe: the probe manifest's sha256.
            link_bytes_per_s: the device's link rate as measured here; None: the agent's own
                measurement on the transfers it received.
        """
        return await self._request(ProfileRequest(id=self._take_id(), probe=probe,
                                                  link_bytes_per_s=link_bytes_per_s), ProfileResponse,
                                   timeout_s=PROGRAM_LOAD_TIMEOUT_S)


def _refusal(uri: str, exc: InvalidStatus) -> AgentError:
    status = exc.response.status_code
    body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
    text = f"{uri}: the agent refused the connection (HTTP {status}{f': {body}' if body else ''})"
    if status == 401:
        return AuthError(text, code="bad_request")
    if status == 409:
        return AgentBusy(text, code="busy")
    if status == 400 and "protocol" in body:
        return VersionMismatch(text, code="version")
    return AgentUnreachable(text, code="bad_request")


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        await value

