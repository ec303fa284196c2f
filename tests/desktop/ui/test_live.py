"""The live plots: one plot redrawn per tick, in turn; how a curve downsamples while following and zoomed.

Real window offscreen, the engine's own event records.
"""
from __future__ import annotations

import numpy as np

from desktop.engine.events import DeviceSeen, DeviceStatus, StepReceived
from shared.events import Step


def stream(window, devices: int, steps: int) -> list[str]:
    """``devices`` devices with ``steps`` steps each, into the window's model (nothing drawn yet)."""
    ids = [f"dev-{i}" for i in range(devices)]
    events = []
    for i, device in enumerate(ids):
        events += [DeviceSeen(device, f"sim-{i}", f"10.0.0.{i}:8765", "address"),
                   DeviceStatus(device, "training", round=1)]
    events += [StepReceived(Step(n, 0.7 - 0.001 * n + 0.01 * i, 0.01, 0.1, 32, 300.0, 0.1, device=device, round=1))
               for n in range(1, steps + 1) for i, device in enumerate(ids)]
    window.live.timer.stop()  # the test turns the ticks itself
    window.apply_events(events)
    return ids


def test_a_tick_redraws_one_plot_and_the_next_tick_the_next(window) -> None:
    stream(window, devices=3, steps=5)
    series = window.live.series
    assert all(plot.pending for plot in series.values())
    redrawn = []  # per tick: the plots it redrew
    for _ in range(30):
        if not any(plot.pending for plot in series.values()):
            break
        before = {metric: plot.redraws for metric, plot in series.items()}
        window.live._tick()
        redrawn.append([metric for metric, plot in series.items() if plot.redraws != before[metric]])
    assert not any(plot.pending for plot in series.values())
    assert all(len(plots) == 1 for plots in redrawn)  # one plot per tick, never two
    assert [plots[0] for plots in redrawn[:3]] == ["loss", "step_s", "rss_mb"]  # in turn
    drawn = [plot.redraws for plot in series.values()]
    window.live._tick()  # nothing new: nothing redrawn
    assert [plot.redraws for plot in series.values()] == drawn
    for i, device in enumerate(window.model.state.devices):
        assert list(window.live.plotted(device)[1]) == [0.7 - 0.001 * n + 0.01 * i for n in range(1, 6)]


def test_a_following_plot_downsamples_by_its_width_and_a_zoomed_one_by_pyqtgraph(window, qtbot) -> None:
    ids = stream(window, devices=2, steps=3000)
    plot = window.live.series["loss"]
    qtbot.waitUntil(lambda: plot.follow.view.width() > 100)  # laid out
    window.live.redraw()
    curve = plot.curves[ids[0]]
    pixels = int(plot.follow.view.width())
    assert 3000 > pixels  # more points than pixels: a factor above 1
    assert curve.opts["downsample"] == 3000 // pixels and not curve.opts["autoDownsample"]
    assert not curve.opts["clipToView"] and curve.opts["dynamicRangeLimit"] is None
    x, y = window.live.plotted(ids[0])
    assert len(y) == 3000  # the curve holds every point; only the screen gets fewer
    # the operator zooms in: pyqtgraph's view-dependent display takes over, for every curve
    plot.follow.view.setXRange(100, 200)
    plot.follow.view.sigRangeChangedManually.emit([True, False])
    assert not plot.follow.following
    assert all(c.opts["autoDownsample"] and c.opts["clipToView"] and c.opts["dynamicRangeLimit"] == 1e6
               for c in plot.curves.values())
    # ... and the "A" button: following again, the plot's own factor again
    plot.follow.view.enableAutoRange()
    window.apply_events([StepReceived(Step(3001, 0.5, 0.01, 0.1, 32, 300.0, 0.1, device=ids[0], round=1))])
    window.live.redraw()
    assert plot.follow.following and not curve.opts["autoDownsample"] and not curve.opts["clipToView"]
    assert np.asarray(window.live.plotted(ids[0])[1])[-1] == 0.5
