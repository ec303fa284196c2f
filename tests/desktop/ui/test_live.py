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


def test_a_following_plot_draws_two_points_a_pixel_and_a_zoomed_one_clips_to_its_view(window, qtbot) -> None:
    ids = stream(window, devices=2, steps=3000)
    spike = StepReceived(Step(3001, 9.0, 0.01, 0.1, 32, 300.0, 0.1, device=ids[0], round=1))
    window.apply_events([spike] + [StepReceived(Step(n, 0.6, 0.01, 0.1, 32, 300.0, 0.1, device=ids[0], round=1))
                                   for n in range(3002, 3010)])
    plot = window.live.series["loss"]
    qtbot.waitUntil(lambda: plot.follow.view.width() > 100)  # laid out
    window.live.redraw()
    x, y = window.live.plotted(ids[0])
    assert len(y) == 3009 and y[3000] == 9.0  # the line holds every point; only the screen gets fewer
    x_lo, x_hi, pixels, zoomed = plot.lines.view_layout()
    assert not zoomed and 3009 > 2 * pixels
    shown_x, shown_y = window.live.drawn(ids[0])
    assert len(shown_x) <= 2 * pixels + 2  # two points per pixel column at most
    assert set(zip(shown_x, shown_y)) <= set(zip(x, y))  # points of the series, none made up
    assert (3001.0, 9.0) in set(zip(shown_x, shown_y))  # the spike is drawn
    column = np.floor((x - x_lo) / ((x_hi - x_lo) / pixels))
    for c in np.unique(column):  # every pixel column shows its lowest and highest loss
        assert {y[column == c].min(), y[column == c].max()} <= set(shown_y[np.isin(shown_x, x[column == c])])
    # the operator zooms in: each line is clipped to the view (and a point either side)
    plot.follow.view.setXRange(100, 200, padding=0)
    plot.follow.view.sigRangeChangedManually.emit([True, False])
    assert not plot.follow.following and plot.lines.zoomed
    for device in ids:
        shown_x, _ = window.live.drawn(device)
        assert shown_x.tolist() == list(np.arange(99.0, 202.0))
    # ... and the "A" button: following again, the whole line again
    plot.follow.view.enableAutoRange()
    window.apply_events([StepReceived(Step(3010, 0.5, 0.01, 0.1, 32, 300.0, 0.1, device=ids[0], round=1))])
    window.live.redraw()
    assert plot.follow.following and not plot.lines.zoomed
    assert window.live.plotted(ids[0])[1][-1] == 0.5
    shown_x, shown_y = window.live.drawn(ids[0])
    assert shown_x[0] == 1.0 and (shown_x[-1], shown_y[-1]) == (3010.0, 0.5)
    shown_x, _ = window.live.drawn(ids[1])  # no new point, but no longer clipped either
    assert shown_x[0] == 1.0 and shown_x[-1] == 3000.0 and len(shown_x) <= 2 * pixels + 2
