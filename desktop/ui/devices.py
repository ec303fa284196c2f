"""The devices: one card per agent, "add by address", pairing by typing the agent's token.

A card shows what the operator needs to trust a device: its name and colour
(the plan's), whether it is simulated, where it is and how it was found, its
hardware and runtime, its *measured* profile with the date it was measured, its
status (seen, paired, profiling, receiving 43 %, training round 3, lost) and
its last error in plain words with what to do. Cards appear and disappear as
zeroconf sees agents come and go; a device that was paired stays (its
connection, not mDNS, says whether it is alive); a lost one turns red.
Cards refresh on a timer from the state mirror, and only the cards in view
(a card scrolled out of view, or hidden by the presenter layout, is filled when
it comes into view), so a hundred devices streaming steps cost a few label
updates a second, not a relayout of a hundred cards (~10 ms a refresh).
"""
from __future__ import annotations

import datetime as dt
import math
import time

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QFrame, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QScrollArea, QSizePolicy, QVBoxLayout, QWidget,
)

from desktop.engine.state import DeviceView
from desktop.ui.colours import DEFAULT_STATUS_COLOUR, SIMULATED_BADGE, STATUS_COLOURS
from desktop.ui.model import Changes, DashboardModel
from shared.protocol_limits import WS_PATH

REFRESH_MS = 250  # cards show step counts; four updates a second is plenty for a number
BUDGET_MS = 10.0  # a refresh fills cards for about this long, then leaves the rest for the next tick
CARDS_PER_TICK = 2  # cards created per refresh (one costs ~4 ms with its first show and layout)
CREATING_MS = 50  # ... and the refresh period while cards are still to be created (100 in ~2.5 s)
UNPAIRED = ("seen", "pairing")


def duration(seconds: float | None) -> str:
    """``95`` → ``"1 min 35 s"``; None → ``""``."""
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def status_text(view: DeviceView, local_steps: int, left_s: float | None = None) -> str:
    """The status line of a card, in words."""
    status = view.status
    if status == "seen":
        seen = "seen on the network (mDNS)" if view.via == "mdns" else "added by address"
        return f"{seen}: {view.detail}" if view.detail else seen
    if status == "receiving":
        pct = f" {view.fraction:.0%}" if view.fraction is not None else ""
        left = f", {duration(left_s)} left" if left_s is not None else ""
        return f"receiving{pct}{left}"
    if status == "training":
        steps = f" · step {view.step}/{local_steps}" if local_steps else f" · step {view.step}"
        return f"training round {view.round}{steps}"
    if status == "idle":
        return "idle: no block in this plan"
    if status == "lost":
        return f"LOST{': ' + view.detail if view.detail else ''}"
    if status == "error":
        return "error (below)" if view.error else "error"
    words = {"pairing": "pairing…", "profiling": "profiling…", "paired": "paired", "profiled": "profiled",
             "ready": "ready", "stopped": "stopped"}
    text = words.get(status, status)
    return f"{text}: {view.detail}" if view.detail and status not in ("ready", "paired", "pairing") else text


