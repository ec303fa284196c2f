"""Many devices streaming into the real window: how long the UI thread stalls, and whether a point is lost.

:func:`stream_into_window` starts an engine (lobby mode, no agents) on its own
thread behind the real :class:`desktop.ui.bridge.EngineBridge`, and emits, on
the engine's loop and through its own event bus, ``devices`` metric streams at
``rate_hz`` each for ``seconds`` (each device's steps spread over the period,
as independent agents' would be). Everything downstream is what a run uses:
the engine's reducer, the queued hop to the GUI thread, the state mirror, the
cards, the live plots' timer, painting (into the offscreen backing store).

A probe timer on the GUI thread fires every :data:`PROBE_MS`; the time between
two of its turns is a *frame*: how long the window could not react; beside it,
the GUI thread's own CPU time in that frame (what the window's code cost,
whatever else the machine was doing). A point
is *dropped* when a device's plotted series differs from what was sent (count
or value).
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PySide6.QtCore import QElapsedTimer, QEventLoop, Qt, QTimer

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.events import DeviceSeen, DeviceStatus, PhaseChanged, RoundStarted, StepReceived
from desktop.ui.app import application, settle_heap
from desktop.ui.bridge import EngineBridge
from desktop.ui.live import REDRAW_MS
from desktop.ui.window import MainWindow
from shared.events import Step

PROBE_MS = 5  # the GUI thread's probe period; a frame is the time between two of its turns
SLICES = 10  # each period is cut in this many slices, a tenth of the devices emitting in each


@dataclass
class LoadResult:
    devices: int
    rate_hz: float
    seconds: float
    sent: int
    plotted: int
    dropped: int
    frames_ms: list[float] = field(repr=False)
    frame_at_s: list[float] = field(repr=False)
    batches: int = 0
    redraws: int = 0
    wall_s: float = 0.0
    behind_at_end: int = 0  # points sent but not drawn yet three redraw periods after the last one was sent
    frames_cpu_ms: list[float] = field(default_factory=list, repr=False)  # the GUI thread's CPU time per frame

    @property
    def worst_frame_cpu_ms(self) -> float:
        return max(self.frames_cpu_ms)

    @property
    def p99_frame_cpu_ms(self) -> float:
        return float(np.percentile(self.frames_cpu_ms, 99))

    @property
    def cpu_in_worst_frame_ms(self) -> float:
        """The GUI thread's CPU in the frame of the worst wall time (the rest of it: other processes)."""
        return self.frames_cpu_ms[int(np.argmax(self.frames_ms))]

    @property
    def worst_frame_ms(self) -> float:
        return max(self.frames_ms)

    @property
    def p99_frame_ms(self) -> float:
        return float(np.percentile(self.frames_ms, 99))

    @property
    def median_frame_ms(self) -> float:
        return float(np.median(self.frames_ms))


def _loss(device: int, n: int) -> float:
    """A deterministic, noisy, slowly falling loss (the values are compared after plotting)."""
    return 0.7 - 0.0005 * n + 0.02 * math.sin(1.7 * n + device)


def stream_into_window(devices: int = 100, rate_hz: float = 10.0, seconds: float = 30.0,
                       out: Path | None = None, size: tuple[int, int] = (1600, 1000)) -> LoadResult:
    """Stream ``devices`` x ``rate_hz`` steps a second for ``seconds`` into a real window; measure it."""
    app = application()
    out = out or Path("runs") / "bench-ui"
    ids = [f"dev-{i:03d}" for i in range(devices)]
    window = MainWindow(title="deftly bench ui")
    window.resize(*size)
    bridge = EngineBridge(lambda: Engine(EngineConfig(job=JobSpec(), out=out)))  # its bus only: no run, no agents
    bridge.events.connect(window.apply_events)
    batches = [0]
    bridge.events.connect(lambda _b: batches.__setitem__(0, batches[0] + 1))
    window.show()
    bridge.start()
    steps_per_device = int(round(rate_hz * seconds))

    async def streams(engine) -> None:
        bus = engine.bus
        for i, device in enumerate(ids):
            bus.emit(DeviceSeen(device, f"sim-{i:03d}", f"10.0.{i // 250}.{i % 250}:8765", "address", "laptop"))
            bus.emit(DeviceStatus(device, "training", "simulated stream", round=1))
        bus.emit(PhaseChanged("training"))
        bus.emit(RoundStarted(1, ids))
        period = 1.0 / rate_hz
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(1, steps_per_device + 1):
            for s in range(SLICES):
                due = start + (n - 1) * period + s * period / SLICES
                await asyncio.sleep(max(0.0, due - loop.time()))
                for i in range(s, devices, SLICES):
                    bus.emit(StepReceived(Step(n, _loss(i, n), 0.01, period, 32, 300.0 + i, 0.1,
                                               device=ids[i], round=1)))

    frames: list[float] = []
    frame_at: list[float] = []
    clock = QElapsedTimer()
    last = [0]

    cpu: list[float] = []
    last_cpu = [time.thread_time()]

    def probe() -> None:
        now, now_cpu = clock.elapsed(), time.thread_time()
        frames.append(float(now - last[0]))
        cpu.append((now_cpu - last_cpu[0]) * 1000.0)  # the GUI thread's own CPU in that frame
        frame_at.append(now / 1000.0)
        last[0], last_cpu[0] = now, now_cpu

    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(PROBE_MS)
    timer.timeout.connect(probe)
    for _ in range(5):  # the first paint of the window is not part of the stream
        app.processEvents()
    settle_heap()  # as the dashboard does before its loop runs
    loop = QEventLoop()
    bridge.finished_call.connect(lambda what: what == "streams" and QTimer.singleShot(
        3 * REDRAW_MS, loop.quit))  # then let the last batch reach the plots
    bridge.failed.connect(lambda *_args: loop.quit())
    started = time.perf_counter()
    future = bridge.call("streams", streams)
    clock.start()
    last_cpu[0] = time.thread_time()
    timer.start()
    loop.exec()  # Qt's own event loop, as in the dashboard
    timer.stop()
    wall = time.perf_counter() - started
    behind = sum(steps_per_device - len(window.live.plotted(d)[1]) for d in ids)  # not drawn yet: a lag, not a loss
    window.live.redraw()
    sent = plotted = dropped = 0
    for i, device in enumerate(ids):
        want = np.array([_loss(i, n) for n in range(1, steps_per_device + 1)])
        x, y = window.live.plotted(device)
        sent += len(want)
        plotted += len(y)
        matched = int(np.sum(y[:len(want)] == want[:len(y)])) if len(y) else 0
        dropped += len(want) - matched
    future.result()
    bridge.stop()
    window.close()
    window.deleteLater()
    app.processEvents()
    return LoadResult(devices, rate_hz, seconds, sent, plotted, dropped, frames[1:], frame_at[1:], batches[0],
                      window.live.redraws, wall, behind, cpu[1:])


def watch_first_plot(window: MainWindow, started: float, seen: dict) -> None:
    """Once the window plots its first loss point: ``seen["first_plot_s"]`` (since ``started``), then close it.

    Closing stops the run the way the operator's close does (the adapter is written).
    """
    timer = QTimer(window)

    def check() -> None:
        if any(len(window.live.plotted(d)[1]) for d in window.model.state.devices):
            seen["first_plot_s"] = time.perf_counter() - started
            timer.stop()
            window.close()

    timer.timeout.connect(check)
    timer.start(50)
