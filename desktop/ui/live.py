"""The live plots: loss, step latency and memory per device, and the merged adapter's accuracy per round.

Data arrives into preallocated ring buffers (each device's
:class:`desktop.engine.state.Series` in the dashboard's state mirror); an
event batch only marks the devices it touched. One timer (:class:`LivePlots`)
ticks the plots (:class:`SeriesPlot`, :class:`AccuracyPlot`) in turn, one plot
with news per tick, so two plots never paint in one turn of Qt's loop. A tick
hands the marked devices' series to the plot's lines within a time budget and
leaves the rest marked for the next turn (oldest first); Qt paints the plot
once, in its next turn. So a hundred devices streaming ten steps a second each
never hold the window for long: at worst a line lags by a few ticks. Every
device's line has the colour the plan view gives it, and the legend names it.

A plot's device lines are one graphics item (:class:`DeviceLines`), not a
pyqtgraph curve each: a hundred curves cost ~20 ms of Python a tick to update
and paint, one item ~5 ms. It keeps each series whole (what the plot was
given, read back by :meth:`LivePlots.plotted`) and draws of it what the view
needs: never more than two points per pixel column (the lowest and the
highest, :mod:`desktop.ui.decimate`), and, while the operator has zoomed or
panned, only the visible range (clip to view).
"""
from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QPainter, QPainterPath, QPen
from PySide6.QtWidgets import QGraphicsItem, QGridLayout, QHBoxLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from desktop.ui.decimate import decimate
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

    def cover(self, bounds: tuple[float, float, float, float] | None) -> bool:
        """Widen the range, if needed, to show data of these finite bounds (x_lo, x_hi, y_lo, y_hi) too.

        Returns whether the range changed.
        """
        if any(self.view.state["autoRange"]):  # the operator pressed "A": follow the data again
            self.view.disableAutoRange()
            self._set_following(True)
        if not self.following or bounds is None:
            return False
        _x_lo, x_max, lo, hi = bounds
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


@dataclass
class Line:
    """One device's line: the series it was given, its pen, and the path drawn of it."""

    x: np.ndarray  # [n] the whole series, as handed to the plot
    y: np.ndarray  # [n]
    pen: QPen
    bounds: tuple[float, float, float, float] | None = None  # finite x_lo, x_hi, y_lo, y_hi
    path: QPainterPath = field(default_factory=QPainterPath)
    drawn: int = 0  # points in the path (after clipping and decimation)
    built_for: tuple | None = None  # the view layout its path was clipped or decimated for; None: whole


def _bounds(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float] | None:
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.all():
        return (float(x.min()), float(x.max()), float(y.min()), float(y.max())) if len(x) else None
    if not finite.any():
        return None
    x, y = x[finite], y[finite]
    return float(x.min()), float(x.max()), float(y.min()), float(y.max())


