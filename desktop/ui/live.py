"""The live plots: loss, step latency and memory per device, and the merged adapter's accuracy per round.

Data arrives into preallocated ring buffers (each device's
:class:`desktop.engine.state.Series` in the dashboard's state mirror); an
event batch only marks the devices it touched. One timer (:class:`LivePlots`)
redraws the plots (:class:`SeriesPlot`, :class:`AccuracyPlot`) in turn, one
plot with news per tick, so two plots never paint in one turn of Qt's loop
(with a timer each, a loaded machine ran their overdue ticks back to back: one
frame held two or three repaints). A tick calls ``setData`` on the marked
devices' curves within a time budget and leaves the rest marked for the next
turn (oldest first), then paints that plot; so a hundred devices streaming ten
steps a second each never hold the window for long: at worst a line lags by a
few ticks. Every device's line has the colour the plan view gives it, and the
legend names it.

Downsampling: while a plot follows its data (:class:`Follow`: the view spans
every point), each curve is peak-downsampled by a factor it is given with its
data (points per pixel of the plot's width), and nothing is clipped (nothing is
outside the view). pyqtgraph's automatic downsampling, clip-to-view and
dynamic-range limit would redo every curve's display data at each range change
(a hundred curves: 15-30 ms in one frame, the live view's worst); they are
turned on only while the operator has zoomed or panned, when they pay.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QGraphicsItem, QGridLayout, QHBoxLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from desktop.ui.model import Changes, DashboardModel

REDRAW_MS = 100  # each plot's redraw period: 10 frames a second is smooth for curves that grow a point at a time
SLOWEST_MS = 1000  # ... stretched up to this when the ticks cost more than SHARE (many devices, a slow machine)
SHARE = 0.35  # of the GUI thread's time the plots' ticks may take: the cards and input keep the rest
BUDGET_MS = 10.0  # setData calls per tick stop after this long (the rest wait for the next tick)
THICK_UP_TO = 8  # devices drawn with 2-pixel lines; more get 1-pixel ones (a third of the painting time)
LEGEND_MAX = 24  # devices named in the legend; past that it says how many more
LOST = "#a1120b"

# metric key -> (the DeviceView series attribute, the plot's title, its y label)
METRICS = {
    "loss": ("loss", "Loss per device", "loss (mean of the 2q perturbed copies)"),
    "step_s": ("step_s", "Step latency per device", "seconds per step (device clock)"),
    "rss_mb": ("rss_mb", "Memory per device", "resident memory (MB)"),
}

pg.setConfigOptions(antialias=False, background="w", foreground="#202124")


def _plot_widget(title: str, ylabel: str, xlabel: str) -> pg.PlotWidget:
    widget = pg.PlotWidget()
    item = widget.getPlotItem()
    item.setTitle(title, size="11pt")
    item.setLabel("left", ylabel)
    item.setLabel("bottom", xlabel)
    item.showGrid(x=True, y=True, alpha=0.2)
    for axis in ("left", "bottom"):
        item.getAxis(axis).enableAutoSIPrefix(False)  # a loss of 0.7 reads 0.7, not 700 (x0.001)
        # Drawn once per range, then blitted: replaying an axis's text costs ~5 ms a paint.
        item.getAxis(axis).setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    widget.setMinimumHeight(160)
    return widget


def _nice_ceiling(value: float) -> float:
    """The next of 1, 2, 5 x 10^k at or above ``value`` (> 0)."""
    exponent = math.floor(math.log10(value))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10**exponent >= value:
            return mantissa * 10**exponent
    return 10 ** (exponent + 1)


class Follow:
    """Keeps a plot's range over its data, changing it in steps (each change redraws the axes).

    The x range grows to the next quarter of a round number; the y range grows to the data
    plus a tenth. A plot the operator zoomed or panned is left alone until its "A" button
    (pyqtgraph's auto-range) asks to follow again.

    Args:
        on_follow: called with True when the plot follows its data again, False when the
            operator took it over.
    """

    def __init__(self, widget: pg.PlotWidget, on_follow: Callable[[bool], None] | None = None) -> None:
        self.view = widget.getPlotItem().getViewBox()
        self.view.disableAutoRange()
        self.following = True
        self.on_follow = on_follow
        self.view.sigRangeChangedManually.connect(self._manual)
        self.x_max = 0.0
        self.y_lo, self.y_hi = math.inf, -math.inf

    def _manual(self, *_args) -> None:
        self._set_following(False)

    def _set_following(self, following: bool) -> None:
        if following != self.following:
            self.following = following
            if self.on_follow is not None:
                self.on_follow(following)

    def reset(self) -> None:
        self.x_max, self.y_lo, self.y_hi = 0.0, math.inf, -math.inf

    def cover(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Widen the range, if needed, to show this data too; returns whether it changed."""
        if any(self.view.state["autoRange"]):  # the operator pressed "A": follow the data again
            self.view.disableAutoRange()
            self._set_following(True)
        if not self.following or not len(x):
            return False
        finite = y[np.isfinite(y)]
        x_max = float(x[-1])
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (self.y_lo, self.y_hi)
        changed = False
        if x_max > self.x_max:
            step = _nice_ceiling(max(x_max, 1.0)) / 4
            self.x_max = math.ceil(x_max / step) * step
            changed = True
        if lo < self.y_lo or hi > self.y_hi:
            lo, hi = min(lo, self.y_lo), max(hi, self.y_hi)
            pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-3)
            self.y_lo, self.y_hi = lo - pad, hi + pad
            changed = True
        if changed:
            self.view.setRange(xRange=(0, self.x_max), yRange=(self.y_lo, self.y_hi), padding=0)
        return changed


