"""The dashboard window: devices and the job on the left, the plan and the live plots on the right.

The window is a view: every batch of engine events goes through
:meth:`MainWindow.apply_events` into the :class:`desktop.ui.model.DashboardModel`,
and each panel redraws what changed; every button calls the engine through
the :class:`desktop.ui.bridge.EngineBridge` (pair = add the agent's address
with its token, start = ``run`` with the job the form describes, stop, pause,
resume). A replay feeds the same method from a recording instead.

Errors (an agent's, the engine's, a call that failed) are shown in plain words:
on the device's card when it is about one device, and in the status bar
(which device, what happened, what to do) — never as a traceback dialog.
F11 (or the Presenter button) switches to the presenter layout: full screen,
the plan and the plots large, the controls hidden; Esc leaves it.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QFont, QKeySequence
from PySide6.QtWidgets import (
    QComboBox, QGroupBox, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMainWindow, QPushButton, QSplitter,
    QStatusBar, QVBoxLayout, QWidget,
)

from desktop.engine.events import DeviceError, DeviceStatus
from desktop.ui.bridge import EngineBridge
from desktop.ui.devices import DevicesPanel
from desktop.ui.job_form import JobForm, RunChoice
from desktop.ui.live import LivePlots
from desktop.ui.model import Changes, DashboardModel
from desktop.ui.plan_view import PlanPanel
from desktop.ui.progress import ExportBar, PhaseStrip, ResultsPanel

MESSAGES_KEPT = 200  # lines in the messages list
REPLAY_SPEEDS = (1, 2, 5, 10, 30, 100)
RUN_CALL = "start the run"  # what a failed run call is called in the status bar


class MainWindow(QMainWindow):
    """The dashboard.

    Args:
        model: the views' model (a fresh one by default).
        start_run: called with the form's choice when the operator presses Start; returns
            nothing (the app turns it into an engine call). None: a replay, no controls.
        title: the window's title.
    """

    run_requested = Signal(object)  # RunChoice
    pair_requested = Signal(str, str, str)  # device, its address, token
    add_requested = Signal(str)  # [TOKEN@]HOST:PORT
    stop_requested = Signal()
    pause_requested = Signal(bool)  # True: pause, False: resume

    def __init__(self, model: DashboardModel | None = None, *, controls: bool = True, title: str = "deftly") -> None:
        super().__init__()
        self.model = model or DashboardModel()
        self.setWindowTitle(title)
        self.resize(1440, 900)
        self.last_error: str = ""
        self._started = False  # a run was asked for
        self.close_guard: Callable[[QCloseEvent], None] | None = None  # decides a close (the engine must stop first)
        self._paused = False
        self._presenting = False

        # -- left: devices, job, actions
        self.devices = DevicesPanel(self.model)
        self.devices.pair_requested.connect(self._pair)
        self.devices.add_requested.connect(self.add_requested)
        self.job = JobForm()
        job_box = QGroupBox("Job")
        QVBoxLayout(job_box).addWidget(self.job)
        self.start_button = QPushButton("Start run")
        self.start_button.setStyleSheet("font-weight:bold; padding:6px 14px")
        self.start_button.clicked.connect(self._start)
        self.pause_button = QPushButton("Pause")
        self.pause_button.clicked.connect(self._pause)
        self.stop_button = QPushButton("Stop")
        self.stop_button.clicked.connect(self.stop_requested)
        actions = QHBoxLayout()
        for button in (self.start_button, self.pause_button, self.stop_button):
            actions.addWidget(button)
        self.messages = QListWidget()
        self.messages.setMaximumHeight(120)
        self.messages.setWordWrap(True)
        self.left = QWidget()
        left = QVBoxLayout(self.left)
        left.addWidget(self.devices, 3)
        left.addWidget(job_box)
        left.addLayout(actions)
        left.addWidget(QLabel("Messages"))
        left.addWidget(self.messages)
        self.left.setMinimumWidth(360)
        self.left.setMaximumWidth(520)

        # -- right: phases, export, plan, plots, results
        self.phases = PhaseStrip(self.model)
        self.export = ExportBar(self.model)
        self.plan = PlanPanel(self.model)
        self.live = LivePlots(self.model)
        self.results = ResultsPanel(self.model)
        self.presenter_button = QPushButton("Presenter (F11)")
        self.presenter_button.clicked.connect(self.toggle_presenter)
        top = QHBoxLayout()
        top.addWidget(self.phases, 1)
        top.addWidget(self.presenter_button)
        self.replay_bar = QWidget()
        self.replay_bar.hide()
        self.centre = QSplitter(Qt.Orientation.Vertical)
        self.centre.addWidget(self.plan)
        self.centre.addWidget(self.live)
        self.centre.setStretchFactor(0, 1)
        self.centre.setStretchFactor(1, 2)
        self.plan.setMinimumHeight(300)
        right_widget = QWidget()
        right = QVBoxLayout(right_widget)
        right.addLayout(top)
        right.addWidget(self.replay_bar)
        right.addWidget(self.export)
        right.addWidget(self.centre, 1)
        right.addWidget(self.results)

        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(self.left)
        body.addWidget(right_widget)
        body.setStretchFactor(1, 1)
        self.setCentralWidget(body)
        self.left.setVisible(controls)

        self.status = QStatusBar()
        self.status_phase = QLabel()
        self.status_error = QLabel()
        self.status_error.setTextFormat(Qt.TextFormat.RichText)
        self.status_error.setWordWrap(True)
        self.status.addWidget(self.status_error, 1)
        self.status.addPermanentWidget(self.status_phase)
        self.setStatusBar(self.status)
        for key, slot in ((QKeySequence(Qt.Key.Key_F11), self.toggle_presenter),
                          (QKeySequence(Qt.Key.Key_Escape), self.leave_presenter)):
            action = QAction(self)
            action.setShortcut(key)
            action.triggered.connect(slot)
            self.addAction(action)
        self._refresh_buttons()
        self._refresh_phase()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 — Qt's name
        if self.close_guard is not None:
            self.close_guard(event)
        else:
            event.accept()

    # -- events in --------------------------------------------------------------------

    def apply_events(self, batch: list) -> Changes:
        """A batch of engine events: into the model, then to each panel (they redraw what changed)."""
        changes = self.model.apply(batch)
        self.devices.on_changes(changes)
        self.live.on_changes(changes)
        self.plan.on_changes(changes)
        self.results.on_changes(changes)
        if changes.export or changes.phase:
            self.export.refresh()
        if changes.phase or changes.rounds:
            self._refresh_phase()
            self._refresh_buttons()
        for error in changes.errors:
            self._show_error(error)
        for notice in changes.notices:
            self._message(notice)
        for lost in changes.lost:
            view = self.model.state.devices.get(lost.device)
            name = view.name if view else lost.device
            where = f"in round {lost.round}" if lost.round is not None else "between rounds"
            self._show_text(f"<b>{name}</b> was lost {where}: {lost.reason}. <i>The others re-plan and go on "
                            f"from the last merged round; it rejoins when it is back.</i>")
        return changes

    def call_failed(self, what: str, message: str, advice: str) -> None:
        """A call into the engine failed: say so in plain words (on the card too when it names a device)."""
        if what == RUN_CALL:
            self._started = False  # refused before it began (its settings): the operator may fix and retry
            self._refresh_buttons()
        device = what.split(" ", 1)[1] if what.startswith("pair ") else None
        if device and device in self.model.state.devices:
            self.apply_events([DeviceError(device, message, advice), DeviceStatus(device, "error", message)])
            return
        if message == self.last_error or message in self.last_error:
            return  # the engine already said it as an event
        self._show_text(f"<b>{what}</b>: {message}" + (f" <i>— {advice}</i>" if advice else ""))

    def _show_error(self, error: DeviceError) -> None:
        view = self.model.state.devices.get(error.device or "")
        who = f"<b>{view.name}</b>: " if view is not None and not error.message.startswith(view.name) else ""
        self.last_error = error.message
        self._show_text(f"{who}{error.message}" + (f" <i>— {error.advice}</i>" if error.advice else ""),
                        fatal=error.fatal)

    def _show_text(self, html: str, fatal: bool = False) -> None:
        self.status_error.setText(f"<span style='color:#a1120b'>{'&#9888; ' if fatal else ''}{html}</span>")
        self._message(html)

    def _message(self, html: str) -> None:
        item = QListWidgetItem(time.strftime("%H:%M:%S ") + _strip_tags(html))
        self.messages.addItem(item)
        while self.messages.count() > MESSAGES_KEPT:
            self.messages.takeItem(0)
        self.messages.scrollToBottom()

    def _refresh_phase(self) -> None:
        self.phases.refresh()
        state = self.model.state
        accuracy = [a for _r, a in state.accuracy if math.isfinite(a)]
        self.status_phase.setText(f"{state.phase}" + (f" · round {state.round}/{state.rounds}" if state.rounds else "")
                                  + (f" · accuracy {accuracy[-1]:.3f}" if accuracy else ""))

    def _refresh_buttons(self) -> None:
        phase = self.model.state.phase
        over = phase in ("done", "stopped", "failed")
        running = self._started and not over
        self.start_button.setEnabled(not running and not over)
        self.start_button.setText("Run finished" if over else "Running…" if running else "Start run")
        self.pause_button.setEnabled(running and phase == "training")
        self.stop_button.setEnabled(running)
        self.job.set_locked(running or over)

    # -- actions out ------------------------------------------------------------------

    def _start(self) -> None:
        choice = self.job.choice()
        if choice is None:
            return
        self.start_run(choice)

    def start_run(self, choice: RunChoice) -> None:
        """Ask for a run of ``choice`` (the app calls the engine); the views expect its rounds."""
        self._started = True
        self.model.state.rounds, self.model.state.local_steps = choice.rounds, choice.local_steps
        self._refresh_buttons()
        self.run_requested.emit(choice)

    def _pair(self, device: str, token: str) -> None:
        view = self.model.state.devices.get(device)
        if view is not None:
            self.pair_requested.emit(device, view.address, token)

    def _pause(self) -> None:
        self._paused = not self._paused
        self.pause_button.setText("Resume" if self._paused else "Pause")
        self.pause_requested.emit(self._paused)

    # -- presenter layout ---------------------------------------------------------------

    def toggle_presenter(self) -> None:
        self.leave_presenter() if self._presenting else self.enter_presenter()

    def enter_presenter(self) -> None:
        """Full screen, plan and plots large, controls hidden."""
        self._presenting = True
        self._left_was_visible = self.left.isVisible()
        self.left.hide()
        self.plan.table.hide()
        self.results.hide()
        self.messages.hide()
        font = QFont(self.font())
        font.setPointSizeF(font.pointSizeF() * 1.25)
        self.centralWidget().setFont(font)
        self.presenter_button.setText("Leave presenter (Esc)")
        self.showFullScreen()

    def leave_presenter(self) -> None:
        if not self._presenting:
            return
        self._presenting = False
        self.left.setVisible(self._left_was_visible)
        self.plan.table.show()
        self.results.show()
        self.messages.show()
        self.centralWidget().setFont(QFont(self.font()))
        self.presenter_button.setText("Presenter (F11)")
        self.showNormal()

    # -- replay -----------------------------------------------------------------------

    def attach_replay(self, player) -> None:
        """Controls for a :class:`desktop.ui.replay.ReplayPlayer` (play/pause, speed, position)."""
        layout = QHBoxLayout(self.replay_bar)
        layout.setContentsMargins(0, 0, 0, 0)
        label = QLabel(f"<b>Replay</b> of <code>{player.replay.source}</code>")
        play = QPushButton("Pause")
        speed = QComboBox()
        for s in REPLAY_SPEEDS:
            speed.addItem(f"{s}×", s)
        index = speed.findData(int(player.speed)) if float(player.speed).is_integer() else -1
        if index < 0:
            speed.addItem(f"{player.speed:g}×", player.speed)
            index = speed.count() - 1
        speed.setCurrentIndex(index)
        position = QLabel()

        def toggle() -> None:
            if player.playing:
                player.pause()
                play.setText("Play")
            else:
                player.play()
                play.setText("Pause")

        play.clicked.connect(toggle)
        speed.currentIndexChanged.connect(lambda _i: player.set_speed(float(speed.currentData())))
        player.progressed.connect(lambda at, total: position.setText(f"{at:.0f} s of {total:.0f} s"))
        player.finished.connect(lambda: play.setText("Done"))
        player.batch.connect(self.apply_events)
        for widget in (label, play, speed, position):
            layout.addWidget(widget)
        layout.addStretch(1)
        self.replay_bar.show()
        self.model.state.rounds, self.model.state.local_steps = player.replay.rounds, player.replay.local_steps
        self.replay_controls = (play, speed, position)


def _strip_tags(html: str) -> str:
    out, inside = [], False
    for ch in html:
        if ch == "<":
            inside = True
        elif ch == ">":
            inside = False
        elif not inside:
            out.append(ch)
    return "".join(out).replace("&#9888; ", "").replace("&amp;", "&")


def connect_engine(window: MainWindow, bridge: EngineBridge, config_for: Callable[[RunChoice, int], object]) -> None:
    """Wire a window to an engine: events in, the operator's actions out as engine calls.

    Args:
        config_for: the engine's settings for a run of the form's choice with this many paired devices.
    """
    bridge.events.connect(window.apply_events)
    bridge.failed.connect(window.call_failed)

    def run(choice: RunChoice) -> None:
        paired = sum(v.status not in ("seen", "pairing", "error", "lost") for v in window.model.state.devices.values())
        config = config_for(choice, paired)
        bridge.call(RUN_CALL, lambda engine: engine.run(config))

    def pair(device: str, address: str, token: str) -> None:
        async def add(engine) -> None:
            engine.add_agent(address, token)

        bridge.call(f"pair {device}", add)

    def add(text: str) -> None:
        async def call(engine) -> None:
            engine.add_agent(text)

        bridge.call(f"add {text}", call)

    def stop() -> None:
        async def call(engine) -> None:
            engine.stop()

        bridge.call("stop", call)

    def pause(paused: bool) -> None:
        async def call(engine) -> None:
            engine.pause() if paused else engine.resume()

        bridge.call("pause" if paused else "resume", call)

    window.run_requested.connect(run)
    window.pair_requested.connect(pair)
    window.add_requested.connect(add)
    window.stop_requested.connect(stop)
    window.pause_requested.connect(pause)