def error_text(view: DeviceView) -> str:
    """The device's last error and what to do, without the name and address its card already shows."""
    message = original = view.error or ""
    for prefix in (f"{view.name} ({view.address}): ", f"{view.name}: ", f"ws://{view.address}{WS_PATH}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    if message != original:
        message = message[:1].upper() + message[1:]
    return message + (f". {view.advice[:1].upper() + view.advice[1:]}." if view.advice else "")


def facts_text(view: DeviceView) -> str:
    """Hardware and runtime: from the measured profile's facts, else from what the agent advertised."""
    facts = view.profile.measurement.facts if view.profile and view.profile.measurement else None
    parts: list[str] = []
    if facts is not None:
        parts += [facts.system or view.arch or "", f"{facts.cores} cores", f"{facts.ram_bytes / 2**30:.1f} GiB RAM",
                  f"executorch {facts.executorch}"]
        if facts.cpu:
            parts.append(facts.cpu)
    else:
        parts += [view.arch or "", f"{view.cores} cores" if view.cores else "",
                  f"{view.memory_mb / 1024:.1f} GiB" if view.memory_mb else "", view.runtime or ""]
    return " · ".join(p for p in parts if p) or "hardware not known until it is paired"


def profile_text(view: DeviceView) -> tuple[str, str]:
    """(one line, a tooltip with the per-layer table) for the device's profile."""
    p = view.profile
    if p is None:
        return "not profiled yet", ""
    if p.measurement is not None:
        at = p.measurement.at
        try:
            when = dt.datetime.fromisoformat(at.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")
        except ValueError:
            when = at
        source = f"measured {when}" + (" (cached)" if view.profile_cached else "")
    else:
        source = "estimated (not measured)"
    bs = sum(p.layer_s_bs) / len(p.layer_s_bs)
    wide = sum(p.layer_s_wide) / len(p.layer_s_wide)
    line = (f"{source} · per layer {bs * 1000:.1f} ms at bs, {wide * 1000:.1f} ms at 2q·bs · head "
            f"{p.head_s * 1000:.1f} ms · memory {p.memory_bytes / 2**30:.1f} GiB · link "
            f"{p.link_bytes_per_s * 8 / 1e6:.0f} Mbit/s")
    rows = "".join(f"<tr><td>L{i}</td><td>{a * 1000:.2f}</td><td>{b * 1000:.2f}</td></tr>"
                   for i, (a, b) in enumerate(zip(p.layer_s_bs, p.layer_s_wide)))
    tip = (f"<b>{source}</b><table><tr><th>layer</th><th>ms at bs</th><th>ms at 2q·bs</th></tr>{rows}</table>"
           f"head {p.head_s * 1000:.2f} ms")
    return line, tip


class DeviceCard(QFrame):
    """One device's card."""

    pair_requested = Signal(str, str)  # device, token

    def __init__(self, device: str, colour: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.device = device
        self.colour = colour
        self.setObjectName("card")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)  # wrapped lines get room
        self.name = QLabel()
        self.name.setTextFormat(Qt.TextFormat.RichText)
        self.badge = QLabel()
        self.badge.setStyleSheet(f"background:{SIMULATED_BADGE[0]}; color:{SIMULATED_BADGE[1]}; border-radius:4px; "
                                 "padding:1px 6px; font-weight:bold")
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(8)
        self.where = QLabel()
        self.facts = QLabel()
        self.facts.setWordWrap(True)
        self.profile = QLabel()
        self.profile.setWordWrap(True)
        self.plan = QLabel()
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color:#a1120b")
        self.token = QLineEdit()
        self.token.setPlaceholderText("token the agent printed")
        self.pair_button = QPushButton("Pair")
        self.pair_button.clicked.connect(self._pair)
        self.token.returnPressed.connect(self._pair)
        for label in (self.where, self.facts, self.profile, self.plan):
            label.setStyleSheet("color:#5f6368")
        head = QHBoxLayout()
        head.addWidget(self.name, 1)
        head.addWidget(self.badge)
        self.pair_row = QWidget()
        pair = QHBoxLayout(self.pair_row)
        pair.setContentsMargins(0, 0, 0, 0)
        pair.addWidget(self.token, 1)
        pair.addWidget(self.pair_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(10, 6, 8, 6)
        layout.setSpacing(2)
        layout.addLayout(head)
        layout.addWidget(self.status)
        layout.addWidget(self.progress)
        layout.addWidget(self.where)
        layout.addWidget(self.facts)
        layout.addWidget(self.profile)
        layout.addWidget(self.plan)
        layout.addWidget(self.error)
        layout.addWidget(self.pair_row)

    def _pair(self) -> None:
        token = self.token.text().strip()
        if not token:
            self.error.setText("Type the pairing token the agent printed when it started, then press Pair.")
            self.error.show()
            return
        self.pair_requested.emit(self.device, token)

    def show_view(self, view: DeviceView, local_steps: int, left_s: float | None) -> None:
        """Fill the card from the device's state (only what changed is set: a hundred cards refresh often)."""
        bad = view.status in ("lost", "error")
        background, foreground = STATUS_COLOURS.get(view.status, DEFAULT_STATUS_COLOUR)
        border = "#a1120b" if bad else self.colour
        _style(self, f"QFrame#card {{ background:{background}; border:1px solid #dadce0; "
                     f"border-left:6px solid {border}; border-radius:6px; }}")
        _text(self.name, f"<span style='color:{self.colour}; font-size:15px'>&#9632;</span> "
                         f"<b style='font-size:13px'>{view.name}</b>")
        _text(self.badge, f"SIMULATED · {view.simulated}" if view.simulated else "")
        _visible(self.badge, bool(view.simulated))
        _text(self.status, status_text(view, local_steps, left_s))
        _style(self.status, f"color:{foreground}; font-weight:bold")
        receiving = view.status == "receiving" and view.fraction is not None
        _visible(self.progress, receiving)
        if receiving:
            self.progress.setValue(round(view.fraction * 1000))
        _text(self.where, f"{view.address} · {'found by mDNS' if view.via == 'mdns' else 'added by address'}")
        _text(self.facts, facts_text(view))
        line, tip = profile_text(view)
        _text(self.profile, line)
        if self.profile.toolTip() != tip:
            self.profile.setToolTip(tip)
        if view.block:
            share = f" · {view.share:.0%} of the link" if view.share is not None else ""
            predicted = f" · predicted round {view.predicted_round_s:.2f} s" if view.predicted_round_s else ""
            _text(self.plan, f"trains {view.block}{share}{predicted}")
        _visible(self.plan, bool(view.block))
        if view.error:
            _text(self.error, error_text(view))
        _visible(self.error, bool(view.error) or bool(self.error.text() and view.status in UNPAIRED))
        _visible(self.pair_row, view.status in UNPAIRED or (view.status == "error" and view.profile is None))
        self.pair_button.setEnabled(view.status != "pairing")


def _text(label: QLabel, text: str) -> None:
    if label.text() != text:
        label.setText(text)


def _style(widget: QWidget, sheet: str) -> None:
    if widget.styleSheet() != sheet:  # re-styling is the dearest thing a card does
        widget.setStyleSheet(sheet)


def _visible(widget: QWidget, visible: bool) -> None:
    if widget.isHidden() == visible:
        widget.setVisible(visible)


class DevicesPanel(QWidget):
    """The list of cards and the "add by address" row."""

    pair_requested = Signal(str, str)  # device, token
    add_requested = Signal(str)  # [TOKEN@]HOST:PORT as typed

    def __init__(self, model: DashboardModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.cards: dict[str, DeviceCard] = {}
        self._dirty: set[str] = set()
        self.address = QLineEdit()
        self.address.setPlaceholderText("add by address: host:port or TOKEN@host:port")
        self.add_button = QPushButton("Add")
        self.add_button.clicked.connect(self._add)
        self.address.returnPressed.connect(self._add)
        self.title = QLabel("<b>Devices</b>")
        add_row = QHBoxLayout()
        add_row.addWidget(self.address, 1)
        add_row.addWidget(self.add_button)
        self._list = QWidget()
        self._list_layout = QVBoxLayout(self._list)
        self._list_layout.setContentsMargins(0, 0, 0, 0)
        self._list_layout.setSpacing(6)
        self.empty = QLabel("Looking for agents on the network (mDNS)…\nStart one with: deftly-agent")
        self.empty.setStyleSheet("color:#5f6368")
        self._list_layout.addWidget(self.empty)
        self._list_layout.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidget(self._list)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addLayout(add_row)
        layout.addWidget(self.scroll, 1)
        self.scroll.verticalScrollBar().valueChanged.connect(lambda _value: self.refresh())  # cards come into view
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()

    def _add(self) -> None:
        text = self.address.text().strip()
        if text:
            self.add_requested.emit(text)

    def on_changes(self, changes: Changes) -> None:
        self._dirty |= changes.devices

    def visible_devices(self) -> list[str]:
        """Devices that get a card: every one but an unpaired one that mDNS no longer sees."""
        return [d for d, v in self.model.state.devices.items()
                if not (v.via == "mdns" and not v.seen_by_mdns and v.status in UNPAIRED)]

    def refresh(self, budget_ms: float = BUDGET_MS, everywhere: bool = False) -> None:
        """Bring the cards in line with the state: add, remove, and fill the ones that changed.

        A tick adds at most :data:`CARDS_PER_TICK` cards (and comes back sooner while more are
        to be made) and fills changed cards for about ``budget_ms``: a new card at once, others
        once they are in view (or ``everywhere``); the rest stay marked for a later tick, so a
        hundred devices appearing at once never freeze the window.
        """
        if not self._dirty:
            return
        deadline = time.perf_counter() + budget_ms / 1000.0
        state = self.model.state
        wanted = self.visible_devices()
        wanted_set = set(wanted)
        for device in list(self.cards):
            if device not in wanted_set:
                card = self.cards.pop(device)
                self._list_layout.removeWidget(card)
                card.deleteLater()
        added: set[str] = set()
        for device in wanted:
            if device not in self.cards:
                if len(added) == CARDS_PER_TICK:
                    self._dirty.add(device)
                    continue
                card = self.cards[device] = DeviceCard(device, self.model.colour(device))
                card.pair_requested.connect(self.pair_requested)
                self._list_layout.insertWidget(self._list_layout.count() - 1, card)
                added.add(device)
        for device in added:  # a new card is filled at once, whatever the budget: out of view, it may wait long
            self._dirty.discard(device)
            self.cards[device].show_view(state.devices[device], state.local_steps, self.model.transfer_left_s(device))
        for device in [d for d in self._dirty if d in self.cards]:
            card = self.cards[device]
            if not everywhere and card.visibleRegion().isEmpty():
                continue  # out of view: filled when it comes into view
            self._dirty.discard(device)
            card.show_view(state.devices[device], state.local_steps, self.model.transfer_left_s(device))
            if time.perf_counter() > deadline:
                break
        self._dirty &= wanted_set  # a device without a card (gone from mDNS, never paired) waits for none
        interval = CREATING_MS if len(self.cards) < len(wanted) else REFRESH_MS
        if self.timer.interval() != interval:  # (setting it restarts the timer)
            self.timer.setInterval(interval)
        self.empty.setVisible(not self.cards)
        paired = sum(v.status not in UNPAIRED for v in state.devices.values())
        _text(self.title, f"<b>Devices</b> ({len(self.cards)} shown, {paired} paired)")

    def refresh_all(self) -> None:
        """Every card up to date now (a screenshot, a test's end state)."""
        self._dirty |= set(self.model.state.devices)
        while self._dirty:
            self.refresh(budget_ms=math.inf, everywhere=True)
