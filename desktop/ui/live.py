"""The live plots: loss, step latency and memory per device, and the merged adapter's accuracy per round.

Data arrives into preallocated ring buffers (each device's
:class:`desktop.engine.state.Series` in the dashboard's state mirror); an
event batch only marks the devices it touched; one timer (:attr:`LivePlots.timer`)
calls ``setData`` on the curves of the marked devices, so a thousand steps a
second cost one redraw per tick. Curves downsample (peak) and clip to the
visible range, so a long run or a hundred devices stay smooth. Every device's
line has the colour the plan view gives it, and the legend names it.
"""
from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QGridLayout, QHBoxLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from desktop.ui.model import Changes, DashboardModel

REDRAW_MS = 100  # the plots' redraw period: 10 frames a second is smooth for curves that grow a point at a time
LEGEND_MAX = 24  # devices named in the legend; past that it says how many more

# metric key -> (the DeviceView series attribute, the plot's title, its y label)
METRICS = {
    "loss": ("loss", "Loss per device", "loss (mean of the 2q perturbed copies)"),
    "step_s": ("step_s", "Step latency per device", "seconds per step (device clock)"),
    "rss_mb": ("rss_mb", "Memory per device", "resident memory (MB)"),
}

pg.setConfigOptions(antialias=False, background="w", foreground="#202124")


def _plot(title: str, ylabel: str, xlabel: str) -> pg.PlotWidget:
    widget = pg.PlotWidget()
    item = widget.getPlotItem()
    item.setTitle(title, size="11pt")
    item.setLabel("left", ylabel)
    item.setLabel("bottom", xlabel)
    item.showGrid(x=True, y=True, alpha=0.2)
    item.setDownsampling(auto=True, mode="peak")
    item.setClipToView(True)
    for axis in ("left", "bottom"):
        item.getAxis(axis).enableAutoSIPrefix(False)  # a loss of 0.7 reads 0.7, not 700 (x0.001)
    widget.setMinimumHeight(160)
    return widget