class SeriesPlot:
    """One per-device metric: its plot widget and a curve per device (:class:`LivePlots` ticks it)."""

    def __init__(self, model: DashboardModel, metric: str) -> None:
        attribute, title, ylabel = METRICS[metric]
        self.model, self.metric, self.attribute = model, metric, attribute
        self.widget = _plot_widget(title, ylabel, "step on the device (all rounds)")
        self.follow = Follow(self.widget, on_follow=self._following)
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.dirty: dict[str, None] = {}  # devices with new points, oldest first (a dict keeps the order)
        self.marks: list[pg.GraphicsObject] = []
        self.redraws = 0

    @property
    def pending(self) -> bool:
        return bool(self.dirty)

    def mark(self, devices) -> None:
        for device in devices:
            self.dirty.setdefault(device, None)

    def curve(self, device: str) -> pg.PlotDataItem:
        curve = self.curves.get(device)
        if curve is None:
            view = self.model.state.devices[device]
            width = 2 if len(self.curves) < THICK_UP_TO else 1
            if len(self.curves) == THICK_UP_TO:  # the fleet outgrew thick lines: thin the ones drawn so far
                for other, line in self.curves.items():
                    line.setPen(pg.mkPen(self.model.colour(other), width=1))
            curve = self.widget.plot([], [], pen=pg.mkPen(self.model.colour(device), width=width), name=view.name)
            _zoomed_mode(curve, not self.follow.following)
            self.curves[device] = curve
        return curve

    def _following(self, following: bool) -> None:
        """The operator zoomed or panned (False), or asked to follow again (True): each curve's mode."""
        for curve in self.curves.values():
            _zoomed_mode(curve, not following)

    def _downsample(self, points: int) -> int:
        """Points per pixel of the plot's width (at least 1): the factor a following view needs."""
        pixels = max(1, int(self.follow.view.width()))
        return max(1, points // pixels)

    def redraw(self, budget_ms: float = BUDGET_MS) -> None:
        """setData on the marked devices' curves, oldest mark first, until the budget is spent; then paint."""
        if not self.dirty:
            return
        devices = self.model.state.devices
        deadline = time.perf_counter() + budget_ms / 1000.0
        for device in list(self.dirty):
            del self.dirty[device]
            view = devices.get(device)
            if view is not None:
                x, y = getattr(view, self.attribute).view()
                curve = self.curve(device)
                if self.follow.following:
                    curve.setDownsampling(ds=self._downsample(len(x)), auto=False, method="peak")
                curve.setData(x, y)
                if self.follow.cover(x, y):
                    break  # the range moved: every curve and both axes repaint, the rest wait for the next tick
            if time.perf_counter() > deadline:
                break
        # Paint now, in this tick: left to Qt, the plots' repaints would pile into one long frame.
        self.widget.viewport().repaint()
        self.redraws += 1

    def mark_lost(self, device: str) -> None:
        view = self.model.state.devices.get(device)
        series = getattr(view, self.attribute) if view is not None else None
        if series is None or not len(series):
            return
        x, y = series.view()
        at = (x[-1], y[-1] if math.isfinite(y[-1]) else 0.0)
        mark = pg.ScatterPlotItem([at[0]], [at[1]], symbol="x", size=16, pen=pg.mkPen(LOST, width=3), brush=LOST)
        text = pg.TextItem(f"{view.name} lost", color=LOST, anchor=(1, 1))
        text.setPos(*at)
        for item in (mark, text):
            self.widget.addItem(item)
            self.marks.append(item)

    def clear(self) -> None:
        for item in list(self.curves.values()) + self.marks:
            self.widget.removeItem(item)
        self.curves.clear()
        self.marks.clear()
        self.dirty.clear()
        self.follow.reset()


def _zoomed_mode(curve: pg.PlotDataItem, zoomed: bool) -> None:
    """pyqtgraph's view-dependent display (auto downsampling, clip to view, range limit) only when zoomed."""
    if zoomed:
        curve.setDynamicRangeLimit(1e6)  # pyqtgraph's default: points far off a zoomed view stay drawable
        curve.setClipToView(True)
        curve.setDownsampling(auto=True, method="peak")
    else:
        curve.setDynamicRangeLimit(None)
        curve.setClipToView(False)
        curve.setDownsampling(auto=False, method="peak")


class AccuracyPlot:
    """The merged adapter's validation accuracy per round, with the rounds that lost a device marked."""

    def __init__(self, model: DashboardModel) -> None:
        self.model = model
        self.widget = _plot_widget("Accuracy of the merged adapter", "validation accuracy", "round")
        self.curve = self.widget.plot([], [], pen=pg.mkPen("#202124", width=2), symbol="o", symbolSize=8,
                                      symbolBrush="#202124")
        self.labels: list[pg.GraphicsObject] = []
        self.dirty = False

    @property
    def pending(self) -> bool:
        return self.dirty

    def redraw(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        state = self.model.state
        for label in self.labels:
            self.widget.removeItem(label)
        self.labels = []
        points = sorted((r, a) for r, a in state.accuracy if math.isfinite(a))
        if not points:
            self.curve.setData([], [])
            return
        rounds, accuracy = np.array(points, dtype=np.float64).T
        self.curve.setData(rounds, accuracy)
        # At least ±0.01 around the points: a flat curve otherwise gets an axis of 1e-15 steps
        low, high = float(accuracy.min()), float(accuracy.max())
        pad = max(0.01, 0.1 * (high - low))
        self.widget.setYRange(max(0.0, low - pad), min(1.0, high + pad), padding=0)
        if len(points) <= 20:
            self.widget.getPlotItem().getAxis("bottom").setTickSpacing(1, 1)  # whole rounds
        names = {d: v.name for d, v in state.devices.items()}
        lost_by_round: dict[int, list[str]] = {}
        for round_, device in state.lost:
            if round_ is not None:
                lost_by_round.setdefault(round_, []).append(names.get(device, device))
        for round_, who in lost_by_round.items():
            line = pg.InfiniteLine(pos=round_, angle=90, pen=pg.mkPen(LOST, width=1, style=Qt.PenStyle.DashLine),
                                   label=f"{', '.join(who)} lost: re-planned",
                                   labelOpts={"color": LOST, "position": 0.1, "anchors": [(1, 1), (1, 1)]})
            self.widget.addItem(line)
            self.labels.append(line)
        last_round, last = points[-1]
        text = pg.TextItem(f"{last:.3f}", color="#202124", anchor=(1.1, -0.2))
        text.setPos(last_round, last)
        self.widget.addItem(text)
        self.labels.append(text)

    def texts(self) -> list[str]:
        return [(item.label if isinstance(item, pg.InfiniteLine) else item).textItem.toPlainText()
                for item in self.labels]

    def clear(self) -> None:
        for label in self.labels:
            self.widget.removeItem(label)
        self.labels = []
        self.curve.setData([], [])


class LegendStrip(QWidget):
    """One row naming each device in its colour, shared by the plots (and matching the plan view)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._layout = QHBoxLayout(self)
        self._layout.setContentsMargins(4, 0, 4, 0)
        self._layout.setSpacing(14)
        self._shown: tuple = ()
        self.labels: list[QLabel] = []

    def show_devices(self, entries: list[tuple[str, str, str]]) -> None:
        """``entries``: (device id, name, colour) in the order to show them."""
        key = (tuple(entries[:LEGEND_MAX]), len(entries))
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


class LivePlots(QWidget):
    """The four plots, the shared legend, and a caption saying what the curves show."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None, redraw_ms: int = REDRAW_MS) -> None:
        super().__init__(parent)
        self.model = model
        self.series = {metric: SeriesPlot(model, metric) for metric in METRICS}
        self.accuracy = AccuracyPlot(model)
        self._turns: list[SeriesPlot | AccuracyPlot] = [*self.series.values(), self.accuracy]
        self._next = 0  # the plot whose turn it is
        self._tick_ms = redraw_ms // len(self._turns)  # each plot redrawn every redraw_ms when all have news
        self.timer = QTimer(self)
        self.timer.setInterval(self._tick_ms)
        self.timer.timeout.connect(self._tick)
        self.timer.start()
        self.plots = {**{m: p.widget for m, p in self.series.items()}, "accuracy": self.accuracy.widget}
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
        self._legend_stale = False
        self.legend_timer = QTimer(self)
        self.legend_timer.setInterval(4 * redraw_ms)
        self.legend_timer.timeout.connect(self._update_legend)
        self.legend_timer.start()

    @property
    def redraws(self) -> int:
        return sum(p.redraws for p in self.series.values())

    def _tick(self) -> None:
        """Redraw the next plot (in turn) that has news; one per tick, stretched when ticks cost much."""
        for k in range(len(self._turns)):
            plot = self._turns[(self._next + k) % len(self._turns)]
            if plot.pending:
                self._next = (self._next + k + 1) % len(self._turns)
                start = time.perf_counter()
                plot.redraw()
                cost_ms = (time.perf_counter() - start) * 1000.0
                interval = int(min(SLOWEST_MS / len(self._turns), max(self._tick_ms, cost_ms / SHARE)))
                if abs(interval - self.timer.interval()) > 0.1 * self.timer.interval():
                    self.timer.setInterval(interval)
                return

    def set_caption(self, text: str | None = None) -> None:
        """Say under the plots what the curves show (the demo passes what its settings make them show)."""
        self.caption.setText(text or (
            "Loss is each step's mean over the 2q perturbed copies of its batch: a zeroth-order estimate, noisy "
            "by design, that drifts down slowly. Accuracy is the merged adapter on the validation split after "
            "each round; round 0 is the adapter before training."))

    def on_changes(self, changes: Changes) -> None:
        """Mark what a batch changed; each plot's timer draws it."""
        for plot in self.series.values():
            plot.mark(changes.series)
        if changes.rounds:
            self.accuracy.dirty = True
        for lost in changes.lost:
            self.series["loss"].mark_lost(lost.device)
        if changes.plan or changes.series or changes.devices:
            self._legend_stale = True

    def redraw(self) -> None:
        """Draw everything marked now, without a budget (a screenshot, a test's end state)."""
        for plot in self.series.values():
            while plot.dirty:
                plot.redraw(budget_ms=math.inf)
        self.accuracy.redraw()
        self._update_legend()

    def clear(self) -> None:
        """Forget every curve (a new run, or a replay from its start)."""
        for plot in self.series.values():
            plot.clear()
        self.accuracy.clear()
        self.legend.show_devices([])

    def _update_legend(self) -> None:
        if not self._legend_stale:
            return
        self._legend_stale = False
        state = self.model.state
        order = [a.device for a in state.plan.active()] if state.plan else []
        order += [d for d, v in state.devices.items() if d not in order and len(v.loss)]
        self.legend.show_devices([(d, state.devices[d].name, self.model.colour(d)) for d in order
                                  if d in state.devices])

    # -- reading back (tests, benchmark) -----------------------------------------------

    def plotted(self, device: str, metric: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """The full series handed to the device's curve (before downsampling for the screen)."""
        curve = self.series[metric].curves.get(device)
        if curve is None or curve.xData is None:
            return np.zeros(0), np.zeros(0)
        return np.asarray(curve.xData), np.asarray(curve.yData)

    def plotted_accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.accuracy.curve.xData, self.accuracy.curve.yData
        return (np.zeros(0), np.zeros(0)) if x is None else (np.asarray(x), np.asarray(y))

    def annotations(self) -> list[str]:
        """The texts drawn on the accuracy plot (lost devices, the last value), in order."""
        return self.accuracy.texts()
