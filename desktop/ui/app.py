"""Starting the dashboard: the Qt application, the engine beside it, and closing both cleanly.

* :func:`open_dashboard`: the operator's dashboard (``deftly dashboard``): the engine
  finds and pairs agents at once (``Engine.open``); Start runs the job the form
  describes.
* :func:`open_demo`: the same window driving a run chosen in advance (``deftly demo``),
  its form filled with the demo's settings so the audience sees them.
* :func:`open_replay`: a recorded run played through the window.
* :func:`render_end_state`: the window at a finished run's end state, rendered offscreen
  to a PNG (``deftly demo --headless`` puts it in the report).

Closing the window (or Ctrl-C in the terminal) stops a run in progress the way
``deftly run`` does — the agents finish their step and the adapter is written —
while the window stays responsive and says so; a second Ctrl-C quits at once.
"""
from __future__ import annotations

import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QApplication

from desktop.demo import has_display
from desktop.engine import Engine, EngineConfig
from desktop.ui.bridge import EngineBridge
from desktop.ui.job_form import RunChoice, fields_from_job
from desktop.ui.replay import ReplayPlayer, load_replay
from desktop.ui.window import MainWindow, connect_engine
from shared.errors import InputError

log = logging.getLogger("deftly.ui")
SIGNAL_POLL_MS = 200  # Qt's loop holds the interpreter: wake it this often so Ctrl-C is seen


def application() -> QApplication:
    """The process's QApplication (made once).

    Raises:
        InputError: there is no display to show a window on (instead of Qt aborting the process).
    """
    app = QApplication.instance()
    if app is None:
        if not has_display():
            raise InputError("no display to open the dashboard on (DISPLAY and QT_QPA_PLATFORM are unset): run "
                             "`deftly demo --headless`, or set QT_QPA_PLATFORM=offscreen, or use xvfb-run")
        app = QApplication(sys.argv[:1])
        app.setApplicationName("deftly")
    return app


def settle_heap() -> None:
    """Before Qt's loop runs: what exists now (modules, the window, its plots) leaves the collector's walks.

    Python's full collection walks every tracked object; with the dashboard's (~75,000 once the
    window is built: modules, Qt wrappers, pyqtgraph items) one takes ~40 ms of the GUI thread,
    and a busy run made one every few seconds: among the live view's longest frames. They
    live as long as the window, so they are frozen (``gc.freeze``) after one last
    collection; what the run creates later is collected as before.
    """
    gc.collect()
    gc.freeze()


class Dashboard:
    """A window and the engine it drives, with a clean close.

    Args:
        make_engine: builds the engine (called on the engine's thread).
        config_for: the engine's settings for a run of the form's choice with this many paired devices.
        title: the window's title.
    """

    def __init__(self, make_engine: Callable[[], Engine], config_for: Callable[[RunChoice, int], EngineConfig],
                 title: str = "deftly") -> None:
        self.window = MainWindow(title=title)
        self.bridge = EngineBridge(make_engine)
        connect_engine(self.window, self.bridge, config_for)
        self._closing = False
        self._closed = False
        self.window.close_guard = self._close_event
        self.bridge.finished_call.connect(self._call_done)
        self.bridge.failed.connect(lambda what, *_: self._call_done(what))

    def start(self, lobby: bool = True) -> None:
        """Start the engine's thread; with ``lobby``, let it find and pair agents before any run."""
        self.bridge.start()
        if lobby:
            self.bridge.call("find agents", lambda engine: engine.open())

    def _close_event(self, event: QCloseEvent) -> None:
        if self._closed or not self.bridge.running:
            event.accept()
            return
        event.ignore()
        if self._closing:
            return
        self._closing = True
        self.window.status_error.setText("Closing: the agents finish their current step and the adapter is "
                                         "written from the last merged round…")
        self.bridge.call("close", lambda engine: engine.close())

    def _call_done(self, what: str) -> None:
        if what == "close" and self._closing:
            self._closed = True
            self.bridge.stop()
            # From a fresh turn of the loop: a close() issued while Qt still counts the refused one
            # as in progress is dropped.
            QTimer.singleShot(0, self.window.close)

    def force_close(self) -> None:
        """Close without waiting for the engine (a second Ctrl-C)."""
        self._closed = True
        self.window.close()


