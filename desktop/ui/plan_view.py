"""The plan: the model's layers as a stack coloured by the device that trains each block, and its numbers.

* :class:`LayerStack` paints the decoder layers bottom (embeddings) to top (LM
  head): frozen layers grey, each trained block in its device's colour with
  the device's name; after a re-plan the plan before it is drawn narrow and
  faded on the left, so the audience sees what moved.
* :class:`BaselineBars` puts the plan's predicted round time beside the
  baselines' (the planner scores them with the same cost model).
* :class:`PlanPanel` holds both, a table per device (block, link share,
  predicted compute / communication / round seconds, and after each round the
  measured round seconds beside them) and a line saying why this plan was made.
"""
from __future__ import annotations

import math

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QPainter, QPen
from PySide6.QtWidgets import (
    QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QSizePolicy, QTableWidget, QTableWidgetItem, QVBoxLayout,
    QWidget,
)

from desktop.engine.events import PlanView
from desktop.ui.model import Changes, DashboardModel

FROZEN = "#dadce0"  # a frozen layer
BASELINE_NAMES = {
    "equal_bandwidth": "same blocks, equal link shares",
    "random": "random blocks, equal shares",
    "fastest_first": "fastest device first",
    "memory_proportional": "layers by memory (exo)",
    "lowest_throughput_window": "arrival order (Petals)",
    "all_on_fastest": "all on the fastest device",
}
TABLE_COLUMNS = ("device", "block", "link share", "compute s", "comm s", "round s", "measured s", "memory", "profile")


def spread_labels(centres: list[float], line: float, top: float, bottom: float) -> list[float]:
    """Top edges of labels ``line`` high, each as near its centre as the others allow, none overlapping.

    A one-layer block is a few pixels high, shorter than its label: labels of neighbouring
    one-layer blocks would print over each other.  They are pushed apart downwards in the
    order of their centres, then back up where the column ran past ``bottom``, never above
    ``top`` (labels that cannot all fit run past the bottom instead).
    """
    order = sorted(range(len(centres)), key=lambda i: centres[i])
    tops = [0.0] * len(centres)
    edge = top
    for i in order:  # down: each below the one before
        tops[i] = max(centres[i] - line / 2, edge)
        edge = tops[i] + line
    edge = bottom
    for i in reversed(order):  # up: each above the one after, within the bottom
        tops[i] = min(tops[i], edge - line)
        edge = tops[i]
    edge = top
    for i in order:  # too many to fit: none above the top
        tops[i] = max(tops[i], edge)
        edge = tops[i] + line
    return tops


def _layer_count(plan: PlanView) -> int:
    deepest = max((a.last_layer for a in plan.active() if a.last_layer is not None), default=-1)
    return max(plan.layers, deepest + 1)


