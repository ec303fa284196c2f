"""The fleet engine: discover, pair, profile, plan, export, ship, train in rounds, merge, report.

One asyncio object, no Qt: the dashboard and ``deftly run`` are two faces of it.
A face builds an :class:`Engine` from an :class:`EngineConfig`, subscribes to
its events (:meth:`Engine.subscribe` for a plain callback, :meth:`Engine.events`
for an asyncio queue), reads :attr:`Engine.state` (the state model, changed by
the events alone) and may call, from the engine's loop or any thread:
:meth:`add_agent`, :meth:`pause`, :meth:`resume`, :meth:`stop`, :meth:`reprofile`.
:meth:`run` does the whole job and returns when the run is over. A face that
lets the operator see and pair devices before choosing the job (the dashboard)
calls :meth:`open` first, which finds and pairs agents until :meth:`run` is
given the job, and :meth:`close` when it goes away.

The flow, one step per method below:

1. **find** agents: zeroconf (``--discover``) and addresses (``--agent``); pair
   each with its token over one WebSocket (``desktop.engine.client``). With
   ``pair_only``, a discovered agent not named there (by id or ``HOST:PORT``) is
   shown as seen and left alone: no pairing attempt, no error (the demo's engine
   pairs only the agents the demo started, whatever else advertises nearby);
2. **profile**: a profile measured earlier for this device and model is reused
   (``desktop.engine.profiles``) unless asked again; else the agent runs the
   job's probe program;
3. **plan**: the job derived from its eval program's manifest and the probe
   (``shared.jobs``), the planner on the measured profiles
   (``desktop.engine.planning``); ``plan.json`` and a PlanMade event;
4. **export** the plan's block programs and the job's eval program in a worker
   process (``desktop.engine.exports``), from the export cache where it can;
5. **ship** to each device the files its program needs (by hash: a file it
   holds is never sent again) and its data: a shard of the training split
   (``desktop.engine.shards``), or its own ``--data``;
6. **rounds**: every device starts from the same global b and runs K local
   steps of its block; the blocks come back and are merged
   (``shared.blocks.merge_b``); the merged adapter is evaluated on the
   validation split here, on the coordinator; one Round line per round;
7. **output**: the adapter (PEFT, with its calibration side-car) from the last
   merged b, the test accuracy, ``report.md`` with its plots.

Faults: a device whose connection stays down past the patience window is lost:
its unfinished round is dropped (its slice of b keeps the last merged values),
the rest re-plan at the round boundary and go on, and it rejoins at the next
boundary once it is back. A device that reports an error for its program is
shown with the message and left out of the next plan. :meth:`stop` (Ctrl-C)
stops the agents at their next step boundary and writes the adapter from the
last merged b. Every metric is written to ``metrics.jsonl`` before it is
acknowledged, so ``--resume`` after the desktop itself died loses nothing.
"""
from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from desktop.engine import profiles as profile_cache
from desktop.engine.discovery import Advert, Browser, advert_from_address, parse_address
from desktop.engine.events import (
    Assignment, DeviceBack, DeviceError, DeviceGone, DeviceLost, DeviceProfiled, DeviceRoundDone, DeviceSeen,
    DeviceStatus,
    EngineEvent, EventBus, Notice, PhaseChanged, PlanMade, PlanView, RoundMerged, RoundStarted,
    RunFinished, StepReceived, TransferProgress,
)
from desktop.engine.exports import ExportRequest, ExportResult, block_key, run_export
from desktop.engine.job import JobSpec
from desktop.engine.planning import POLICIES, fleet_names, make_plan
from desktop.engine.rundir import DeviceRecord, LossRecord, RunDir, RunRecord, RunSettings
from device_agent.trainer import step_lengths
from desktop.engine.predict import (
    Calibration, TrainerPosition, lengths_of_round, predicted_round_s, round_compute_s,
)
from desktop.engine.shards import cut_shards, job_buckets, run_step_mix, write_shard
from desktop.engine.state import EngineState
from shared.blocks import BlockSpan, merge_b
from shared.errors import InputError
from shared.events import Eval, Round, Step, Test
from shared.hashing import sha256_file
from shared.manifest import Manifest
from shared.profiles import DeviceProfile, Job
from shared.protocol_limits import LOST_PATIENCE_S, REQUEST_TIMEOUT_S

log = logging.getLogger("deftly.engine")

DISCOVER_S = 5.0  # with --discover and no device count: browse this long after the first device
SYNC_INTERVAL_S = 0.2  # metrics.jsonl is fsynced this often (each line is written before its ack)
LEFT_ALONE = "not one of this run's agents: left alone"  # a card's detail for an agent pair_only leaves out
DEFAULT_ROUNDS = 5  # a run's rounds, unless told (`deftly plan --programs` prices the same run)
DEFAULT_LOCAL_STEPS = 10  # K, steps per device per round, likewise
STOP_WAIT_S = 30.0  # after stop(): wait this long for the agents' stopped rounds before giving up
STALL_FACTOR = 20.0  # a connected device silent for this many predicted step times (or ...
STALL_MIN_S = 300.0
LINK_PROBE_MIN_BYTES = 1 << 20  # the link rate is measured on the probe's transfer when at least this much crossed  # ... this many seconds, whichever is more) in a round is treated as lost


