"""Where the run is: the phase strip, the export's progress with time left, and the results when it ends.

* :class:`PhaseStrip`: discover → pair → profile → plan → export → ship → train → finish, the current
  one highlighted, so an audience always sees what the machine is doing;
* :class:`ExportBar`: what the exporter does now, the fraction of the whole export, elapsed and
  estimated time left (the exporter's own ``export.progress.ExportProgress``) — the window keeps
  moving while the exporter works in its own process;
* :class:`ResultsPanel`: where the adapter and the report were written, a button to open the folder,
  and the final accuracy beside the zero-shot one.
"""
from __future__ import annotations

import math
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from desktop.ui.devices import duration
from desktop.ui.model import Changes, DashboardModel

EXPORT_QUIET_S = 20.0  # the export bar stays this long after the exporter's last word (a stage can be long)
# The engine's phases (desktop.engine.events.PHASES) as the strip names them.
STRIP = (("discovering", "discover"), ("pairing", "pair"), ("profiling", "profile"), ("planning", "plan"),
         ("exporting", "export"), ("shipping", "ship"), ("training", "train"), ("finishing", "finish"))


class PhaseStrip(QWidget):
    """The run's phases in a row, the current one highlighted."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(4)
        self.labels: dict[str, QLabel] = {}
        for i, (phase, word) in enumerate(STRIP):
            if i:
                arrow = QLabel("→")
                arrow.setStyleSheet("color:#9aa0a6")
                layout.addWidget(arrow)
            label = self.labels[phase] = QLabel(word)
            layout.addWidget(label)
        self.detail = QLabel()
        self.detail.setStyleSheet("color:#5f6368")
        layout.addSpacing(12)
        layout.addWidget(self.detail, 1)
        self.refresh()

    def refresh(self) -> None:
        state = self.model.state
        order = [p for p, _w in STRIP]
        current = state.phase
        reached = order.index(current) if current in order else (len(order) if current == "done" else -1)
        for i, phase in enumerate(order):
            if phase == current:
                style = "background:#0b5d2a; color:white; border-radius:4px; padding:2px 8px; font-weight:bold"
            elif i < reached:
                style = "color:#0b5d2a; padding:2px 8px"
            else:
                style = "color:#9aa0a6; padding:2px 8px"
            self.labels[phase].setStyleSheet(style)
        words = {"done": "done", "stopped": "stopped", "failed": "failed", "starting": "starting"}
        detail = state.phase_detail
        if current in words:
            detail = f"{words[current]}{': ' + detail if detail else ''}"
        if current == "training" and state.rounds:
            detail = f"round {state.round} of {state.rounds}" + (f" · {detail}" if detail else "")
        self.detail.setText(detail)


class ExportBar(QWidget):
    """The exporter's progress (it runs in its own process, so the window stays live)."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.label = QLabel()
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setFixedHeight(10)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.label)
        layout.addWidget(self.bar)
        self.hide()
        self.timer = QTimer(self)  # hides the bar once the exporter has gone quiet
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

    def refresh(self) -> None:
        progress = self.model.state.export
        exporting = self.model.exporting(EXPORT_QUIET_S)
        if self.isHidden() == exporting:
            self.setVisible(exporting)
        if not exporting:
            return
        left = f", about {duration(progress.remaining_s)} left" if progress.remaining_s is not None else ""
        self.label.setText(f"Exporting: {progress.message or progress.stage} — {progress.fraction:.0%}, "
                           f"{duration(progress.elapsed_s)} so far{left}")
        self.bar.setValue(round(progress.fraction * 1000))


class ResultsPanel(QWidget):
    """Where the run's outputs are, and how well the adapter does against the untrained model."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.accuracy = QLabel()
        self.accuracy.setWordWrap(True)
        self.adapter = QLabel()
        self.report = QLabel()
        for label in (self.adapter, self.report):
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(self.open_folder)
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("<b>Results</b>"), 0, 0)
        layout.addWidget(self.accuracy, 1, 0, 1, 2)
        layout.addWidget(self.adapter, 2, 0)
        layout.addWidget(self.open_button, 2, 1)
        layout.addWidget(self.report, 3, 0, 1, 2)
        self.folder: Path | None = None
        self.refresh()

    def zero_shot(self) -> float | None:
        """The accuracy before training: the engine's round 0 (the untrained adapter), if it measured one."""
        return next((a for r, a in self.model.state.accuracy if r == 0 and math.isfinite(a)), None)

    def refresh(self) -> None:
        state = self.model.state
        finished = state.finished
        rounds = [(r, a) for r, a in state.accuracy if r > 0 and math.isfinite(a)]
        zero = self.zero_shot()
        parts = []
        if rounds:
            parts.append(f"validation <b>{rounds[-1][1]:.3f}</b> after round {rounds[-1][0]}")
        if zero is not None:
            parts.append(f"zero-shot {zero:.3f}" + (f" ({rounds[-1][1] - zero:+.3f})" if rounds else ""))
        if finished is not None and finished.test_accuracy is not None:
            parts.append(f"test {finished.test_accuracy:.3f}")
        self.accuracy.setText(" · ".join(parts) if parts else "No round merged yet.")
        if finished is None:
            self.adapter.setText("The adapter is written when the run ends.")
            self.report.setText("")
            self.open_button.setEnabled(False)
            return
        self.folder = Path(finished.out)
        why = " (stopped early" + (f": {finished.reason}" if finished.reason else "") + ")" if finished.stopped else ""
        self.adapter.setText(f"adapter: <code>{finished.adapter or 'not written'}</code>{why}")
        report = self.folder / "report.md"
        self.report.setText(f"report: <code>{report}</code>" if report.exists() else f"run folder: <code>{self.folder}</code>")
        self.open_button.setEnabled(True)

    def open_folder(self) -> None:
        if self.folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.folder)))

    def on_changes(self, changes: Changes) -> None:
        if changes.rounds or changes.finished:
            self.refresh()
