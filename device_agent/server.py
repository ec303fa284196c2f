"""The agent's WebSocket server: one desktop at a time, training off the event loop, losing nothing.

One endpoint (``WS_PATH``) on the ``websockets`` asyncio server. The opening
handshake is checked before any frame (``process_request``): no token or a wrong
one is HTTP 401, another protocol version HTTP 400, a second desktop while one
is served HTTP 409 ("busy"); a new connection from the desktop already served
takes over from its old one (a cut link that has not timed out yet). A frame
over ``MAX_FRAME_BYTES`` is refused by websockets with close code 1009; a frame
that breaks the protocol (malformed, wrong shape, wrong version, out of place)
gets an ``Error`` and close code 1008. Every other bad request gets an
``Error`` naming it and the connection goes on. Each refusal is in the log.

The event loop only moves frames: programs load and steps run on one compute
thread (``_in_worker``), so pings, metrics and control are answered while a
step of 0.2-2 s runs. Rounds outlive connections: a round started goes on
when the link drops, its metrics and result wait in the persistent outbox
(``device_agent.outbox``), and whichever connection comes next gets everything
its desktop has not acknowledged. A round's RoundDone goes out no faster than the
rate its StartRound allotted (``link_bytes_per_s``: the plan's share of the link,
``shared.pacing``), as the desktop sent the StartRound, so the round's transfers
take what the plan predicts they take; the rate is in the RoundDone the outbox
keeps, so a replay after a restart is paced the same.

State dir (``--state-dir``)::

    agent.json, token      identity (device_agent.identity)
    tls.crt, tls.key       its self-signed certificate, with --tls (device_agent.identity)
    agent.log              what the agent did and refused
    store/                 files by sha256 (device_agent.store)
    programs/<sha>/        a directory view per program manifest (device_agent.programs)
    probes/<sha>/          the same for a probe program (profile_request: device_agent.profile)
    link.json              bytes received and the seconds they took: the link rate a profile reports
    outbox.jsonl, .acked   metrics and round results until acknowledged
    round.npz              the round in progress, after its last step (device_agent.rounds)
    sampler.json           where the batch order stands between rounds
    completed.json         the last round whose result is in the outbox
    data.json              the shard chosen as training data
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import hmac
import json
import logging
import time
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable

import psutil
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from device_agent import identity
from device_agent.data import PrivateData, TrainData, fit_to_program, load_shard
from device_agent.outbox import Outbox
from device_agent.programs import files_bytes, load_program, measure_device, probe_view, program_view
from device_agent.rounds import RoundRunner, RoundState, load_round, request_key, settle_finished_round
from device_agent.simulate import DeviceClass, LinkShaper, Pacer, SimulatedClock, estimated_need_bytes, paced_rate
from device_agent.store import FileStore
from shared.errors import InputError
from shared.events import Step
from shared.files import write_bytes_atomic
from shared.manifest import Manifest
from shared.pacing import paced_fragments
from shared.protocol import (FATAL_CODES, PROTOCOL_VERSION, Ack, AgentState, ChunkAck, DataReady, DataShard, Error,
                             Hello, Offer, OfferReply, Pause, ProfileRequest, ProfileResponse, ProtocolError, Resume,
                             RoundDone,
                             StartRound, Status, Stop, Welcome, decode, decode_chunk, encode, encode_f32)
from shared.protocol_limits import (CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TIMEOUT_S, DESKTOP_HEADER,
                                    LINK_SAMPLE_BYTES, MAX_FRAME_BYTES, OPEN_TIMEOUT_S, PING_INTERVAL_S, PING_TIMEOUT_S,
                                    PROTOCOL_HEADER, TOKEN_HEADER, WS_PATH)

log = logging.getLogger("deftly.agent")
LINK_FILE = "link.json"  # the last link measurement, in the state dir


@dataclass
class AgentConfig:
    """Settings of one agent; defaults commented."""

    state_dir: Path
    name: str
    host: str = "0.0.0.0"  # the address to listen on
    port: int = 8765  # 0: any free port (printed at start)
    token: str | None = None  # None: the one kept in the state dir, or a new one
    data: Path | None = None  # the device's private training file (.npz, or text with `task`)
    task: Path | None = None  # the task file that says how to read a text `data` file
    tokenizer: Path | None = None  # tokenizer.json for text data, when the program's manifest names none
    simulate: DeviceClass | None = None  # stand in for a device of this class
    tls: bool = False  # serve wss:// with the certificate kept in the state dir
    ping_interval_s: float = PING_INTERVAL_S
    ping_timeout_s: float = PING_TIMEOUT_S


class _RoundControl:
    """Pause, resume and stop of the running round, taken at step boundaries."""

    def __init__(self) -> None:
        self.running = asyncio.Event()  # cleared: hold at the next boundary
        self.running.set()
        self.parked = asyncio.Event()  # set while the round holds at a boundary
        self.stop = False
        self.finished = False  # its result is in the outbox; only the bookkeeping is left


class Agent:
    """The device agent: state, store, outbox, rounds, and the connection that drives them."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.id = identity.agent_id(self.state_dir)
        self.token = identity.pairing_token(self.state_dir, config.token)
        self.tls = identity.tls_identity(self.state_dir, self.id) if config.tls else None
        self.info = identity.agent_info(self.id, config.name, config.simulate,
                                        self.tls.fingerprint if self.tls else None)
        self.store = FileStore(self.state_dir / "store")
        simulated = config.simulate.name if config.simulate else None
        self.outbox = Outbox(self.state_dir, simulated=simulated)
        self.clock: Callable[[], float] = (SimulatedClock(config.simulate.compute_factor) if config.simulate
                                           else time.perf_counter)
        self.shaper = LinkShaper(config.simulate.link_bytes_per_s) if config.simulate else None
        self.memory_cap = config.simulate.memory_bytes if config.simulate else None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deftly-compute")
        self._process = psutil.Process()
        # The desktop being served: its id from the handshake, and its open connection.
        self._desktop: tuple[str, ServerConnection] | None = None
        self._connection: ServerConnection | None = None
        # What is loaded on the compute thread.
        self._program: tuple[str, Any] | None = None  # (manifest sha256, Program)
        self._runner: RoundRunner | None = None
        # The training data: a shard (by sha256), or the private file.
        self._private: PrivateData | None = None
        self._private_error: str | None = None
        self._shard: TrainData | None = None
        self._offers: dict[str, int] = {}  # sha256 -> id of the offer its chunks answer
        self._arrivals: dict[str, tuple[float, int]] = {}  # sha256 -> (first chunk's arrival, bytes held then)
        # measured on the last long enough transfer; kept in the state dir, so a restarted agent that
        # already holds a probe's files (nothing crosses the link again) can still be profiled
        self._link_bytes_per_s: float | None = self._read_link()
        self._round_task: asyncio.Task | None = None
        self._round: RoundState | None = None
        self._control = _RoundControl()
        self._phase = "idle"
        self._completed = self._read_json("completed.json")
        saved = load_round(self.state_dir)
        self._interrupted = saved[0] if saved else None
        if self._interrupted is not None and self._completed.get("key") == self._interrupted.key:
            settle_finished_round(self.state_dir, *saved)  # killed after its result was saved, before cleanup
            self._interrupted = None
        self._load_data()

    # -- state -----------------------------------------------------------------------------

    def _read_json(self, name: str) -> dict:
        try:
            value = json.loads((self.state_dir / name).read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

    def _load_data(self) -> None:
        if self.config.data is not None:
            try:
                self._private = PrivateData(self.config.data, self.config.task)
                log.info("private data %s: %d examples, label shares %s", self.config.data,
                         self._private.summary.examples, self._private.summary.label_shares)
            except InputError as exc:
                self._private_error = str(exc)
                log.error("private data unusable: %s", exc)
        shard = self._read_json("data.json").get("shard")
        if isinstance(shard, str) and self.store.has(shard):
            try:
                self._shard = load_shard(self.store.path(shard), shard)
            except InputError as exc:
                log.error("the chosen shard is unusable: %s", exc)

    def agent_state(self) -> AgentState:
        """Where the agent stands (the Welcome's ``state``)."""
        current = self._round or self._interrupted
        data = self._shard or self._private
        return AgentState(
            state=self._phase, program=self._program[0] if self._program else None,
            round=current.round if current else None, step=current.step if current else 0,
            completed_round=self._completed.get("round"), last_seq=self.outbox.last_seq,
            acked_seq=self.outbox.acked_seq, data=data.summary if data else None,
            data_error=None if self._shard else self._private_error)

    def _status(self, reply_to: int | None) -> Status:
        round_state = self._round
        return Status(reply_to=reply_to, state=self._phase, round=round_state.round if round_state else None,
                      step=round_state.step if round_state else 0)

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, on_ready: Callable[[int], None] | None = None,
                    stop: asyncio.Future | None = None) -> None:
        """Serve until ``stop`` is done (or the task is cancelled).

        Args:
            on_ready: called with the bound port once the server listens.
            stop: a future whose completion shuts the agent down.
        """
        async with serve(self._handle, self.config.host, self.config.port, process_request=self._check_handshake,
                         ssl=self.tls.server_context() if self.tls else None,
                         max_size=MAX_FRAME_BYTES, compression=None, ping_interval=self.config.ping_interval_s,
                         ping_timeout=self.config.ping_timeout_s, open_timeout=OPEN_TIMEOUT_S,
                         close_timeout=CLOSE_TIMEOUT_S, logger=logging.getLogger("deftly.agent.websockets")) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            log.info("agent %s (%s) listening on port %d, protocol %d%s%s", self.info.name, self.id, port,
                     PROTOCOL_VERSION, f", simulating {self.info.simulated}" if self.info.simulated else "",
                     f", TLS certificate sha256:{self.tls.fingerprint}" if self.tls else "")
            if on_ready is not None:
                on_ready(port)
            try:
                await (stop if stop is not None else asyncio.get_running_loop().create_future())
            finally:
                if self._round_task is not None:
                    self._round_task.cancel()
                self._worker.shutdown(wait=False, cancel_futures=True)
                self.outbox.close()

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse before any frame: wrong path 404, token 401, protocol 400, another desktop 409."""
        peer = _peer(connection)

        def refuse(status: HTTPStatus, text: str) -> Response:
            log.warning("refused %s: %d %s", peer, status.value, text)
            return connection.respond(status, text + "\n")

        if request.path != WS_PATH:
            return refuse(HTTPStatus.NOT_FOUND, f"no endpoint {request.path}; the agent serves {WS_PATH}")
        offered = request.headers.get(TOKEN_HEADER, "")
        if not offered:
            return refuse(HTTPStatus.UNAUTHORIZED, f"no pairing token ({TOKEN_HEADER}: Bearer <token>)")
        if not hmac.compare_digest(offered.removeprefix("Bearer ").strip().encode(), self.token.encode()):
            return refuse(HTTPStatus.UNAUTHORIZED, "wrong pairing token")
        version = request.headers.get(PROTOCOL_HEADER)
        if version != str(PROTOCOL_VERSION):
            return refuse(HTTPStatus.BAD_REQUEST, f"protocol version {version!r}; this agent speaks "
                                                  f"{PROTOCOL_VERSION}")
        desktop = request.headers.get(DESKTOP_HEADER, "").strip()
        if not desktop:
            return refuse(HTTPStatus.BAD_REQUEST, f"no {DESKTOP_HEADER} header")
        if self._desktop is not None:
            served, served_connection = self._desktop
            if served != desktop and served_connection.state.name in ("CONNECTING", "OPEN"):
                return refuse(HTTPStatus.CONFLICT, f"busy: serving desktop {served}")
        self._desktop = (desktop, connection)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        desktop = ws.request.headers.get(DESKTOP_HEADER, "?")
        previous = self._connection
        if previous is not None and previous is not ws:
            log.info("desktop %s reconnected: closing its older connection", desktop)
            await previous.close(CLOSE_GOING_AWAY, "a newer connection from the same desktop took over")
        self._connection = ws
        log.info("desktop %s connected from %s", desktop, _peer(ws))
        sender: asyncio.Task | None = None
        acks: asyncio.Queue = asyncio.Queue()  # chunk acks, sent in order, each once the link has carried its chunk
        acker = asyncio.create_task(self._send_queued(ws, acks))
        try:
            async for frame in ws:
                request_id = None
                try:
                    if isinstance(frame, bytes):
                        if sender is None:
                            raise ProtocolError("a binary frame before hello", code="out_of_place")
                        self._on_chunk(frame, acks)
                        continue
                    message = decode(frame)
                    request_id = getattr(message, "id", None)
                    if sender is None:
                        if not isinstance(message, Hello):
                            raise ProtocolError(f"{message.type} before hello", code="out_of_place")
                        await self._send(ws, Welcome(reply_to=message.id, agent=self.info, state=self.agent_state()))
                        self.outbox.ack(message.acked)
                        sender = asyncio.create_task(self._send_outbox(ws, max(message.acked, self.outbox.acked_seq)))
                        continue
                    await self._on_message(ws, message)
                except InputError as exc:
                    code = getattr(exc, "code", "bad_request")
                    request_id = getattr(exc, "reply_to", request_id)
                    fatal = code in FATAL_CODES
                    log.error("desktop %s: %s%s: %s", desktop, code, " (closing)" if fatal else "", exc)
                    await self._send(ws, Error(reply_to=request_id, code=code, message=str(exc), fatal=fatal))
                    if fatal:
                        await ws.close(CLOSE_POLICY, f"{code}: {exc}"[:120])
                        break
                except (ConnectionClosed, asyncio.CancelledError):
                    raise
                except Exception as exc:  # a fault of the agent's own (a full disk, a bug): say so, keep serving
                    log.exception("desktop %s: failed on a frame", desktop)
                    await self._send(ws, Error(reply_to=request_id, code="internal",
                                               message=f"the agent failed: {type(exc).__name__}: {exc}"))
        except ConnectionClosed as exc:
            sent = exc.sent
            if sent is not None and sent.code == 1009:
                log.error("desktop %s: a frame over %d bytes: closed with 1009", desktop, MAX_FRAME_BYTES)
        finally:
            acker.cancel()
            if sender is not None:
                sender.cancel()
            if self._connection is ws:
                self._connection = None
            log.info("desktop %s disconnected (close code %s)", desktop, ws.close_code)

    async def _send(self, ws: ServerConnection, message) -> None:
        frame = encode(message)
        if self.shaper is not None:
            await self.shaper.carry(len(frame))
        try:
            await ws.send(frame)
        except ConnectionClosed:
            pass  # what was not delivered is in the outbox, or is asked for again

    async def _send_queued(self, ws: ServerConnection, queue: asyncio.Queue) -> None:
        while True:
            await self._send(ws, await queue.get())

    async def _send_outbox(self, ws: ServerConnection, after: int) -> None:
        """Send every outbox entry past ``after``, then each new one; coalesced while the link is busy."""
        wake = asyncio.Event()
        unsubscribe = self.outbox.subscribe(wake.set)
        sent = after
        try:
            while True:
                wake.clear()
                frames = self.outbox.frames_after(max(sent, self.outbox.acked_seq))
                if not frames:
                    await wake.wait()
                    continue
                for frame in frames:
                    pace = paced_rate(self.shaper, frame.paced_bytes_per_s)
                    if pace is not None:
                        await ws.send(paced_fragments(frame.text, pace))
                    else:
                        if self.shaper is not None:
                            await self.shaper.carry(len(frame.text))
                        await ws.send(frame.text)
                    sent = frame.last_seq
        except ConnectionClosed:
            pass
        finally:
            unsubscribe()

    async def _to_desktop(self, message) -> None:
        """Send to whichever connection is open now, if any (round errors and late replies)."""
        if self._connection is not None:
            await self._send(self._connection, message)

    async def _in_worker(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # -- messages --------------------------------------------------------------------------

    async def _on_message(self, ws: ServerConnection, message) -> None:
        if isinstance(message, Ack):
            self.outbox.ack(message.seq)
        elif isinstance(message, Offer):
            have = await asyncio.to_thread(self.store.offer, message)
            self._offers[message.sha256] = message.id
            log.info("offer %s (%d bytes): holds %d", message.name, message.size, have)
            await self._send(ws, OfferReply(reply_to=message.id, sha256=message.sha256, have=have))
        elif isinstance(message, DataShard):
            await self._on_data_shard(ws, message)
        elif isinstance(message, StartRound):
            await self._on_start_round(ws, message)
        elif isinstance(message, (Pause, Resume, Stop)):
            await self._on_control(ws, message)
        elif isinstance(message, ProfileRequest):
            await self._on_profile(ws, message)
        elif isinstance(message, Hello):
            raise ProtocolError("hello twice on one connection", code="bad_request")
        else:
            raise ProtocolError(f"{message.type} is a message the agent sends, not one it takes", code="out_of_place")

    def _on_chunk(self, frame: bytes, acks: asyncio.Queue) -> None:
        chunk = decode_chunk(frame)
        arrived = time.monotonic()
        if self.shaper is not None:
            arrived = self.shaper.reserve(len(frame))  # its ack waits behind these bytes in _send
        try:
            have, complete = self.store.write(chunk)
        except ProtocolError as exc:
            exc.reply_to = self._offers.get(chunk.sha256)  # the error answers the file's offer
            self._arrivals.pop(chunk.sha256, None)
            raise
        first = self._arrivals.setdefault(chunk.sha256, (arrived, have))
        if complete:
            self._offers.pop(chunk.sha256, None)
            del self._arrivals[chunk.sha256]
            carried, seconds = have - first[1], arrived - first[0]  # after the first chunk: its bytes set the start
            if carried >= LINK_SAMPLE_BYTES and seconds > 0:
                self._link_bytes_per_s = carried / seconds
                write_bytes_atomic(self.state_dir / LINK_FILE, json.dumps({"bytes_per_s": carried / seconds,
                                                                           "bytes": carried}).encode())
                log.info("link measured on %d bytes: %.1f Mbit/s", carried, self._link_bytes_per_s * 8e-6)
        acks.put_nowait(ChunkAck(sha256=chunk.sha256, have=have, complete=complete))

    async def _on_data_shard(self, ws: ServerConnection, message: DataShard) -> None:
        if await self._busy():
            raise ProtocolError("the data cannot change while a round runs", code="busy")
        shard = await asyncio.to_thread(load_shard, self.store.path(message.sha256), message.sha256)
        self._shard = shard
        write_bytes_atomic(self.state_dir / "data.json", json.dumps({"shard": message.sha256}).encode())
        log.info("training data: shard %s… (%d examples)", message.sha256[:12], shard.summary.examples)
        await self._send(ws, DataReady(reply_to=message.id, data=shard.summary))

    def _read_link(self) -> float | None:
        """The link rate measured before this start (None: never measured, or the file is unreadable)."""
        try:
            rate = float(json.loads((self.state_dir / LINK_FILE).read_text())["bytes_per_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rate if rate > 0 else None

    async def _on_profile(self, ws: ServerConnection, request: ProfileRequest) -> None:
        if await self._busy():
            raise ProtocolError("a round is running: the probe would time the round, not the device", code="busy")
        probe = probe_view(self.store, self.state_dir / "programs", request.probe)
        simulated = self.config.simulate
        link = simulated.link_bytes_per_s if simulated else (request.link_bytes_per_s or self._link_bytes_per_s)
        if link is None:
            raise ProtocolError(f"the agent has not measured its link yet (it does on a transfer of at least "
                                f"{LINK_SAMPLE_BYTES >> 20} MiB): send one first, or give link_bytes_per_s",
                                code="bad_request")
        log.info("profiling with probe %s…", request.probe[:12])
        profile = await self._in_worker(measure_device, probe, self.info.name, link, self.clock, bool(simulated))
        if self.memory_cap is not None:  # what the simulated device has left, not what the host has
            held = self._process.memory_info().rss
            profile = dataclasses.replace(profile, memory_bytes=float(max(self.memory_cap - held, 0)))
        await self._send(ws, ProfileResponse(reply_to=request.id, profile=profile, simulated=self.info.simulated))

    async def _busy(self) -> bool:
        """A round is running (one whose result is already out is waited for: it is finishing)."""
        task = self._round_task
        if task is None or task.done():
            return False
        if self._control.finished:
            await asyncio.wait({task})
            return False
        return True

    async def _on_start_round(self, ws: ServerConnection, request: StartRound) -> None:
        if await self._busy():
            raise ProtocolError(f"round {self._round.round if self._round else '?'} is running; stop it first",
                                code="busy")
        if request_key(request) == self._completed.get("key"):
            # Asked again for a round that finished (its answer was lost with a connection, or the agent
            # was restarted after it): the result is in the outbox, and the replay delivers it.
            await self._send(ws, Status(reply_to=request.id, state="idle", round=request.round,
                                        step=self._completed.get("steps", request.k)))
            return
        view_manifest, manifest = program_view(self.store, self.state_dir / "programs", request.program)
        if request.b_size != manifest.b_size:
            raise ProtocolError(f"round {request.round}: b has {request.b_size} values, the program's adapter "
                                f"({manifest.model_id}) has {manifest.b_size}", code="bad_request")
        if self._shard is None and self._private is None:
            raise ProtocolError(self._private_error or "no training data: send a shard, or start the agent with "
                                "--data", code="bad_data")
        self._phase = "loading" if self._program is None or self._program[0] != request.program else "training"
        self._control = _RoundControl()
        self._round_task = asyncio.create_task(self._run_round(request, view_manifest, manifest))
        await self._send(ws, Status(reply_to=request.id, state=self._phase, round=request.round, step=0))

    async def _on_control(self, ws: ServerConnection, message: Pause | Resume | Stop) -> None:
        control, task = self._control, self._round_task
        if not await self._busy():
            await self._send(ws, self._status(message.id))
            return
        if isinstance(message, Resume):
            control.running.set()
            if self._phase == "paused":
                self._phase = "training"  # the round takes its next step as soon as the loop runs
            await self._send(ws, self._status(message.id))
            return
        if isinstance(message, Pause):
            control.running.clear()
            waits_for = control.parked.wait()
        else:
            control.stop = True
            control.running.set()
            waits_for = asyncio.wait({task})

        async def reply_at_boundary() -> None:  # a task: the connection goes on reading meanwhile
            waiter = asyncio.ensure_future(waits_for)
            await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            await self._send(ws, self._status(message.id))

        asyncio.create_task(reply_at_boundary())

    # -- rounds ------------------------------------------------------------------------------

    def _prepare(self, request: StartRound, view_manifest: Path, manifest: Manifest) -> RoundRunner:
        """On the compute thread: the program loaded, the rows fitted, a runner (kept between rounds)."""
        if self._program is not None and self._program[0] != request.program:
            self._program = self._runner = None  # release the old program's memory before the new one's
            gc.collect()
        if self._program is None:
            if self.memory_cap is not None:
                need = estimated_need_bytes(self._process.memory_info().rss, *files_bytes(view_manifest, manifest))
                if need > self.memory_cap:
                    raise ProtocolError(f"program {manifest.method_files['step']} needs about {need / 2**20:.0f} MiB, "
                                        f"the {self.info.simulated} has {self.memory_cap / 2**20:.0f} MiB",
                                        code="memory")
            started = time.perf_counter()
            self._program = (request.program, load_program(view_manifest, manifest, one_thread=self.config.simulate is not None,
                                                             memory_cap_bytes=self.memory_cap))
            log.info("loaded program %s (%s) in %.2f s", manifest.method_files["step"], manifest.model_id,
                     time.perf_counter() - started)
        data = self._shard or self._private.for_program(manifest, self._tokenizer(view_manifest, manifest))
        runner = self._runner
        if runner is None or runner.program_sha != request.program or runner.data_key != data.key:
            rows = fit_to_program(data, manifest)
            runner = self._runner = RoundRunner(self._program[1], request.program, rows, data.key, self.state_dir,
                                                clock=self.clock)
        return runner

    def _tokenizer(self, view_manifest: Path, manifest: Manifest) -> Path | None:
        """The program's tokenizer.json if it names one the agent holds, else ``--tokenizer``."""
        if "tokenizer" in manifest.files and manifest.file("tokenizer", view_manifest).exists():
            return manifest.file("tokenizer", view_manifest)
        return self.config.tokenizer

    def _emit(self, event: Step) -> None:
        self.outbox.add_step(dataclasses.replace(event, device=self.info.name))

    async def _run_round(self, request: StartRound, view_manifest: Path, manifest: Manifest) -> None:
        control = self._control
        try:
            runner = await self._in_worker(self._prepare, request, view_manifest, manifest)
            state = await self._in_worker(runner.start, request)
            self._round, self._interrupted, self._phase = state, None, "training"
            log.info("round %d: %d steps%s", request.round, request.k,
                     f", continuing after step {state.step}" if state.step else "")
            if state.last_step is not None and self.outbox.last_step != (request.round, state.last_step["step"]):
                # Killed after the step's checkpoint, before its metric was written: write it now.
                self._emit(Step(**state.last_step))
            pacer = Pacer() if self.config.simulate else None
            while state.step < request.k and not control.stop:
                if not control.running.is_set():
                    self._phase = "paused"
                    control.parked.set()
                    await control.running.wait()
                    control.parked.clear()
                    self._phase = "training"
                    if control.stop:
                        break
                event = await self._in_worker(runner.step, state)
                if pacer is not None:
                    # The simulated device finishes its step when its clock says, and only then reports
                    # it: sent earlier, the desktop would see the step end before the round's time did,
                    # and count the wait after the round's last step as upload time.
                    await pacer.after_step(event.seconds)
                    event = dataclasses.replace(event, ended_at=time.time())
                self._emit(event)
                if self.memory_cap is not None and (event.peak_rss_mb or 0) * 2**20 > self.memory_cap:
                    raise ProtocolError(f"round {request.round}: the agent reached {event.peak_rss_mb:.0f} MiB, over "
                                        f"the {self.info.simulated}'s {self.memory_cap / 2**20:.0f} MiB",
                                        code="memory")
            block = runner.block_b
            done = self.outbox.add_round(lambda seq: RoundDone(
                seq=seq, round=request.round, program=request.program, device=self.info.name, steps=state.step,
                stopped=state.step < request.k, block_offset=runner.span.offset, block_size=runner.span.size,
                b_block=encode_f32(block), seconds=state.seconds, mean_loss=state.loss_sum / max(state.step, 1),
                simulated=self.info.simulated, resumed_at=state.resumed_at,
                paced_bytes_per_s=request.link_bytes_per_s))  # in the outbox with it: a replay is paced too
            control.finished = True
            self._completed = {"round": request.round, "key": state.key, "seq": done.seq, "steps": state.step}
            write_bytes_atomic(self.state_dir / "completed.json", json.dumps(self._completed).encode())
            await self._in_worker(runner.finish, state)
            log.info("round %d done: %d steps, %.3f s on the device clock%s", request.round, state.step,
                     state.seconds, " (stopped)" if done.stopped else "")
        except InputError as exc:
            code = getattr(exc, "code", "bad_request")
            log.error("round %d failed: %s: %s", request.round, code, exc)
            await self._to_desktop(Error(reply_to=request.id, code=code, message=str(exc)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the runtime failing mid-round: say so, keep serving
            log.exception("round %d failed", request.round)
            await self._to_desktop(Error(reply_to=request.id, code="internal",
                                         message=f"round {request.round} failed: {type(exc).__name__}: {exc}"))
        finally:
            self._phase = "idle"  # _round stays: the last round and its steps, for Status and Welcome


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