class LegendStrip(QWidget):
    """One row naming each device in its colour, shared by the plots (and matching the plan view)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(4, 0, 4, 0)
        self._layout.setSpacing(14)
        self._shown: tuple[tuple[str, str, str], ...] = ()
        self.labels: list[QLabel] = []

    def show_devices(self, entries: list[tuple[str, str, str]]) -> None:
        """``entries``: (device id, name, colour) in the order to show them."""
        key = tuple(entries[:LEGEND_MAX]) + ((("+", str(len(entries)), ""),) if len(entries) > LEGEND_MAX else ())
        if key == self._shown:
            return
        self._shown = key
        while self._layout.count():
            child = self._layout.takeAt(0).widget()
            if child is not None:
                child.deleteLater()
        self.labels = []
        for _device, name, colour in entries[:LEGEND_MAX]:
            label = QLabel(f"<span style='color:{colour}; font-size:16px'>&#9632;</span> {name}")
            label.setTextFormat(Qt.TextFormat.RichText)
            self._layout.addWidget(label)
            self.labels.append(label)
        if len(entries) > LEGEND_MAX:
            self._layout.addWidget(QLabel(f"… and {len(entries) - LEGEND_MAX} more"))
        self._layout.addStretch(1)

    def names(self) -> list[str]:
        return [label.text().split("</span> ", 1)[1] for label in self.labels]


class LivePlots(QWidget):
    """Four plots fed from the dashboard model, redrawn on one timer."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None, redraw_ms: int = REDRAW_MS) -> None:
        super().__init__(parent)
        self.model = model
        self.plots: dict[str, pg.PlotWidget] = {
            key: _plot(title, ylabel, "step on the device (all rounds)") for key, (_a, title, ylabel) in METRICS.items()}
        self.plots["accuracy"] = _plot("Accuracy of the merged adapter", "validation accuracy", "round")
        self.curves: dict[tuple[str, str], pg.PlotDataItem] = {}  # (metric, device) -> its line
        self.accuracy_curve = self.plots["accuracy"].plot([], [], pen=pg.mkPen("#202124", width=2), symbol="o",
                                                          symbolSize=8, symbolBrush="#202124")
        self._accuracy_labels: list[pg.TextItem] = []
        self._lost_marks: list[pg.GraphicsObject] = []
        self._dirty: set[str] = set()
        self._accuracy_dirty = False
        self.redraws = 0  # timer ticks that drew something (the benchmark counts them)

        self.legend = LegendStrip()
        legend_scroll = QScrollArea()
        legend_scroll.setWidget(self.legend)
        legend_scroll.setWidgetResizable(True)
        legend_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        legend_scroll.setFixedHeight(30)
        legend_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.caption = QLabel()
        self.caption.setWordWrap(True)
        self.caption.setStyleSheet("color:#5f6368")
        grid = QGridLayout()
        grid.setSpacing(6)
        grid.addWidget(self.plots["loss"], 0, 0)
        grid.addWidget(self.plots["accuracy"], 0, 1)
        grid.addWidget(self.plots["step_s"], 1, 0)
        grid.addWidget(self.plots["rss_mb"], 1, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(legend_scroll)
        layout.addLayout(grid, 1)
        layout.addWidget(self.caption)
        self.set_caption()

        self.timer = QTimer(self)
        self.timer.setInterval(redraw_ms)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def set_caption(self, text: str | None = None) -> None:
        """Say under the plots what the curves show (the demo passes what its settings make them show)."""
        self.caption.setText(text or (
            "Loss is each step's mean over the 2q perturbed copies of its batch: a zeroth-order estimate, noisy "
            "by design, that drifts down slowly. Accuracy is the merged adapter on the validation split after "
            "each round; round 0 is the model before training."))

    # -- feeding ----------------------------------------------------------------------

    def on_changes(self, changes: Changes) -> None:
        """Mark what a batch changed; the timer draws it."""
        self._dirty |= changes.series
        if changes.rounds:
            self._accuracy_dirty = True
        for lost in changes.lost:
            self._mark_lost(lost.device)
        if changes.plan or changes.devices:
            self._update_legend()

    def clear(self) -> None:
        """Forget every curve (a new run, or a replay from its start)."""
        for (metric, _device), curve in self.curves.items():
            self.plots[metric].removeItem(curve)
        self.curves.clear()
        for mark in self._lost_marks:
            self.plots["loss"].removeItem(mark)
        for label in self._accuracy_labels:
            self.plots["accuracy"].removeItem(label)
        self._lost_marks.clear()
        self._accuracy_labels.clear()
        self.accuracy_curve.setData([], [])
        self._dirty.clear()
        self.legend.show_devices([])

    def _update_legend(self) -> None:
        state = self.model.state
        order = [a.device for a in state.plan.active()] if state.plan else []
        order += [d for d in state.devices if d not in order and len(state.devices[d].loss)]
        self.legend.show_devices([(d, state.devices[d].name, self.model.colour(d)) for d in order
                                  if d in state.devices])

    def _curve(self, metric: str, device: str) -> pg.PlotDataItem:
        curve = self.curves.get((metric, device))
        if curve is None:
            view = self.model.state.devices[device]
            curve = self.plots[metric].plot([], [], pen=pg.mkPen(self.model.colour(device), width=2), name=view.name)
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)
            self.curves[(metric, device)] = curve
        return curve

    def _mark_lost(self, device: str) -> None:
        view = self.model.state.devices.get(device)
        if view is None or not len(view.loss):
            return
        x, y = view.loss.view()
        mark = pg.ScatterPlotItem([x[-1]], [y[-1] if math.isfinite(y[-1]) else 0.0], symbol="x", size=16,
                                  pen=pg.mkPen("#a1120b", width=3), brush="#a1120b")
        text = pg.TextItem(f"{view.name} lost", color="#a1120b", anchor=(1, 1))
        text.setPos(x[-1], y[-1] if math.isfinite(y[-1]) else 0.0)
        self.plots["loss"].addItem(mark)
        self.plots["loss"].addItem(text)
        self._lost_marks += [mark, text]

    # -- drawing ----------------------------------------------------------------------

    def redraw(self) -> None:
        """The timer's tick: setData on every curve whose device got new points since the last tick."""
        drew = False
        devices = self.model.state.devices
        for device in self._dirty:
            view = devices.get(device)
            if view is None:
                continue
            for metric, (attribute, _title, _ylabel) in METRICS.items():
                x, y = getattr(view, attribute).view()
                self._curve(metric, device).setData(x, y)
            drew = True
        if self._dirty:
            self._update_legend()
        self._dirty.clear()
        if self._accuracy_dirty:
            self._draw_accuracy()
            drew = True
        if drew:
            self.redraws += 1

    def _draw_accuracy(self) -> None:
        self._accuracy_dirty = False
        state = self.model.state
        points = sorted((r, a) for r, a in state.accuracy if math.isfinite(a))
        if not points:
            self.accuracy_curve.setData([], [])
            return
        rounds, accuracy = np.array(points, dtype=np.float64).T
        self.accuracy_curve.setData(rounds, accuracy)
        plot = self.plots["accuracy"]
        for label in self._accuracy_labels:
            plot.removeItem(label)
        self._accuracy_labels = []
        names = {d: v.name for d, v in state.devices.items()}
        lost_by_round: dict[int, list[str]] = {}
        for round_, device in state.lost:
            if round_ is not None:
                lost_by_round.setdefault(round_, []).append(names.get(device, device))
        for round_, who in lost_by_round.items():
            line = pg.InfiniteLine(pos=round_, angle=90, pen=pg.mkPen("#a1120b", width=1, style=Qt.PenStyle.DashLine),
                                   label=f"{', '.join(who)} lost: re-planned", labelOpts={"color": "#a1120b",
                                                                                           "position": 0.9})
            plot.addItem(line)
            self._accuracy_labels.append(line)
        last_round, last = points[-1]
        text = pg.TextItem(f"{last:.3f}", color="#202124", anchor=(1.1, -0.2))
        text.setPos(last_round, last)
        plot.addItem(text)
        self._accuracy_labels.append(text)

    # -- reading back (tests, benchmark) -----------------------------------------------

    def plotted(self, device: str, metric: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """The full series handed to the device's curve (before downsampling for the screen)."""
        curve = self.curves.get((metric, device))
        if curve is None or curve.xData is None:
            return np.zeros(0), np.zeros(0)
        return np.asarray(curve.xData), np.asarray(curve.yData)

    def annotations(self) -> list[str]:
        """The texts drawn on the accuracy plot (lost devices, the last value), in order."""
        texts = []
        for item in self._accuracy_labels:
            text = item.label if isinstance(item, pg.InfiniteLine) else item
            texts.append(text.textItem.toPlainText())
        return texts

    def plotted_accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.accuracy_curve.xData, self.accuracy_curve.yData
        return (np.zeros(0), np.zeros(0)) if x is None else (np.asarray(x), np.asarray(y))