class DeviceLines(pg.GraphicsObject):
    """Every device's line on one plot, as one graphics item.

    One item instead of a pyqtgraph curve per device: a curve's ``setData`` and ``paint``
    cost ~0.07 and ~0.1 ms of Python each, so a hundred of them held a tick for ~20 ms;
    here a line's update is one path built from numpy, and a paint is a ``drawPath`` per
    line. What is drawn follows the view (its :meth:`view_layout`): a line with more than two
    points per pixel column is decimated to its lowest and highest point per column
    (:func:`desktop.ui.decimate.decimate`); while the operator has zoomed or panned
    (``zoomed``), each line is first clipped to the visible x range (one point either side,
    so it reaches the edges) and rebuilt at once when the range moves. A following plot's
    range grows in steps; the lines it made stale are rebuilt by the plot's ticks
    (:attr:`stale`), within their budget, and drawn meanwhile as they were (finer).

    Args:
        view: the plot's view box (its range and pixel width decide what is drawn).
    """

    def __init__(self, view: pg.ViewBox) -> None:
        super().__init__()
        self.view = view
        self.lines: dict[str, Line] = {}
        self.stale: dict[str, None] = {}  # lines whose path was made for an older layout, oldest first
        self.zoomed = False
        self._layout = self.view_layout()
        self._bounds: tuple[float, float, float, float] | None = None  # over every line
        self._rect: QRectF | None = None  # boundingRect's cache

    def view_layout(self) -> tuple[float, float, int, bool]:
        """What a path depends on: the view's x range, its width in pixels, whether it is clipped."""
        (x_lo, x_hi), _y = self.view.viewRange()
        return float(x_lo), float(x_hi), max(1, int(self.view.width())), self.zoomed

    def add(self, device: str, pen: QPen) -> None:
        self.lines[device] = Line(np.zeros(0), np.zeros(0), pen)

    def set_pen(self, device: str, pen: QPen) -> None:
        self.lines[device].pen = pen
        self.update()

    def set_data(self, device: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float] | None:
        """The device's whole series (x ascending); returns its finite bounds. Drawn at :meth:`commit`."""
        line = self.lines[device]
        line.x, line.y, line.bounds = x, y, _bounds(x, y)
        self._build(line)
        self.stale.pop(device, None)
        return line.bounds

    def rebuild_stale(self, deadline: float) -> None:
        """Rebuild stale lines, oldest first, until ``deadline`` (``time.perf_counter`` seconds)."""
        for device in list(self.stale):
            del self.stale[device]
            self._build(self.lines[device])
            if time.perf_counter() > deadline:
                break

    def commit(self) -> None:
        """After a tick's ``set_data`` calls: the item's bounds, and one repaint for them all."""
        boxes = [line.bounds for line in self.lines.values() if line.bounds is not None]
        bounds = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes),
                  max(b[3] for b in boxes)) if boxes else None
        if bounds != self._bounds:
            self.prepareGeometryChange()
            self._bounds, self._rect = bounds, None
        self.update()

    def remove_all(self) -> None:
        self.prepareGeometryChange()
        self.lines.clear()
        self.stale.clear()
        self._bounds, self._rect = None, None

    def set_zoomed(self, zoomed: bool) -> None:
        if zoomed != self.zoomed:
            self.zoomed = zoomed
            self.viewRangeChanged()

    def _build(self, line: Line) -> None:
        x, y = line.x, line.y
        x_lo, x_hi, pixels, zoomed = self._layout
        if zoomed and len(x):  # clip to the view, keeping the points just outside it
            first = max(0, int(np.searchsorted(x, x_lo, "left")) - 1)
            last = int(np.searchsorted(x, x_hi, "right")) + 1
            x, y = x[first:last], y[first:last]
        decimated = len(x) > 2 * pixels and x_hi > x_lo
        if decimated:
            keep = decimate(x, y, x_lo, (x_hi - x_lo) / pixels)
            x, y = x[keep], y[keep]
        line.path = pg.arrayToQPath(x, y, connect="finite")
        line.drawn = len(x)
        line.built_for = self._layout if zoomed or decimated else None

    # -- pyqtgraph's and Qt's side ------------------------------------------------------

    def viewRangeChanged(self) -> None:  # noqa: N802 — pyqtgraph's name
        """The view moved or was resized: lines drawn for the old layout are stale (rebuilt now if zoomed)."""
        layout = self.view_layout()
        if layout == self._layout:
            return
        was_zoomed = self._layout[3]
        self._layout = layout
        pixels = layout[2]
        for device, line in self.lines.items():
            if line.built_for is not None or len(line.x) > 2 * pixels or self.zoomed:
                self.stale[device] = None
        if self.zoomed or was_zoomed:  # the operator is looking (or just let go): follow the view now
            self.rebuild_stale(math.inf)
            self.update()

    def viewTransformChanged(self) -> None:  # noqa: N802 — pyqtgraph's name
        self.prepareGeometryChange()
        self._rect = None  # the pen's padding, in data units, changed
        self.viewRangeChanged()  # a resize changes the pixel width without changing the range

    def boundingRect(self) -> QRectF:  # noqa: N802 — Qt's name
        if self._rect is None:
            if self._bounds is None:
                self._rect = QRectF()
            else:
                x_lo, x_hi, y_lo, y_hi = self._bounds
                px, py = self.view.viewPixelSize()  # data units per pixel: pad by a few for the pens
                pad_x, pad_y = 3 * px, 3 * py
                self._rect = QRectF(x_lo - pad_x, y_lo - pad_y, x_hi - x_lo + 2 * pad_x, y_hi - y_lo + 2 * pad_y)
        return self._rect

    def dataBounds(self, ax: int, frac: float = 1.0, orthoRange=None) -> tuple[float, float] | None:  # noqa: N802
        """For the "A" button's auto-range: every line's finite extent on axis ``ax`` (0: x, 1: y)."""
        if self._bounds is None:
            return None
        return self._bounds[2 * ax], self._bounds[2 * ax + 1]

    def paint(self, painter: QPainter, *_args) -> None:
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        for line in self.lines.values():
            painter.setPen(line.pen)
            painter.drawPath(line.path)