class LayerStack(QWidget):
    """The layers of the current plan (and, faded, of the plan it replaced)."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.setMinimumSize(220, 260)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)

    def layer_devices(self, plan: PlanView | None = None) -> list[list[str]]:
        """Per layer (0 first), the devices that train it: one, several (a block's replicas), or none (frozen)."""
        plan = plan or self.model.state.plan
        if plan is None:
            return []
        devices: list[list[str]] = [[] for _ in range(_layer_count(plan))]
        for a in plan.active():
            for layer in range(a.first_layer, a.last_layer + 1):
                devices[layer].append(a.device)
        return devices

    def layer_colours(self, plan: PlanView | None = None) -> list[str | None]:
        """Per layer (0 first), the colour it is painted: its (first) device's, or None for a frozen layer."""
        return [self.model.colour(d[0]) if d else None for d in self.layer_devices(plan)]

    def stack_rect(self) -> QRectF:
        """Where the current plan's stack is drawn (the previous plan's, if any, is left of it)."""
        left = 56.0 if len(self.model.state.plans) > 1 else 8.0
        return QRectF(left, 26.0, min(110.0, max(60.0, self.width() * 0.25)), self.height() - 52.0)

    def layer_rect(self, layer: int) -> QRectF:
        """The band of the current stack that paints ``layer`` (0 = the bottom, next to the embeddings)."""
        stack, n = self.stack_rect(), len(self.layer_devices())
        h = stack.height() / max(n, 1)
        return QRectF(stack.left(), stack.bottom() - (layer + 1) * h, stack.width(), h)

    def paintEvent(self, _event) -> None:  # noqa: N802 — Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        state = self.model.state
        if state.plan is None:
            painter.setPen(QColor("#5f6368"))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                             "No plan yet.\nPair and profile devices, then plan.")
            return
        stack = self.stack_rect()
        if len(state.plans) > 1:
            before = QRectF(8.0, stack.top(), 34.0, stack.height())
            self._paint_stack(painter, state.plans[-2], before, faded=True, labels=False)
            painter.setPen(QColor("#5f6368"))
            painter.drawText(QRectF(0, stack.bottom() + 2, 60, 20), Qt.AlignmentFlag.AlignLeft, "before")
        self._paint_stack(painter, state.plan, stack, faded=False, labels=True)
        painter.setPen(QColor("#5f6368"))
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, self.font().pointSizeF() - 1))
        painter.setFont(small)
        painter.drawText(QRectF(stack.left(), 4, stack.width(), 20), Qt.AlignmentFlag.AlignCenter, "LM head")
        painter.drawText(QRectF(stack.left(), stack.bottom() + 4, stack.width(), 20), Qt.AlignmentFlag.AlignCenter,
                         "embeddings")

    def _paint_stack(self, painter: QPainter, plan: PlanView, rect: QRectF, *, faded: bool, labels: bool) -> None:
        layers = self.layer_devices(plan)
        n = len(layers)
        if not n:
            return
        h = rect.height() / n
        gap = 1.0 if h > 4 else 0.0
        for layer, devices in enumerate(layers):
            y = rect.bottom() - (layer + 1) * h
            colours = [self.model.colour(d) for d in devices] or [FROZEN]
            w = rect.width() / len(colours)  # a block's replicas share its band, side by side
            for i, colour in enumerate(colours):
                fill = QColor(colour)
                if faded:
                    fill.setAlpha(90)
                painter.fillRect(QRectF(rect.left() + i * w, y + gap / 2, w, h - gap), fill)
        if not labels:
            return
        painter.setPen(QPen(QColor("#202124")))
        text_x = rect.right() + 8
        trained = plan.active()
        first_trained = min((a.first_layer for a in trained), default=n)
        if first_trained > 0:
            y0 = rect.bottom() - first_trained * h
            painter.setPen(QColor("#5f6368"))
            painter.drawText(QRectF(text_x, y0, self.width() - text_x, first_trained * h),
                             Qt.AlignmentFlag.AlignVCenter, f"L0-{first_trained - 1} frozen")
        blocks: dict[tuple[int, int], list] = {}
        for a in trained:
            blocks.setdefault((a.first_layer, a.last_layer), []).append(a)
        bold = QFont(self.font())
        bold.setBold(True)
        line = QFontMetricsF(bold).height() + 1
        spans = {key: (rect.bottom() - (key[1] + 1) * h, (key[1] - key[0] + 1) * h) for key in blocks}
        tops = spread_labels([y + span / 2 for y, span in spans.values()], line, 0.0, float(self.height()))
        for ((first, last), replicas), label_top in zip(blocks.items(), tops):
            y, span = spans[(first, last)]
            painter.setPen(QPen(QColor("#202124"), 1))
            painter.drawRect(QRectF(rect.left(), y, rect.width(), span))
            colour = QColor(self.model.colour(replicas[0].device))
            if abs(label_top + line / 2 - (y + span / 2)) > 1:  # moved off its block: a leader line to it
                painter.setPen(QPen(colour, 1))
                painter.drawLine(QPointF(rect.right() + 1, y + span / 2), QPointF(text_x - 2, label_top + line / 2))
            painter.setPen(colour)
            painter.setFont(bold)
            names = " + ".join(a.name for a in replicas)
            each = " each" if len(replicas) > 1 else ""
            painter.drawText(QRectF(text_x, label_top, self.width() - text_x, line),
                             Qt.AlignmentFlag.AlignVCenter,
                             f"{replicas[0].block} {names} · {replicas[0].share:.0%} link{each}")
            painter.setFont(self.font())


