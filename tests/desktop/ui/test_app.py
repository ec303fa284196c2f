"""Starting and closing the dashboard: a close waits for the engine without freezing; the end state as a PNG."""
from __future__ import annotations

from PySide6.QtGui import QImage

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.ui.app import Dashboard, render_end_state
from tests.desktop.ui.test_replay import recorded_run


def test_closing_the_window_closes_the_engine_first_then_the_window(qtbot, tmp_path) -> None:
    config = EngineConfig(job=JobSpec(), out=tmp_path / "run", discover=True, mdns_interfaces=("127.0.0.1",),
                          cache_dir=tmp_path / "cache")
    dashboard = Dashboard(lambda: Engine(config), lambda _choice, _paired: config)
    qtbot.addWidget(dashboard.window)
    dashboard.window.show()
    dashboard.start(lobby=True)  # a real zeroconf browser on 127.0.0.1
    qtbot.waitUntil(lambda: dashboard.window.model.state.phase == "discovering")
    # execute: the operator closes the window
    dashboard.window.close()
    # assert: the window stays until the engine has let go, then goes; the engine's thread is over
    qtbot.waitUntil(lambda: not dashboard.bridge.running, timeout=30_000)
    qtbot.waitUntil(lambda: not dashboard.window.isVisible())


def test_the_end_state_of_a_recorded_run_is_drawn_to_a_png(qapp, tmp_path) -> None:
    recorded_run(tmp_path / "run")
    png = render_end_state(tmp_path / "run", tmp_path / "run" / "dashboard.png", size=(1400, 900))
    image = QImage(str(png))
    assert (image.width(), image.height()) == (1400, 900)
    colours = {image.pixelColor(x, y).name() for x in range(0, 1400, 7) for y in range(0, 900, 7)}
    assert len(colours) > 20  # cards, the stack, the curves: not a blank window
