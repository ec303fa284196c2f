"""The Qt binding the dashboard is pinned to does not corrupt the interpreter.

PySide6 6.12.0's ``Signal.emit`` dropped one reference to ``True`` on every emit,
so a window that emits a few thousand signals (pyqtgraph emits several per
redraw) died with "Fatal Python error: bool_dealloc". pyproject.toml pins a
release without that bug; this test fails on one that has it.
"""
from __future__ import annotations

import sys

from PySide6.QtCore import QObject, Signal


class _Emitter(QObject):
    plain = Signal()
    carrying = Signal(object)


def test_emitting_signals_leaves_the_interpreters_booleans_alone(qapp) -> None:
    emitter = _Emitter()
    received = []
    emitter.plain.connect(lambda: received.append(None))
    emitter.carrying.connect(received.append)
    before = sys.getrefcount(True), sys.getrefcount(False)
    for i in range(500):  # 1000 emits: enough to see a leak, too few to crash the session on one
        emitter.plain.emit()
        emitter.carrying.emit(i)
    after = sys.getrefcount(True), sys.getrefcount(False)
    assert len(received) == 1000
    assert abs(after[0] - before[0]) < 50 and abs(after[1] - before[1]) < 50, (before, after)