class BaselineBars(QWidget):
    """The plan's predicted round seconds beside each baseline's, as bars (shorter is better)."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.setMinimumHeight(150)

    def rows(self) -> list[tuple[str, float | None]]:
        plan = self.model.state.plan
        if plan is None:
            return []
        rows: list[tuple[str, float | None]] = [("this plan", plan.round_s)]
        rows += [(BASELINE_NAMES.get(k, k.replace("_", " ")), v) for k, v in plan.baselines.items()]
        return rows

    def paintEvent(self, _event) -> None:  # noqa: N802
        rows = self.rows()
        if not rows:
            return
        painter = QPainter(self)
        finite = [v for _n, v in rows if v is not None and math.isfinite(v)]
        longest = max(finite, default=1.0) or 1.0
        label_w = max(painter.fontMetrics().horizontalAdvance(name) for name, _v in rows) + 12.0
        row_h = min(22.0, (self.height() - 20) / len(rows))
        painter.setPen(QColor("#202124"))
        painter.drawText(QRectF(0, 0, self.width(), 18), Qt.AlignmentFlag.AlignLeft,
                         "Predicted round time (s), same cost model")
        for i, (name, value) in enumerate(rows):
            y = 20 + i * row_h
            painter.setPen(QColor("#202124"))
            painter.drawText(QRectF(0, y, label_w - 6, row_h), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                             name)
            if value is None or not math.isfinite(value):
                painter.setPen(QColor("#5f6368"))
                painter.drawText(QRectF(label_w, y, 200, row_h), Qt.AlignmentFlag.AlignVCenter,
                                 "does not fit in memory")
                continue
            bar_w = (self.width() - label_w - 70) * value / longest
            colour = QColor("#0b5d2a") if i == 0 else QColor("#9aa0a6")
            painter.fillRect(QRectF(label_w, y + 3, max(bar_w, 1.0), row_h - 6), colour)
            painter.drawText(QRectF(label_w + bar_w + 4, y, 70, row_h), Qt.AlignmentFlag.AlignVCenter, f"{value:.2f}")


class PlanPanel(QWidget):
    """The plan view: why it was made, the layer stack, the per-device table, the baselines."""

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.reason = QLabel("No plan yet.")
        self.reason.setWordWrap(True)
        self.reason.setTextFormat(Qt.TextFormat.RichText)
        self.stack = LayerStack(model)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(TABLE_COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.baselines = BaselineBars(model)
        right = QVBoxLayout()
        right.addWidget(self.reason)
        right.addWidget(self.table, 1)
        right.addWidget(self.baselines)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.stack.setMinimumWidth(320)
        layout.addWidget(self.stack, 0)
        layout.addLayout(right, 1)

    def on_changes(self, changes: Changes) -> None:
        if changes.plan:
            self.refresh()

    def refresh(self) -> None:
        state = self.model.state
        plan = state.plan
        if plan is None:
            self.reason.setText("No plan yet.")
            self.table.setRowCount(0)
            self.stack.update()
            self.baselines.update()
            return
        policy = "CRUNCH blocks + bandwidth split" if plan.policy == "planned" else "equal shares, random blocks"
        if len(state.plans) > 1:
            head = (f"<b style='color:#a1120b'>Re-planned from round {plan.first_round}: {plan.reason}.</b> "
                    f"({len(state.plans)} plans so far)")
        else:
            head = f"<b>Plan from round {plan.first_round}</b> ({plan.reason})"
        self.reason.setText(f"{head}<br>{policy}: predicted round {plan.round_s:.2f} s; planner took "
                            f"{plan.planner_s * 1000:.0f} ms")
        rows = list(plan.active()) + [a for a in plan.assignments if a.block is None]
        self.table.setRowCount(len(rows))
        for r, a in enumerate(rows):
            view = state.devices.get(a.device)
            measured = None
            if view is not None and view.measured_round_s:
                last = max(view.measured_round_s)
                predicted = view.round_predicted_s.get(last)
                measured = (f"{view.measured_round_s[last]:.2f} (round {last}"
                            + (f", predicted {predicted:.2f})" if predicted is not None else ")"))
            lost = view is not None and view.status == "lost"
            memory = f"{a.memory_bytes / 2**30:.2f} / {a.memory_limit_bytes / 2**30:.1f} GiB" if a.block else "-"
            cells = (a.name + (" (lost)" if lost else ""), a.block or "idle",
                     f"{a.share:.0%}" if a.block else "-", _s(a.compute_s, a.block), _s(a.comm_s, a.block),
                     _s(a.round_s, a.block), measured or "-", memory, a.profile)
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    item.setForeground(QColor("#a1120b" if lost else self.model.colour(a.device)))
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                self.table.setItem(r, c, item)
        self.stack.update()
        self.baselines.update()


def _s(value: float, block: str | None) -> str:
    return f"{value:.2f}" if block else "-"