class SeriesPlot:
    """One per-device metric: its plot widget and every device's line (:class:`LivePlots` ticks it)."""

    def __init__(self, model: DashboardModel, metric: str) -> None:
        attribute, title, ylabel = METRICS[metric]
        self.model, self.metric, self.attribute = model, metric, attribute
        self.widget = _plot_widget(title, ylabel, "step on the device (all rounds)")
        self.follow = Follow(self.widget, on_follow=self._following)
        self.lines = DeviceLines(self.follow.view)
        self.widget.addItem(self.lines)
        self.dirty: dict[str, None] = {}  # devices with new points, oldest first (a dict keeps the order)
        self.marks: list[pg.GraphicsObject] = []
        self.redraws = 0

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self.lines.stale)

    def mark(self, devices) -> None:
        for device in devices:
            self.dirty.setdefault(device, None)

    def _add_line(self, device: str) -> None:
        """The device's line, in its colour (its pen made once: thick for a small fleet, thin past it)."""
        lines = self.lines.lines
        if len(lines) == THICK_UP_TO:  # the fleet outgrew thick lines: thin the ones drawn so far
            for other in lines:
                self.lines.set_pen(other, pg.mkPen(self.model.colour(other), width=1))
        self.lines.add(device, pg.mkPen(self.model.colour(device), width=2 if len(lines) < THICK_UP_TO else 1))

    def _following(self, following: bool) -> None:
        """The operator zoomed or panned (False), or asked to follow again (True)."""
        self.lines.set_zoomed(not following)

    def redraw(self, budget_ms: float = BUDGET_MS) -> None:
        """New data into the marked devices' lines, oldest mark first, then stale lines, within the budget.

        Qt paints the plot once, in its next turn (the item asks for one repaint for the whole tick).
        """
        if not self.pending:
            return
        devices = self.model.state.devices
        deadline = time.perf_counter() + budget_ms / 1000.0
        moved = False
        for device in list(self.dirty):
            del self.dirty[device]
            view = devices.get(device)
            if view is not None:
                if device not in self.lines.lines:
                    self._add_line(device)
                x, y = getattr(view, self.attribute).view()
                bounds = self.lines.set_data(device, x, y)
                if self.follow.cover(bounds):
                    moved = True
                    break  # the range moved: every line and both axes repaint, the rest wait for the next tick
            if time.perf_counter() > deadline:
                break
        if not moved and time.perf_counter() < deadline:
            self.lines.rebuild_stale(deadline)
        self.lines.commit()
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
        for item in self.marks:
            self.widget.removeItem(item)
        self.marks.clear()
        self.lines.remove_all()
        self.dirty.clear()
        self.follow.reset()


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
    """One row naming each device in its colour, shared by the plots (and matching the plan view).

    One rich-text label for the whole row: a label per device cost ~0.4 ms each to make and
    show, ~10 ms for a fleet's legend in the frame it appeared (and again at each change).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(4, 0, 4, 0)
        self.label = QLabel()
        self.label.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.label)
        layout.addStretch(1)
        self._shown: tuple = ()
        self.entries: list[str] = []  # each named device's entry (rich text), in order

    def show_devices(self, entries: list[tuple[str, str, str]]) -> None:
        """``entries``: (device id, name, colour) in the order to show them."""
        key = (tuple(entries[:LEGEND_MAX]), len(entries))
        if key == self._shown:
            return
        self._shown = key
        self.entries = [f"<span style='color:{colour}; font-size:16px'>&#9632;</span>&nbsp;{html.escape(name)}"
                        for _device, name, colour in entries[:LEGEND_MAX]]
        more = [f"… and {len(entries) - LEGEND_MAX} more"] if len(entries) > LEGEND_MAX else []
        self.label.setText("&nbsp;&nbsp;&nbsp;&nbsp;".join(self.entries + more))


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
            while plot.pending:
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
        """The full series handed to the device's line (before clipping and decimation for the screen)."""
        line = self.series[metric].lines.lines.get(device)
        if line is None:
            return np.zeros(0), np.zeros(0)
        return line.x, line.y

    def drawn(self, device: str, metric: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """The points the device's line draws now (after clipping and decimation), read from its path."""
        line = self.series[metric].lines.lines.get(device)
        path = line.path if line is not None else QPainterPath()
        points = [path.elementAt(i) for i in range(path.elementCount())]
        return np.array([p.x for p in points]), np.array([p.y for p in points])

    def plotted_accuracy(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.accuracy.curve.xData, self.accuracy.curve.yData
        return (np.zeros(0), np.zeros(0)) if x is None else (np.asarray(x), np.asarray(y))

    def annotations(self) -> list[str]:
        """The texts drawn on the accuracy plot (lost devices, the last value), in order."""
        return self.accuracy.texts()
