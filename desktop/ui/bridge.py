"""The engine beside Qt's event loop: the engine on its own thread and asyncio loop, events to the GUI thread.

The fleet engine is asyncio code that must never wait for a repaint (its
agents' heartbeats and metric acknowledgements run on its loop), and the
window must never wait for the engine (an export takes minutes). So the
engine gets a thread of its own running its own event loop, and the two meet
in two places only:

* **events**, engine → window: the engine's bus calls :meth:`EngineBridge._on_engine_event`
  on the engine thread; it appends the event to a queue and, if no wake-up is
  already on its way, emits a signal that Qt delivers *queued* to the GUI
  thread, where :meth:`_drain` takes every event that arrived meanwhile and
  emits them as one batch (:attr:`EngineBridge.events`). A thousand steps a
  second cost the GUI a handful of wake-ups, never a thousand;
* **calls**, window → engine: :meth:`EngineBridge.call` schedules one of the
  engine's coroutines on its loop (``asyncio.run_coroutine_threadsafe``) and
  returns at once; when it fails, :attr:`EngineBridge.failed` carries what was
  asked and what went wrong, in plain words, to the window's status bar (never
  a traceback dialog; the traceback goes to the log).

The GUI never reads the engine's own state object (it changes on the other
thread); it keeps a mirror, :class:`desktop.engine.state.EngineState`, fed
with the same events in the same order (the reducer is pure), so what the
window shows is exactly what the events said.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from typing import Any, Awaitable, Callable

from PySide6.QtCore import QObject, Qt, Signal

from shared.errors import InputError

log = logging.getLogger("deftly.ui")

ENGINE_CLOSE_TIMEOUT_S = 30.0  # how long stop() waits for the engine to stop its agents and write its files
ENGINE_START_TIMEOUT_S = 30.0  # how long start() waits for the engine to be built on its thread


def plain_error(exc: BaseException) -> tuple[str, str]:
    """(what happened, what to do) for an exception, in words an operator can act on."""
    if isinstance(exc, InputError):
        return str(exc), ""
    if isinstance(exc, ConnectionRefusedError):
        return "the connection was refused", "check that the agent is running and the address and port are right"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "no answer in time", "check the network between this machine and the device"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}", "check the address and the network"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", ""
    return f"{type(exc).__name__}: {exc}", "this is a bug in deftly: the log has the details"


class EngineBridge(QObject):
    """Runs an engine on its own thread and loop; delivers its events to the GUI thread in batches.

    Args:
        make_engine: builds the engine; called on the engine thread with its loop
            running, so the engine may create loop-bound objects. It must return an
            object with ``bus`` (a :class:`desktop.engine.events.EventBus`) and an
            ``async close()``.
    """

    events = Signal(list)  # [EngineEvent, ...] in the order the engine emitted them
    failed = Signal(str, str, str)  # what was asked, what went wrong, what to do
    finished_call = Signal(str)  # a call that completed without error (what was asked)
    _wake = Signal()

    def __init__(self, make_engine: Callable[[], Any], parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._make_engine = make_engine
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._wake_sent = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.engine: Any = None
        self.delivered = 0  # events handed to the GUI so far (a test and the benchmark read it)
        self._wake.connect(self._drain, Qt.ConnectionType.QueuedConnection)

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine's thread and build the engine there.

        Raises:
            InputError: the engine could not be built (its message).
        """
        self._thread = threading.Thread(target=self._thread_main, name="deftly-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(ENGINE_START_TIMEOUT_S):
            raise InputError("the engine did not start within "
                             f"{ENGINE_START_TIMEOUT_S:.0f} s (see the log)")
        if self._start_error is not None:
            message, _ = plain_error(self._start_error)
            raise InputError(f"the engine could not start: {message}") from self._start_error

    def _thread_main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            async def build() -> None:
                self.engine = self._make_engine()
                self.engine.bus.subscribe(self._on_engine_event)

            loop.run_until_complete(build())
        except BaseException as exc:  # noqa: BLE001 — handed to start(), which raises it on the GUI thread
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self, timeout: float = ENGINE_CLOSE_TIMEOUT_S) -> None:
        """Close the engine (it stops its agents' rounds and writes its files), then end its thread."""
        if self._thread is None or self._loop is None:
            return
        if self.engine is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.engine.close(), self._loop)
            try:
                future.result(timeout)
            except BaseException as exc:  # noqa: BLE001 — closing goes on: the thread must end
                log.warning("the engine did not close cleanly: %s", plain_error(exc)[0], exc_info=exc)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- calls into the engine ----------------------------------------------------------

    def call(self, what: str, action: Callable[[Any], Awaitable]) -> concurrent.futures.Future:
        """Run ``action(engine)`` (a coroutine) on the engine's loop; returns at once.

        Args:
            what: the request in words, for the status bar ("pair pi-1").
            action: given the engine, returns the coroutine to run.
        """
        assert self._loop is not None, "start() the bridge first"

        async def run() -> Any:
            return await action(self.engine)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)

        def done(f: concurrent.futures.Future) -> None:  # on the engine thread: signals hop to the GUI
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                self.finished_call.emit(what)
                return
            message, advice = plain_error(exc)
            if not isinstance(exc, InputError):
                log.error("%s failed", what, exc_info=exc)
            self.failed.emit(what, message, advice)

        future.add_done_callback(done)
        return future

    # -- events out of the engine --------------------------------------------------------

    def _on_engine_event(self, event: Any) -> None:
        """On the engine thread: queue the event; wake the GUI unless a wake-up is on its way."""
        with self._lock:
            self._pending.append(event)
            if self._wake_sent:
                return
            self._wake_sent = True
        self._wake.emit()

    def _drain(self) -> None:
        """On the GUI thread: everything that arrived since the last wake-up, as one batch."""
        with self._lock:
            batch = list(self._pending)
            self._pending.clear()
            self._wake_sent = False
        if batch:
            self.delivered += len(batch)
            self.events.emit(batch)