@dataclass(frozen=True)
class EngineConfig:
    """Everything a run decides; one flat record, defaults commented."""

    job: JobSpec
    out: Path  # the run directory, runs/NAME
    rounds: int = DEFAULT_ROUNDS
    local_steps: int = DEFAULT_LOCAL_STEPS  # K: steps per device per round
    agents: tuple[str, ...] = ()  # "[TOKEN@]HOST:PORT" of agents added by address
    discover: bool = False  # browse _deftly._tcp.local. too
    pair_only: tuple[str, ...] | None = None  # discovered agents to pair, by agent id or "HOST:PORT" as advertised
    #                                           (None: every one found); others are seen and left alone
    token: str | None = None  # the pairing token of agents that have none of their own here
    devices: int | None = None  # plan once this many devices are paired (default: the --agent count, or
    #                             every device discovery finds within discover_s)
    discover_s: float = DISCOVER_S
    wait_s: float = 120.0  # give up waiting for devices after this long (not with hold)
    hold: bool = False  # pair what is found, then wait for begin() before planning (a dashboard's Start)
    mdns_interfaces: tuple[str, ...] | None = None  # addresses to bind mDNS to (None: every interface)
    resume: bool = False
    seed: int = 0  # seeds the shards, the directions z and the batch order on every device
    policy: str = "planned"  # "planned" or "equal_random" (the benchmark's baseline)
    replicas: bool = False  # devices beyond the blocks train replicas of them, averaged (desktop.engine.planning)
    eval_limit: int | None = None  # validation examples per round (default: the whole split)
    test_limit: int | None = None  # test examples at the end (default: all)
    test: bool = True  # evaluate the final adapter on the test split
    zero_shot: bool = False  # evaluate the untrained adapter too (round 0), while round 1 trains
    reprofile: bool = False  # measure every device again even if a profile is cached
    cache_dir: Path | None = None  # export and profile caches (default ~/.cache/deftly)
    patience_s: float = LOST_PATIENCE_S  # a connection down this long: the device is lost
    desktop_name: str = field(default_factory=socket.gethostname)

    def check(self) -> None:
        """Raises InputError naming the first setting out of range."""
        if self.rounds < 1:
            raise InputError(f"--rounds must be at least 1, got {self.rounds}")
        if self.local_steps < 1:
            raise InputError(f"--local-steps must be at least 1, got {self.local_steps}")
        if not self.agents and not self.discover:
            raise InputError("no agents: give --agent HOST:PORT (one per agent) or --discover")
        if self.pair_only is not None and not self.pair_only:
            raise InputError("--pair-only names no agent: every discovered agent would be left alone")
        if self.policy not in POLICIES:
            raise InputError(f"--policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.devices is not None and self.devices < 1:
            raise InputError(f"--devices must be at least 1, got {self.devices}")
        for name in ("eval_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for address in self.agents:
            parse_address(address)
        self.job.check("the job")


@dataclass(frozen=True)
class RunResult:
    """What :meth:`Engine.run` returns."""

    out: Path
    adapter: Path | None
    rounds_done: int
    stopped: bool
    val_accuracy: float | None
    test_accuracy: float | None
    b: np.ndarray | None = field(default=None, repr=False)


class StopRequested(Exception):
    """The operator asked the run to stop (Ctrl-C, stop())."""


class _DeviceGone(Exception):
    """A device left a round: lost (connection), or failed (its error)."""

    def __init__(self, reason: str, lost: bool) -> None:
        super().__init__(reason)
        self.reason, self.lost = reason, lost


@dataclass
class _Device:
    """The engine's bookkeeping for one agent."""

    key: str  # the agent's id once it said it, else its address
    name: str
    host: str
    port: int
    token: str | None
    via: str  # "mdns" or "address"
    link: "object | None" = None  # its desktop.engine.client.AgentClient once paired
    tls: "object | None" = None  # desktop.engine.pins.TlsHint: what its advert or address said of TLS
    agent_id: str | None = None
    label: str = ""  # the unique name metrics and the planner know it by
    profile: DeviceProfile | None = None
    profile_cached: bool = False
    simulated: str | None = None
    private_data: bool = False  # trains on its own --data
    shard: Path | None = None
    shard_sha: str | None = None
    data_sent: str | None = None  # sha256 of the shard it holds as its data
    programs: dict[str, str] = field(default_factory=dict)  # manifest path -> sha256, shipped to it
    failed: str | None = None  # why it was left out (its error), until it is added again
    lost: bool = False
    back: bool = False  # came back after being lost: rejoins at the next boundary
    down_since: float | None = None  # loop time its connection dropped (None: up)
    stale_until: int = 0  # outbox entries up to this seq are from before this run
    round_number: int | None = None  # the round it trains now
    program_sha: str | None = None  # the program of that round
    last_metric_at: float | None = None  # loop time of its last metric in that round
    done_at: float | None = None  # loop time its RoundDone arrived
    reprofile: bool = False
    connecting: bool = False
    resumed: bool = False  # known from the run's state: its round in flight may be running on it still
    # Each round's prediction (desktop.engine.predict): where its trainer stands, what its steps
    # measured against their prices, the lengths its trainer draws on its shard, this round's prices.
    position: TrainerPosition = field(default_factory=TrainerPosition)
    calibration: Calibration = field(default_factory=Calibration)
    lengths: np.ndarray | None = None
    step_s_at: dict[int, float] = field(default_factory=dict)
    predicted_s: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def usable(self) -> bool:
        return self.link is not None and self.profile is not None and not self.lost and self.failed is None


class Engine:
    """See the module docstring."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.state = EngineState(rounds=config.rounds, local_steps=config.local_steps)
        self.bus = EventBus(self.state.apply)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._devices: dict[str, _Device] = {}
        self._stop_reason: str | None = None
        self._stop_event: asyncio.Event | None = None
        self._paused = False
        self._begun = False
        self._changed: asyncio.Event | None = None  # a device joined, left or came back
        self._pending_calls: list[Callable[[], None]] = []
        self.run_dir = RunDir(Path(config.out))
        self.record: RunRecord | None = None
        self.b: np.ndarray | None = None
        self.manifest: Manifest | None = None  # the eval program's: the layout and the task's data
        self.eval_manifest_path: Path | None = None
        self.programs: dict[str, Path] = {}  # block key -> manifest path
        self.probe = None  # the job's probe manifest (shared.probe.ProbeManifest)
        self.probe_path: Path | None = None
        self._evaluator = None
        self._splits = None
        self._desktop_id = profile_cache.desktop_id(config.cache_dir)
        self._syncer: asyncio.Task | None = None
        self._browser: Browser | None = None
        self._tasks: set[asyncio.Task] = set()
        self._finding = False  # the --agent addresses were taken and the browser started
        self._left_alone: dict[str, Advert] = {}  # discovered agents pair_only leaves out, by their card's key
        self._zero_shot: asyncio.Task | None = None  # the untrained adapter's evaluation (config.zero_shot)
        self._idle: asyncio.Event | None = None  # set while no run() is in progress

    # -- what a view may call -------------------------------------------------------------

    def subscribe(self, callback: Callable[[EngineEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on the engine's loop for every event; returns the unsubscribe function."""
        return self.bus.subscribe(callback)

    def events(self, maxsize: int = 0) -> asyncio.Queue:
        """An asyncio queue of every event from now on (call on the engine's loop)."""
        return self.bus.queue(maxsize)

    def add_agent(self, address: str, token: str | None = None) -> None:
        """Add an agent by ``[wss://][TOKEN@]HOST:PORT[#sha256:FP]`` (``desktop.engine.discovery.parse_address``);
        it is paired at once and planned for at the next boundary."""
        advert, inline = advert_from_address(address)
        self._call(lambda: self._consider(advert, token or inline))

    def begin(self) -> None:
        """With ``hold``: plan now, with the devices paired so far."""
        def do() -> None:
            self._begun = True
            self._wake()
        self._call(do)

    def stop(self, reason: str = "stopped by the operator") -> None:
        """Stop at the next step boundary; the adapter is written from the last merged b."""
        def do() -> None:
            if self._stop_reason is None:
                self._stop_reason = reason
                if self._stop_event is not None:
                    self._stop_event.set()
        self._call(do)

    def pause(self) -> None:
        """Hold every device at its next step boundary."""
        self._call(lambda: self._control_all("pause"))

    def resume(self) -> None:
        self._call(lambda: self._control_all("resume"))

    def reprofile(self, device: str) -> None:
        """Measure this device again before the next plan instead of using its cached profile."""
        def do() -> None:
            if device in self._devices:
                self._devices[device].reprofile = True
                self._wake()
        self._call(do)

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine's loop, from the loop or from any thread."""
        loop = self._loop
        if loop is None:
            self._pending_calls.append(fn)
        elif _on_loop(loop):
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _emit(self, event: EngineEvent) -> None:
        self.bus.emit(event)

    def _phase(self, phase: str, detail: str = "") -> None:
        self._emit(PhaseChanged(phase, detail))

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- the run ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Find and pair agents now, before :meth:`run` is given the job (a dashboard's lobby).

        Devices appear and pair as events (with a token from the config, the cache, or
        typed later through :meth:`add_agent`); :meth:`run` then goes on with them.
        """
        self._start_loop()
        self._take_pending_calls()
        if not self._finding:
            self._phase("discovering", "choose the job and start the run")
            await self._start_finding()

    async def close(self) -> None:
        """The face is closing: stop a run in progress (it writes its adapter), let every agent go."""
        if self._loop is None:
            return
        if self._idle is not None and not self._idle.is_set():
            self.stop("the dashboard was closed")
            await self._idle.wait()
        await self._shutdown(stop_agents=True)

    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def _take_pending_calls(self) -> None:
        """The calls a view made before the loop ran (add_agent, stop, ...), in order."""
        for fn in self._pending_calls:
            fn()
        self._pending_calls.clear()

    async def run(self, config: EngineConfig | None = None) -> RunResult:
        """Do the whole run (see the module docstring); returns when it is over.

        Args:
            config: the run's settings, when they were chosen after :meth:`open` (the job of a
                dashboard); None: the ones the engine was built with.

        Raises:
            InputError: bad settings, a job the exporter or the planner refuses, no device that
                can train; every one names what and where.
        """
        if config is not None:
            if self.record is not None:
                raise InputError("this engine has run already: a new run needs a new engine")
            self.config = config
            self.state.rounds, self.state.local_steps = config.rounds, config.local_steps
            self.run_dir = RunDir(Path(config.out))
        self.config.check()
        self._start_loop()
        self._idle.clear()
        try:
            return await self._run()
        finally:
            self._idle.set()

    async def _run(self) -> RunResult:
        stopped = False
        preparing: asyncio.Task | None = None
        try:
            self._open_run()
            self._take_pending_calls()
            self._syncer = asyncio.create_task(self._sync_loop())
            # The job's eval program and probe do not depend on the devices: export them meanwhile.
            preparing = asyncio.create_task(self._prepare_job())
            await self._find_devices()
            await preparing
            await self._profile_devices()
            await self._plan_export_ship(reason="start" if not self.record.completed_round else "resumed")
            await self._train()
        except StopRequested:
            stopped = True
            if preparing is not None and not preparing.done():
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
        except BaseException as exc:
            if preparing is not None and not preparing.done():
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
            if isinstance(exc, InputError):
                self._emit(DeviceError(None, str(exc), fatal=True))
            self._phase("failed", str(exc))
            await self._shutdown(stop_agents=True)
            self.run_dir.close()
            raise
        return await self._finish(stopped)

    # -- 0. the run directory ----------------------------------------------------------------

    def _settings(self) -> RunSettings:
        return RunSettings(job=self.config.job.identity(), rounds=self.config.rounds, local_steps=self.config.local_steps,
                           lr=self.config.job.lr, eps=self.config.job.eps, seed=self.config.seed,
                           policy=self.config.policy)

    def _open_run(self) -> None:
        settings = self._settings()
        if self.config.resume:
            record, b = self.run_dir.load()
            self.run_dir.check_settings(record, settings)
            self.record = replace(record, settings=replace(record.settings, rounds=self.config.rounds),
                                  finished=False)
            self.b = b
            for device in record.devices:
                # round_number: the round that was running when the desktop stopped, so the metrics
                # the agent replays for it on connecting are taken.
                self._devices[device.id] = _Device(device.id, device.name, *_split_address(device.address),
                                                   token=None, via="address", agent_id=device.id,
                                                   label=device.name, round_number=record.completed_round + 1,
                                                   resumed=True,
                                                   shard=self.run_dir.shards_dir / device.shard if device.shard
                                                   else None, shard_sha=device.shard_sha256,
                                                   private_data=device.data == "private")
            self._emit(Notice(f"resuming {self.run_dir.path}: {record.completed_round} round(s) merged"))
        else:
            self.record = self.run_dir.create(settings)

    # -- 1. find and pair ----------------------------------------------------------------------

    async def _start_finding(self) -> None:
        """Take the --agent addresses and start browsing (once, whether from open() or run())."""
        self._finding = True
        for address in self.config.agents:
            self._consider(*advert_from_address(address))
        if self.config.discover:
            self._browser = Browser(self._seen, self._gone, list(self.config.mdns_interfaces or []) or None)
            await self._browser.start()

    async def _find_devices(self) -> None:
        self._phase("discovering")
        if not self._finding:
            await self._start_finding()
        for device in list(self._devices.values()):  # a resumed run's devices, by their last address
            if device.link is None and device.failed is None:
                self._connect_soon(device)
        self._remember_devices()  # the ones paired before the run (open()) go into its state
        wanted = self.config.devices or (len(self.config.agents) if not self.config.discover else None)
        if self.config.resume and self.record.devices and wanted is None:
            wanted = len(self.record.devices)
        started = time.monotonic()
        first_at: float | None = None
        while True:
            self._check_stop()
            paired = [d for d in self._devices.values() if d.link is not None and d.failed is None]
            if self.config.hold:
                if self._begun and paired:
                    break
                await self._wait_change(0.5)
                continue
            if paired and first_at is None:
                first_at = time.monotonic()
            if wanted is not None and len(paired) >= wanted:
                break
            if wanted is None and first_at is not None and time.monotonic() - first_at >= self.config.discover_s:
                break
            if time.monotonic() - started > self.config.wait_s:
                if paired:
                    self._emit(Notice(f"waited {self.config.wait_s:.0f} s: going on with {len(paired)} device(s)"))
                    break
                failures = "; ".join(f"{d.name}: {d.failed}" for d in self._devices.values() if d.failed)
                raise InputError(f"no agent could be paired within {self.config.wait_s:.0f} s"
                                 + (f" ({failures})" if failures else
                                    " (none found: check --agent addresses, or that multicast reaches them)")
                                 + self._left_alone_text())
            await self._wait_change(0.5)
        if self._left_alone:
            self._emit(Notice(f"{len(self._left_alone)} other agent(s) seen and left alone (not this run's):"
                              f"{self._left_alone_text(lead='')}"))

    def _left_alone_text(self, lead: str = "; left alone, not this run's:") -> str:
        return (lead + " " + ", ".join(f"{a.name} ({a.address})" for a in self._left_alone.values())
                if self._left_alone else "")

    def _pairs_with(self, advert: Advert) -> bool:
        """Whether a discovered advert is one this run may pair (``pair_only``: by its id or its address)."""
        allowed = self.config.pair_only
        return allowed is None or advert.address in allowed or (advert.id is not None and advert.id in allowed)

    def _seen(self, advert: Advert) -> None:
        if self._find(advert.id, advert.host, advert.port) is None and not self._pairs_with(advert):
            self._leave_alone(advert)
            return
        self._consider(advert, None)

    def _leave_alone(self, advert: Advert) -> None:
        """Another fleet's agent: its card says it was seen; no pairing, so no wrong-token error either."""
        key = advert.id or advert.address
        new = key not in self._left_alone
        self._left_alone[key] = advert
        self._emit(DeviceSeen(key, advert.name, advert.address, advert.via, advert.simulated, arch=advert.arch,
                              cores=advert.cores, memory_mb=advert.memory_mb, runtime=advert.runtime))
        self._emit(DeviceStatus(key, "seen", LEFT_ALONE))
        if new:
            self._emit(Notice(f"another agent seen and left alone (not this run's): {advert.name} ({advert.address})"))

    def _gone(self, advert: Advert) -> None:
        key = advert.id or advert.address
        if self._left_alone.pop(key, None) is not None:
            self._emit(DeviceGone(key))
            return
        device = self._find(advert.id, advert.host, advert.port)
        if device is not None:
            self._emit(DeviceGone(device.key))

    def _find(self, agent_id: str | None, host: str, port: int) -> _Device | None:
        if agent_id and agent_id in self._devices:
            return self._devices[agent_id]
        return next((d for d in self._devices.values() if (d.host, d.port) == (host, port)), None)

    def _consider(self, advert: Advert, token: str | None) -> None:
        """A device seen (mDNS) or named (address): remember it and pair it unless it already is."""
        from desktop.engine import pins

        device = self._find(advert.id, advert.host, advert.port)
        if advert.via == "address":  # the operator named it: paired even if pair_only had left it alone
            for key in [k for k, a in self._left_alone.items() if a.address == advert.address]:
                del self._left_alone[key]
        if device is None:
            device = _Device(advert.id or advert.address, advert.name, advert.host, advert.port, token, advert.via,
                             simulated=advert.simulated, label=advert.name)
            self._devices[device.key] = device
        else:
            device.host, device.port = advert.host, advert.port
            device.token = token or device.token
            device.simulated = advert.simulated or device.simulated
            if device.failed and advert.via == "address":
                device.failed = None  # added again by the operator: try again
        device.tls = pins.hint(advert, device.tls)
        self._emit(DeviceSeen(device.key, advert.name if advert.via == "mdns" else device.name, advert.address,
                              advert.via, advert.simulated, arch=advert.arch, cores=advert.cores,
                              memory_mb=advert.memory_mb, runtime=advert.runtime))
        if device.link is None:
            self._connect_soon(device)

    def _connect_soon(self, device: _Device) -> None:
        if device.connecting:
            return
        device.connecting = True
        task = asyncio.create_task(self._pair(device))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _token_for(self, device: _Device) -> str | None:
        return device.token or profile_cache.known_token(self.config.cache_dir, device.agent_id) or self.config.token

    async def _pair(self, device: _Device) -> None:
        from desktop.engine import pins  # which TLS certificate it must present
        from desktop.engine.client import AgentClient  # the desktop side of one agent connection

        token = self._token_for(device)
        if token is None:
            device.connecting = False
            device.failed = "no pairing token"
            self._emit(DeviceError(device.key, f"{device.name} ({device.address}) needs its pairing token",
                                   "give it with --token, or --agent TOKEN@HOST:PORT; the agent prints it when it "
                                   "starts"))
            return
        self._emit(DeviceStatus(device.key, "pairing", device.address))
        client, wanted, agent_id = None, None, device.agent_id
        try:
            wanted = pins.expected(self.config.cache_dir, agent_id, device.tls or pins.TlsHint(), device.address)
            client = AgentClient(device.address, token, self._desktop_id, self.config.desktop_name,
                                 on_metric=lambda metric, d=device: self._on_metric(d, metric),
                                 on_round_done=lambda done, d=device: self._on_round_done(d, done),
                                 on_connection=lambda welcome, d=device: self._on_connection(d, welcome),
                                 tls=wanted.tls, tls_fingerprint=wanted.fingerprint)
            welcome = await client.connect()
            agent_id = welcome.agent.id
            pins.check(self.config.cache_dir, agent_id, client.tls_fingerprint, wanted)
        except InputError as exc:
            device.connecting = False
            device.failed = str(exc)
            message, advice = pins.explain(exc, wanted, self.config.cache_dir, agent_id) or (str(exc),
                                                                                             _pairing_advice(exc))
            self._emit(DeviceError(device.key, f"{device.name} ({device.address}): {message}", advice))
            self._emit(DeviceStatus(device.key, "error", message))
            if client is not None:
                await client.close()
            self._wake()
            return
        info = welcome.agent
        was = None  # the key a view knew this device by until now ("host:port" for an address typed in)
        if info.id != device.key:
            was = device.key
            other = self._devices.get(info.id)
            self._devices.pop(device.key, None)
            if other is not None and other is not device and other.link is None:
                # A resumed run knew it by id, or discovery and an address both named it: one device.
                other.host, other.port, other.token, other.via = device.host, device.port, token, device.via
                other.failed, other.connecting = None, True  # its old address failed; this one answered
                device = other
            elif other is not None and other is not device:
                await client.close()  # already paired through another address
                self._emit(DeviceSeen(other.key, other.name, other.address, other.via, other.simulated, was=was))
                return
            device.key = info.id
            self._devices[info.id] = device
        device.agent_id, device.name, device.simulated = info.id, info.name, info.simulated
        device.link = client
        if not self.config.resume or self.record.device(info.id) is None:
            # Entries the agent holds from before this run are not this run's: taken and dropped.
            device.stale_until = welcome.state.last_seq
        device.label = self._unique_label(device)
        pinned = pins.remember(self.config.cache_dir, info.id, token, client.tls_fingerprint, wanted)
        if pinned:
            self._emit(Notice(f"{info.name}: {pinned}"))
        data = welcome.state.data
        device.private_data = data is not None and data.source == "private"
        if welcome.state.data_error and not device.private_data:
            self._emit(Notice(f"{device.name}: its own data is unusable ({welcome.state.data_error}); "
                              f"it trains on a shard"))
        self._emit(DeviceSeen(device.key, info.name, device.address, device.via, info.simulated, arch=info.arch,
                              cores=info.cores, memory_mb=info.memory_mb, runtime=info.runtime, was=was))
        self._emit(DeviceStatus(device.key, "paired",
                                f"{info.runtime}, {info.arch}, {info.cores} cores, {info.memory_mb:.0f} MB"
                                + (f", simulating {info.simulated}" if info.simulated else "")))
        self._remember_devices()
        self._wake()

    def _unique_label(self, device: _Device) -> str:
        names = {d.key: d.name for d in self._devices.values() if d.agent_id}
        return fleet_names(names).get(device.key, device.name)

    def _remember_devices(self) -> None:
        """state.json: every paired device, so a resumed run finds them again."""
        record = self.record
        if record is None:  # paired before the run began (open()): written when it does
            return
        for d in self._devices.values():
            if d.agent_id is None:
                continue
            old = record.device(d.key)
            record = record.with_device(DeviceRecord(
                d.key, d.label, d.address, acked_seq=d.link.delivered_seq if d.link else (old.acked_seq if old else 0),
                shard=d.shard.name if d.shard else None, shard_sha256=d.shard_sha,
                data="private" if d.private_data else "shard"))
        self.record = record
        self.run_dir.save(record)

    # -- what the clients report ---------------------------------------------------------------

    def _on_connection(self, device: _Device, welcome) -> None:
        loop = self._loop
        assert loop is not None
        if device.link is None:
            return  # the first connection: _pair reports it
        if welcome is None:
            if device.down_since is None:
                device.down_since = loop.time()
                self._emit(DeviceStatus(device.key, "lost" if device.lost else "seen",
                                        "connection dropped; reconnecting"))
            return
        device.down_since = None
        if device.lost:
            device.lost, device.back = False, True
            self._emit(DeviceBack(device.key, self.state.round + 1))
            self._wake()
        elif device.round_number is not None:
            self._emit(DeviceStatus(device.key, "training", "reconnected", round=device.round_number))
        elif device.link is not None:
            self._emit(DeviceStatus(device.key, "ready", "reconnected"))

    def _on_metric(self, device: _Device, metric) -> None:
        """One step metric: written to metrics.jsonl before the client acknowledges it (when this returns)."""
        if metric.seq <= device.stale_until or metric.step.round != device.round_number:
            return  # from before this run, or a round this run no longer waits for: taken, not kept
        step = replace(metric.step, device=device.label)
        device.last_metric_at = self._loop.time()
        if step.seq_len is not None:
            device.calibration.observe(device.program_sha or "", step.seq_len, step.seconds,
                                       device.step_s_at.get(int(step.seq_len)))
        if self.run_dir.write_events([step]):
            self.run_dir.flush_metrics()
            self._emit(StepReceived(step))

    def _on_round_done(self, device: _Device, done) -> None:
        """A round's block: kept on disk before the client acknowledges it."""
        if done.seq <= device.stale_until or done.round != device.round_number:
            return
        if device.program_sha is not None and done.program != device.program_sha:
            return
        device.done_at = self._loop.time()
        self.run_dir.save_block(done.round, device.key, done.block_offset, done.b_block_array())

    async def _sync_loop(self) -> None:
        """Every SYNC_INTERVAL_S: metrics.jsonl to the disk (a power cut loses at most this much)."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            self.run_dir.sync_metrics()

    # -- 2. the job: its eval program (layout, data) -------------------------------------------

    async def _prepare_job(self) -> None:
        self._emit(Notice("exporting the job's eval program and probe"))
        result = await self._export(ExportRequest(job=self.config.job, out_dir=str(self.run_dir.programs_dir),
                                                  cache_dir=_str(self.config.cache_dir), eval=True, probe=True))
        assert result.eval is not None and result.probe is not None
        self.eval_manifest_path, self.probe_path = Path(result.eval), Path(result.probe)
        self.manifest = Manifest.load(self.eval_manifest_path)
        if self.b is None:
            self.b = np.zeros(self.manifest.b_size, dtype=np.float32)
        elif self.b.shape != (self.manifest.b_size,):
            raise InputError(f"--resume: the saved b has {self.b.size} values, this job's adapter "
                             f"{self.manifest.b_size}; resume with the job it was started with")
        settings = self.record.settings
        lr = settings.lr if settings.lr is not None else self.manifest.lr
        eps = settings.eps if settings.eps is not None else self.manifest.eps
        self.record = replace(self.record, settings=replace(settings, lr=lr, eps=eps))
        self.run_dir.save(self.record)

    async def _export(self, request: ExportRequest) -> ExportResult:
        return await run_export(request, self._emit, log_path=self.run_dir.path / "export.log")

    # -- 3. profiles ------------------------------------------------------------------------

    async def _profile_devices(self) -> None:
        todo = [d for d in self._devices.values() if d.link is not None and d.failed is None and d.agent_id and
                (d.profile is None or d.reprofile)]
        if not todo:
            return
        self._phase("profiling", f"{len(todo)} device(s)")
        probe_id = await self._probe_id()
        for device in todo:
            cached = None if (self.config.reprofile or device.reprofile) else \
                profile_cache.cached_profile(self.config.cache_dir, device.agent_id, probe_id)
            if cached is not None:
                self._set_profile(device, cached, cached=True)
        todo = [d for d in todo if d.profile is None or d.reprofile]
        if todo:
            await asyncio.gather(*(self._measure(d, probe_id) for d in todo))
        self._write_profiles()

    async def _probe_id(self) -> str:
        """The id of the job's probe (model and shapes): it keys the profile cache."""
        from shared.probe import ProbeManifest

        if self.probe is None:
            self.probe = ProbeManifest.load(self.probe_path)
        return self.probe.probe_id

    async def _measure(self, device: _Device, probe_id: str) -> None:
        self._emit(DeviceStatus(device.key, "profiling", "running the probe program"))
        try:
            sha, rate, rough = await self._ship_probe(device)
            try:
                response = await device.link.profile(sha, link_bytes_per_s=rate)
            except InputError as exc:  # desktop.engine.client.RequestFailed: the agent refused the request
                if getattr(exc, "code", None) != "bad_request" or rate is not None or rough is None:
                    raise
                # the agent has no link rate of its own yet and the probe was too small to measure one
                # well: take what its files crossed at, and say so
                self._emit(Notice(f"{device.label}: link rate from a transfer of under "
                                  f"{LINK_PROBE_MIN_BYTES >> 20} MiB (the probe's files): rough"))
                rate = rough
                response = await device.link.profile(sha, link_bytes_per_s=rate)
        except InputError as exc:
            self._leave_out(device, f"profiling failed: {exc}", getattr(exc, "code", "internal"))
            return
        profile = response.profile
        if rate is not None:  # the link as this desktop saw it, on the probe's files
            profile = replace(profile, link_bytes_per_s=rate)
        profile_cache.save_profile(self.config.cache_dir, device.agent_id, probe_id, profile)
        device.reprofile = False
        self._set_profile(device, profile, cached=False)

    async def _ship_probe(self, device: _Device) -> tuple[str, float | None, float | None]:
        """The probe's files, then its manifest: (the manifest's sha256, the link rate measured on them, rough).

        The rate is None when too little crossed the link to measure it well (a small probe, or the
        agent held the files); rough is the rate of whatever did cross (None: nothing did).
        """
        assert self.probe is not None and self.probe_path is not None
        sent, seconds = 0, 0.0
        for role, name in self.probe.files.items():
            transfer = await device.link.send_file(self.probe_path.parent / name, name=name,
                                                   sha256=self.probe.sha256.get(name))
            sent, seconds = sent + transfer.sent_bytes, seconds + transfer.seconds
        manifest = await device.link.send_file(self.probe_path, name=self.probe_path.name)
        rough = sent / seconds if sent > 0 and seconds > 0 else None
        rate = rough if sent >= LINK_PROBE_MIN_BYTES else None
        return manifest.sha256, rate, rough

    def _set_profile(self, device: _Device, profile: DeviceProfile, cached: bool) -> None:
        device.profile, device.profile_cached = profile, cached
        self._emit(DeviceProfiled(device.key, profile, cached, device.simulated))
        self._emit(DeviceStatus(device.key, "profiled", "cached profile" if cached else profile.source))

    def _write_profiles(self) -> None:
        self.run_dir.write_profiles({d.key: (d.label, d.profile, d.profile_cached)
                                     for d in self._devices.values() if d.profile is not None})

    # -- 4-5. plan, export, ship ----------------------------------------------------------------

    def _planned_devices(self) -> list[_Device]:
        return sorted((d for d in self._devices.values() if d.usable), key=lambda d: d.label)

    async def _plan_export_ship(self, reason: str) -> None:
        """Plan for the usable devices, export what the plan lacks, ship it; again while a device drops out."""
        while True:
            self._check_stop()
            devices = self._planned_devices()
            if not devices:
                raise InputError("no device left that can train: " + "; ".join(
                    f"{d.name}: {d.failed or ('lost' if d.lost else 'not profiled')}"
                    for d in self._devices.values()) if self._devices else "no device was paired")
            self._phase("planning", f"{len(devices)} device(s): {reason}")
            self._cut_shards(devices)  # before the plan: the step mix is counted on the devices' data
            job = self._planner_job(devices)
            plan = make_plan({d.key: d.profile for d in devices}, {d.key: d.label for d in devices}, job,
                             self.manifest.b_layout, policy=self.config.policy,
                             first_round=self.record.completed_round + 1, reason=reason, seed=self.config.seed,
                             replicas=self.config.replicas)
            for d in devices:
                d.back = False
            self._emit(PlanMade(plan))
            self.run_dir.write_plans(self.state.plans)
            await self._export_blocks(plan)
            self._phase("shipping", f"to {len(plan.active())} device(s)")
            left_before = {d.key for d in devices if not d.usable}
            await asyncio.gather(*(self._ship(self._devices[a.device], a) for a in plan.active()))
            self._remember_devices()
            dropped = [d for d in devices if not d.usable and d.key not in left_before]
            if not dropped:
                return
            reason = "; ".join(f"{d.label} left out ({d.failed or 'lost'})" for d in dropped)

    def _planner_job(self, devices: list[_Device]) -> Job:
        """The planner's job, from the eval program's manifest (layout, shapes) and the probe (memory).

        Step times are each device's own (its profile). The memory a program needs is
        predicted from the terms a device measured on the probe; of the devices planned
        for, the largest prediction is taken, so no device is given a block it cannot hold.
        """
        from shared.job_model import job_from_manifests, memory_model

        weights = self.manifest.file("weights", self.eval_manifest_path).stat().st_size
        probe_weights = self.probe.file("weights", self.probe_path).stat().st_size
        models = [memory_model(self.probe, d.profile.measurement, weights, probe_weights)
                  for d in devices if d.profile.measurement is not None and
                  d.profile.measurement.probe == self.probe.probe_id]
        if not models:
            raise InputError("no device has a profile measured with this job's probe: nothing to predict memory from")
        memory = max(models, key=lambda m: max(m.at_depths()))
        # The eval program covers every layer; without its block the planner chooses the blocks.
        whole = replace(self.manifest, block=None)
        return job_from_manifests([whole], memory, self.config.local_steps, name=self.config.job.name,
                                  probe=self.probe, sources=[str(self.eval_manifest_path)],
                                  step_mix=self._step_mix(devices))

    def _step_mix(self, devices: list[_Device]) -> tuple[tuple[int, float], ...]:
        """The share of the run's steps at each length bucket, counted on each device's shard in the
        trainer's order; a device with its own data counts as the whole training split (the desktop
        does not see its rows)."""
        from shared.task_data import load_splits

        train = self._data()["train"]
        splits = [load_splits(d.shard)["train"] if d.shard is not None else train for d in devices]
        return run_step_mix(self.manifest, splits, self.config.rounds, self.config.local_steps, seed=self.config.seed)

    def _buckets(self) -> list[int]:
        """The lengths the programs' steps run at: the shorter buckets and the full length."""
        return job_buckets(self.manifest)

    def _predict_round(self, device: _Device, part: Assignment, r: int) -> float:
        """The device's round r, predicted at the lengths its trainer draws next (desktop.engine.predict)."""
        from shared.costmodel import length_step_times
        from shared.task_data import load_splits

        layers, k = self.state.plan.layers, self.config.local_steps
        full = self.manifest.seq_len
        device.step_s_at = {t: float(length_step_times(device.profile, layers, None if t == full else t)
                                     [part.first_layer]) for t in self._buckets()}
        if device.shard is None or device.private_data:  # its rows are its own: the plan's expected step
            return predicted_round_s(part.comm_s, part.compute_s, device.calibration)
        position = device.position.at(device.program_sha, assumed=(r - 1) * k)
        if device.lengths is None or len(device.lengths) < position + k:
            device.lengths = step_lengths(load_splits(device.shard)["train"], self._buckets(),
                                          self.manifest.batch_size, max(self.config.rounds * k, position + k),
                                          seed=self.config.seed, batches=self.manifest.batches)
        lengths = lengths_of_round(device.lengths, position, k)
        compute = round_compute_s(lengths, device.step_s_at, device.step_s_at[full])  # the buckets end at the full length
        return predicted_round_s(part.comm_s, compute, device.calibration)

    async def _export_blocks(self, plan: PlanView) -> None:
        """The plan's block programs (those of earlier plans are kept; the exporter takes the rest from its cache)."""
        blocks = sorted({(a.first_layer, a.last_layer) for a in plan.active()})
        if all(block_key(*block) in self.programs for block in blocks):
            return
        self._phase("exporting", f"{len(blocks)} block program(s)")
        result = await self._export(ExportRequest(job=self.config.job, out_dir=str(self.run_dir.programs_dir),
                                                  cache_dir=_str(self.config.cache_dir), blocks=tuple(blocks)))
        # Keep the paths already shipped: a program's files may be replaced under the same names.
        self.programs = {**{key: Path(path) for key, path in result.blocks.items()}, **self.programs}
        self._emit(Notice(f"exported {len(blocks)} block program(s): {result.from_cache} method(s) from the "
                          f"cache, {result.lowered} lowered, in {result.seconds:.1f} s"))

    def _cut_shards(self, devices: list[_Device]) -> None:
        """Shards for the devices without their own data: cut once per run, disjoint, kept in shards/."""
        want = [d for d in devices if not d.private_data and d.shard is None]
        if not want:
            return
        train = self._data()["train"]
        have = [d for d in self._devices.values() if d.shard is not None]
        if not have:
            takers = sorted((d for d in self._devices.values() if d.agent_id and not d.private_data),
                            key=lambda d: d.label)
            for device, shard in zip(takers, cut_shards(train, len(takers), seed=self.config.seed)):
                path = write_shard(self.run_dir.shards_dir / f"{_safe(device.label)}.npz", shard)
                device.shard, device.shard_sha = path, sha256_file(path)
            want = [d for d in want if d.shard is None]
        for device in want:  # joined after the cut: the shard of a device that left, else the largest
            spare = [d for d in self._devices.values() if d.shard is not None and not d.usable]
            donor = spare[0] if spare else max(have, key=lambda d: d.shard.stat().st_size)
            device.shard, device.shard_sha = donor.shard, donor.shard_sha
            self._emit(Notice(f"{device.label} joined after the data was cut: it trains on {donor.label}'s shard"))

    async def _ship(self, device: _Device, part) -> None:
        """Its block program's files (those it lacks) and its data; a failure leaves the device out."""
        manifest_path = self.programs[block_key(part.first_layer, part.last_layer)]
        self._emit(DeviceStatus(device.key, "receiving", f"block {part.block}", fraction=0.0))

        def progress(name: str, held: int, total: int) -> None:
            self._emit(TransferProgress(device.key, name, held, total))
            self._emit(DeviceStatus(device.key, "receiving", f"{name}", fraction=held / total if total else 1.0))

        try:
            if str(manifest_path) not in device.programs:
                device.programs[str(manifest_path)] = await device.link.send_program(manifest_path,
                                                                                     on_progress=progress)
            if not device.private_data and device.data_sent != device.shard_sha:
                await device.link.send_data_shard(device.shard)
                device.data_sent = device.shard_sha
        except InputError as exc:
            self._leave_out(device, f"could not receive its program or data: {exc}", getattr(exc, "code", ""))
            return
        self._emit(DeviceStatus(device.key, "ready", f"block {part.block}"))

    def _leave_out(self, device: _Device, message: str, code: str = "") -> None:
        device.failed = message
        self._emit(DeviceError(device.key, f"{device.label}: {message}", _error_advice(code)))
        self._emit(DeviceStatus(device.key, "error", message))

    def _data(self) -> dict:
        if self._splits is None:
            from shared.task_data import load_splits

            self._splits = load_splits(self.manifest.file("data", self.eval_manifest_path))
        return self._splits

    # -- 6. rounds ----------------------------------------------------------------------------

    async def _train(self) -> None:
        self._phase("training")
        r = self.record.completed_round + 1
        if self.config.zero_shot and r == 1:
            # The devices train round 1 meanwhile; its merge waits for this (the curve starts at round 0).
            self._zero_shot = asyncio.create_task(self._zero_shot_eval())
            self._tasks.add(self._zero_shot)
            self._zero_shot.add_done_callback(self._tasks.discard)
        while r <= self.config.rounds:
            self._check_stop()
            changed = self._membership_change()
            if changed:
                await self._profile_devices()
                try:
                    await self._plan_export_ship(changed)
                except InputError as exc:  # nobody left: end the run with what was merged
                    self._emit(DeviceError(None, str(exc), "start or reconnect an agent and run again with "
                                           "--resume", fatal=True))
                    self._stop_reason = f"no device left after round {r - 1}"
                    raise StopRequested(self._stop_reason) from None
                self._phase("training")
            await self._round(r)
            r += 1

    def _membership_change(self) -> str:
        """Why the plan must change at this boundary ("" when it need not)."""
        plan = self.state.plan
        planned = {a.device for a in plan.active()} if plan else set()
        reasons = []
        for d in self._devices.values():
            if d.key in planned and not d.usable:
                reasons.append(f"{d.label} {'lost' if d.lost else 'left out'}")
            elif d.back or d.reprofile:
                reasons.append(f"{d.label} {'back' if d.back else 'to profile again'}")
            elif d.key not in {a.device for a in plan.assignments} and d.link is not None and d.failed is None \
                    and not d.lost:
                reasons.append(f"{d.label} joined")
        return ", ".join(reasons)

    async def _round(self, r: int) -> None:
        loop = asyncio.get_running_loop()
        plan = self.state.plan
        active = [(a, self._devices[a.device]) for a in plan.active()]
        base = self.b.copy()
        started = loop.time()
        self._emit(RoundStarted(r, [d.key for _, d in active]))
        tasks = {d.key: asyncio.create_task(self._device_round(d, a, r, base)) for a, d in active}
        stop_wait = asyncio.ensure_future(self._stop_event.wait())
        try:
            pending = set(tasks.values())
            while pending:
                done, pending = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                done.discard(stop_wait)
                pending.discard(stop_wait)
                if stop_wait.done() and pending:
                    await self._stop_round(active, pending)
                    raise StopRequested(self._stop_reason)
        finally:
            stop_wait.cancel()
        returned: dict[BlockSpan, list[np.ndarray]] = {}
        measured: dict[str, float] = {}
        lost: list[str] = []
        for a, d in active:
            try:
                block, seconds = tasks[d.key].result()
            except _DeviceGone as gone:
                lost.append(d.label)
                self._record_loss(d, r, gone)
                continue
            returned.setdefault(BlockSpan(a.first_layer, a.last_layer, a.offset, a.size), []).append(block)
            if seconds is not None:
                measured[d.label] = seconds
        # A block's replicas (if any) are averaged; blocks nobody returned keep the last merged values.
        updates = {span: np.mean(blocks, axis=0, dtype=np.float64).astype(np.float32) if len(blocks) > 1
                   else blocks[0] for span, blocks in returned.items()}
        merged = merge_b(base, self.manifest.b_layout, updates)
        if self._zero_shot is not None:
            await self._zero_shot
            self._zero_shot = None
        accuracy, examples = await asyncio.to_thread(self._validate, merged)
        event = Round(r, accuracy, examples, loop.time() - started, measured,
                      {d.label: d.predicted_s if d.predicted_s is not None else a.round_s
                       for a, d in active if d.label in measured}, lost,
                      planned_round_s={d.label: a.round_s for a, d in active if d.label in measured})
        self.run_dir.write_events([event])
        self.run_dir.sync_metrics()
        self.b = merged
        self._remember_devices()
        self.record = self.run_dir.save_b(self.record, merged, r)
        self.run_dir.drop_blocks(r)
        self._emit(RoundMerged(event))

    async def _device_round(self, device: _Device, part, r: int, base: np.ndarray) -> tuple[np.ndarray, float | None]:
        """One device's round: its block and its measured round seconds (None when it came from disk)."""
        kept = self.run_dir.load_block(r, device.key)
        if kept is not None and kept[0] == part.offset and kept[1].shape == (part.size,):
            device.resumed = False
            self._emit(Notice(f"{device.label}: round {r}'s block was received before the restart"))
            return kept[1], None
        loop = asyncio.get_running_loop()
        manifest_path = self.programs[block_key(part.first_layer, part.last_layer)]
        device.round_number, device.program_sha = r, device.programs[str(manifest_path)]
        device.last_metric_at = device.done_at = None
        device.predicted_s = self._predict_round(device, part, r)
        self._emit(DeviceStatus(device.key, "training", f"block {part.block}", round=r))
        settings = self.record.settings
        try:
            sent = loop.time()
            await self._start_round(device, r, base, settings, _allotted_rate(device, part))
            accepted = loop.time()
            result = asyncio.ensure_future(device.link.round_result(r))
            watch = asyncio.ensure_future(self._watch(device, part, accepted))
            try:
                await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
            if not result.done():
                result.cancel()
                await asyncio.gather(result, return_exceptions=True)
                watch_error = watch.exception() if watch.done() and not watch.cancelled() else None
                raise watch_error or _DeviceGone("stopped watching", lost=True)
            try:
                done = result.result()
            except InputError as exc:
                raise _DeviceGone(str(exc), lost=False) from None
            if done.program != device.program_sha or (done.block_offset, done.block_size) != (part.offset, part.size):
                raise _DeviceGone(f"returned block {done.block_offset}+{done.block_size} of program "
                                  f"{done.program[:12]}…, not the one it was given", lost=False)
            # Measured as the plan predicts it: the download (until the agent took the round), the
            # compute on the device's clock, and the upload (last metric to the block's arrival).
            arrived = device.done_at or loop.time()
            upload = max(0.0, arrived - (device.last_metric_at or arrived))
            seconds = (accepted - sent) + done.seconds + upload
            device.position.ran(device.program_sha, done.steps)
            self._emit(DeviceRoundDone(device.key, r, done.steps, done.seconds, seconds, done.mean_loss,
                                       download_s=accepted - sent, upload_s=upload, predicted_s=device.predicted_s))
            self._emit(DeviceStatus(device.key, "ready", f"round {r} done", round=r))
            return done.b_block_array(), seconds
        finally:
            device.round_number = None

    async def _start_round(self, device: _Device, r: int, base: np.ndarray, settings: RunSettings,
                           link_bytes_per_s: float | None) -> None:
        from desktop.engine.client import AgentBusy, ConnectionLost

        args = dict(round=r, program=device.program_sha, b=base, k=settings.local_steps, lr=settings.lr,
                    eps=settings.eps, seed=settings.seed, link_bytes_per_s=link_bytes_per_s,
                    run=self.record.run_id or None)  # "": a run state from before run ids
        if device.resumed and r == self.record.completed_round + 1:
            device.resumed = False
            # The desktop stopped while this round ran: the agent may be running it still, or hold
            # its result unacknowledged; the client asks for it only if it does neither.
            await device.link.continue_round(**args)
            return
        device.resumed = False
        for attempt in range(3):
            try:
                await device.link.start_round(**args)
                return
            except AgentBusy:
                if attempt:
                    raise _DeviceGone("it stays busy with another round", lost=False) from None
                await device.link.stop()  # a round of an earlier plan or run: end it, then ask again
            except ConnectionLost:
                await self._wait_up(device)  # the client asks again once it is back (it keeps the request)
                return
            except InputError as exc:
                raise _DeviceGone(str(exc), lost=False) from None

    async def _wait_up(self, device: _Device) -> None:
        """Until the device's connection is back; lost after the patience window."""
        loop = asyncio.get_running_loop()
        while not device.link.connected:
            if device.down_since is not None and loop.time() - device.down_since > self.config.patience_s:
                raise _DeviceGone(f"its connection was down for more than {self.config.patience_s:.0f} s", lost=True)
            await asyncio.sleep(0.2)

    async def _watch(self, device: _Device, part, since: float) -> None:
        """Raise _DeviceGone when the device is down past the patience window, or silent for too long."""
        loop = asyncio.get_running_loop()
        steps = max(self.config.local_steps, 1)
        # + the round's comm: the block's upload is paced at the device's share, with no metric meanwhile
        stall = max(STALL_MIN_S, STALL_FACTOR * part.compute_s / steps) + part.comm_s
        while True:
            await asyncio.sleep(0.2)
            now = loop.time()
            if device.down_since is not None and now - device.down_since > self.config.patience_s:
                raise _DeviceGone(f"its connection was down for more than {self.config.patience_s:.0f} s", lost=True)
            heard = device.last_metric_at or since
            if device.down_since is None and not self._paused and now - heard > stall:
                raise _DeviceGone(f"connected but silent for {now - heard:.0f} s in a round", lost=True)

    def _record_loss(self, device: _Device, r: int, gone: _DeviceGone) -> None:
        device.round_number = None
        if gone.lost:
            device.lost = True
            self._emit(DeviceLost(device.key, r, gone.reason))
            device.link.forget_round(r)  # when it comes back it must not go on with a round nobody waits for
        else:
            self._leave_out(device, f"round {r} failed: {gone.reason}")
        self.record = replace(self.record, losses=self.record.losses + (
            LossRecord(r, device.key, device.label, gone.reason),))
        self.run_dir.save(self.record)

    async def _stop_round(self, active, pending) -> None:
        """Stop the devices at their next step boundary; wait a little for their stopped rounds."""
        self._phase("finishing", self._stop_reason or "")
        stops = [d.link.stop() for _, d in active if d.link is not None and d.link.connected]
        await asyncio.gather(*stops, return_exceptions=True)
        await asyncio.wait(pending, timeout=STOP_WAIT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _zero_shot_eval(self) -> None:
        """The untrained adapter's validation accuracy: an Eval at step 0 in metrics.jsonl, round 0 for the views."""
        start = time.perf_counter()
        accuracy, examples = await asyncio.to_thread(self._validate, np.zeros_like(self.b))
        seconds = time.perf_counter() - start
        self.run_dir.write_events([Eval(step=0, split="validation", accuracy=accuracy, examples=examples,
                                        seconds=seconds, round=0)])
        self._emit(RoundMerged(Round(0, accuracy, examples, seconds)))

    def _validate(self, b: np.ndarray) -> tuple[float, int]:
        """The merged adapter's accuracy on the validation split, on this machine (a worker thread)."""
        program = self._eval_program()
        split = self._data()["validation"]
        n = len(split) if self.config.eval_limit is None else min(self.config.eval_limit, len(split))
        return program.accuracy(split, b, n), n

    def _eval_program(self):
        if self._evaluator is None:
            from device_agent.program import Program

            self._evaluator = Program(self.eval_manifest_path)
        return self._evaluator

    # -- 7. output ------------------------------------------------------------------------------

    async def _finish(self, stopped: bool) -> RunResult:
        """Adapter from the last merged b, the test accuracy, the report; the agents let go."""
        self._phase("finishing", self._stop_reason or "")
        await self._shutdown(stop_agents=stopped)
        adapter = val = test = None
        rounds_done = self.record.completed_round if self.record else 0
        if self.manifest is not None and self.b is not None:
            adapter = self.run_dir.adapter_dir
            await asyncio.to_thread(self._write_adapter, adapter)
            if self.state.accuracy:
                val = self.state.accuracy[-1][1]
            if self.config.test and rounds_done:
                test = await asyncio.to_thread(self._test)
        self.record = replace(self.record, finished=not stopped and rounds_done >= self.config.rounds)
        self.run_dir.save(self.record)
        self.run_dir.close()
        from desktop.engine.report import write_report

        report = await asyncio.to_thread(write_report, self.run_dir.path)
        self._emit(Notice(f"report: {report}"))
        self._emit(RunFinished(str(self.run_dir.path), str(adapter) if adapter else None, rounds_done, stopped,
                               val, test, self._stop_reason or ""))
        self._phase("stopped" if stopped else "done", self._stop_reason or "")
        return RunResult(self.run_dir.path, adapter, rounds_done, stopped, val, test, self.b)

    def _write_adapter(self, folder: Path) -> None:
        from device_agent.trainer import write_adapter

        write_adapter(self._eval_program(), self.b, folder)

    def _test(self) -> float:
        program = self._eval_program()
        split = self._data()["test"]
        n = len(split) if self.config.test_limit is None else min(self.config.test_limit, len(split))
        accuracy = program.accuracy(split, self.b, n)
        self.run_dir.write_events([Test(step=self.record.completed_round * self.config.local_steps, split="test",
                                        accuracy=accuracy, examples=n, seconds=0.0)])
        self.run_dir.sync_metrics()
        return accuracy

    async def _shutdown(self, stop_agents: bool) -> None:
        """Stop the tasks, discovery and every connection (after telling running rounds to stop)."""
        if stop_agents:
            busy = [d.link.stop() for d in self._devices.values()
                    if d.link is not None and d.link.connected and d.round_number is not None]
            await asyncio.gather(*busy, return_exceptions=True)
        for task in list(self._tasks) + [t for t in (self._syncer,) if t is not None]:
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in (self._syncer,) if t is not None), return_exceptions=True)
        self._syncer = None
        if self._browser is not None:
            await self._browser.close()
            self._browser = None
        await asyncio.gather(*(d.link.close() for d in self._devices.values() if d.link is not None),
                             return_exceptions=True)
        for d in self._devices.values():
            d.link = None

    # -- helpers --------------------------------------------------------------------------------

    def _check_stop(self) -> None:
        if self._stop_reason is not None:
            raise StopRequested(self._stop_reason)

    async def _wait_change(self, timeout: float) -> None:
        assert self._changed is not None and self._stop_event is not None
        self._changed.clear()
        waits = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(self._stop_event.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _control_all(self, what: str) -> None:
        self._paused = what == "pause"
        for device in self._devices.values():
            if device.link is not None and device.round_waiter is not None and not device.round_waiter.done():
                task = asyncio.create_task(getattr(device.link, what)())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


def _allotted_rate(device: _Device, part: Assignment) -> float | None:
    """The rate the plan gives ``device`` for its round's transfers: its share of the link it was profiled with.

    Both policies pace with it (the baseline's equal shares too), so each plan is measured on the
    split it predicts with; None (no share, no profile) sends at full speed.
    """
    rate = part.share * device.profile.link_bytes_per_s if device.profile is not None else 0.0
    return rate if rate > 0 and math.isfinite(rate) else None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _pairing_advice(exc: Exception) -> str:
    text = str(exc).lower()
    if "token" in text or "401" in text:
        return "check the token the agent printed when it started (its state dir keeps it) and pair again"
    if "busy" in text or "409" in text:
        return "another desktop is using this agent; stop that run first"
    if "version" in text:
        return "update deftly on the agent or on this desktop so both speak the same protocol"
    return "check that the agent runs and that this desktop can reach its address"


def _error_advice(code: str) -> str:
    return {
        "memory": "the program does not fit this device's memory: it is left out; a plan with more devices gives "
                  "it a deeper, smaller block",
        "not_a_program": "the program could not be loaded there; export it again (the cache may be corrupt)",
        "wrong_model": "the device holds another model's files; it is left out of this run",
        "bad_data": "its training data does not fit the program; fix its --data or let it take a shard",
        "hash_mismatch": "a file was corrupted in transit; it is sent again at the next boundary",
    }.get(code, "it is left out of the plan; see the agent's log for details")