def _exec(app: QApplication, dashboard: Dashboard | None, window: MainWindow) -> int:
    """Run Qt's loop until the window closes; Ctrl-C closes it (twice: at once)."""
    interrupts = {"n": 0}

    def on_sigint(_signum, _frame) -> None:
        interrupts["n"] += 1
        if dashboard is None or interrupts["n"] > 1:
            if dashboard is not None:
                dashboard.force_close()
            window.close()
            app.quit()
        else:
            window.close()

    previous = signal.signal(signal.SIGINT, on_sigint)
    poll = QTimer()
    poll.timeout.connect(lambda: None)  # lets the interpreter run its signal handlers
    poll.start(SIGNAL_POLL_MS)
    app.setQuitOnLastWindowClosed(True)
    settle_heap()
    try:
        return app.exec()
    finally:
        poll.stop()
        signal.signal(signal.SIGINT, previous)
        if dashboard is not None and dashboard.bridge.running:
            dashboard.bridge.stop()


def open_dashboard(config: EngineConfig, *, presenter: bool = False) -> int:
    """The operator's dashboard: agents found and paired at once, the job chosen in the form.

    Args:
        config: how to find agents and where runs go; its job is the form's starting value.
    """
    app = application()

    def config_for(choice: RunChoice, paired: int) -> EngineConfig:
        from dataclasses import replace

        return replace(config, job=choice.job, rounds=choice.rounds, local_steps=choice.local_steps,
                       devices=max(paired, 1))

    dashboard = Dashboard(lambda: Engine(config), config_for, title="deftly dashboard")
    dashboard.window.job.set_fields(fields_from_job(config.job, config.rounds, config.local_steps))
    dashboard.start(lobby=True)
    dashboard.window.show()
    if presenter:
        dashboard.window.enter_presenter()
    return _exec(app, dashboard, dashboard.window)


def open_demo(config: EngineConfig, *, title: str, caption: str | None = None, presenter: bool = False,
              on_window: Callable[[MainWindow], None] | None = None) -> int:
    """The dashboard driving the run ``config`` describes, started at once (``deftly demo``)."""
    app = application()
    dashboard = Dashboard(lambda: Engine(config), lambda _choice, _paired: config, title=title)
    window = dashboard.window
    window.job.set_fields(fields_from_job(config.job, config.rounds, config.local_steps))
    if caption:
        window.live.set_caption(caption)
    dashboard.start(lobby=False)
    window.show()
    if presenter:
        window.enter_presenter()
    choice = window.job.choice()
    assert choice is not None, "the demo's own settings are valid"
    window.start_run(choice)
    if on_window is not None:
        on_window(window)
    return _exec(app, dashboard, window)


def open_replay(path: Path, speed: float = 1.0, *, presenter: bool = False) -> int:
    """A recorded run played through the dashboard at ``speed`` times its pace."""
    replay = load_replay(path)  # a wrong path is said before any window opens
    app = application()
    window = MainWindow(controls=False, title=f"deftly replay — {replay.source}")
    player = ReplayPlayer(replay, speed)
    window.attach_replay(player)
    window.show()
    if presenter:
        window.enter_presenter()
    player.play()
    return _exec(app, None, window)


def render_end_state(run_dir: Path, png: Path, size: tuple[int, int] = (1600, 1000)) -> Path:
    """The dashboard at the end of a recorded run, drawn offscreen into ``png``."""
    app = application()
    replay = load_replay(run_dir)
    window = MainWindow(controls=False, title="deftly")
    player = ReplayPlayer(replay)
    window.attach_replay(player)
    window.resize(*size)
    window.show()
    player.advance_to(replay.duration_s)
    window.devices.refresh_all()
    window.live.redraw()
    for _ in range(5):  # the layout reflows the new texts on the next turns of the loop
        app.processEvents()
    png.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(png)):
        raise OSError(f"could not write {png}")
    window.close()
    window.deleteLater()
    app.processEvents()
    return png
