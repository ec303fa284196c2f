"""The window as a view: engine events in, the cards, the plan, the plots and the status bar out.

The events are the engine's own records (the plan is made by the engine's planning
on lab3's profiles); the window is real, offscreen. Tests with real agents are in
test_dashboard.py.
"""
from __future__ import annotations

import numpy as np
from PySide6.QtGui import QColor

from desktop.engine.events import DeviceError, DeviceLost, DeviceStatus, PlanMade, RoundMerged, RoundStarted, StepReceived
from shared.events import Round, Step
from tests.desktop.ui.conftest import LAB, lab_plan


def step(device_name: str, n: int, loss: float, round_: int = 1) -> StepReceived:
    return StepReceived(Step(n, loss, 0.01, 0.2 + 0.01 * n, 32, 300.0 + n, 0.1, device=device_name, round=round_))


def test_a_plan_paints_each_block_in_the_colour_of_the_device_that_trains_it(window, lab_events, qtbot) -> None:
    window.apply_events(lab_events)
    plan = window.model.state.plan
    stack = window.plan.stack
    colours = stack.layer_colours()
    # Every layer of a block is its device's colour; the layers below the trainable ones are frozen.
    assert len(colours) == 30 and colours[:22] == [None] * 22
    for a in plan.active():
        assert colours[a.first_layer:a.last_layer + 1] == [window.model.colour(a.device)] * (a.last_layer - a.first_layer + 1)
    assert len({colours[a.first_layer] for a in plan.active()}) == len(plan.active())  # one colour per device
    # ... and that is what is painted: sample the middle of each block on the rendered widget.
    qtbot.waitUntil(lambda: stack.height() > 200)  # laid out
    image = stack.grab().toImage()

    def painted(layer: int) -> str:
        return image.pixelColor(stack.layer_rect(layer).center().toPoint()).name()

    for a in plan.active():
        for layer in (a.first_layer, a.last_layer):
            assert painted(layer) == QColor(window.model.colour(a.device)).name()
    assert painted(4) == "#dadce0"  # a frozen layer is grey
    # The table names every device; the legend over the plots names them in the same colours.
    names = {window.plan.table.item(r, 0).text() for r in range(window.plan.table.rowCount())}
    assert names == {name for name, _cls in LAB.values()}
    qtbot.waitUntil(lambda: len(window.live.legend.entries) == 3)
    for entry, a in zip(window.live.legend.entries, plan.active()):
        assert window.model.colour(a.device) in entry and a.name in entry
    assert window.live.legend.label.text() == "&nbsp;&nbsp;&nbsp;&nbsp;".join(window.live.legend.entries)


def test_steps_reach_the_plots_exactly_as_sent_and_the_cards_say_the_round(window, lab_events, qtbot) -> None:
    window.apply_events(lab_events + [RoundStarted(1, list(LAB))])
    sent: dict[str, list[float]] = {d: [] for d in LAB}
    rng = np.random.default_rng(0)
    for n in range(1, 41):
        batch = []
        for device, (name, _cls) in LAB.items():
            loss = float(0.7 - 0.002 * n + 0.01 * rng.standard_normal())
            sent[device].append(loss)
            batch.append(step(name, n, loss))
        window.apply_events(batch)
    window.apply_events([DeviceStatus("id-pi4", "training", round=1)])
    for device in LAB:
        qtbot.waitUntil(lambda d=device: len(window.live.plotted(d)[1]) == 40)
        x, y = window.live.plotted(device)
        assert x.tolist() == list(range(1, 41)) and y.tolist() == sent[device]
        qtbot.waitUntil(lambda d=device: len(window.live.plotted(d, "step_s")[1]) == 40)
        latency = window.live.plotted(device, "step_s")[1]
        assert np.allclose(latency, [0.2 + 0.01 * n for n in range(1, 41)])
    qtbot.waitUntil(lambda: "id-pi4" in window.devices.cards)
    qtbot.waitUntil(lambda: "training round 1" in window.devices.cards["id-pi4"].status.text())


def test_a_lost_device_turns_red_and_the_plan_view_shows_the_replan(window, lab_events, qtbot) -> None:
    window.apply_events(lab_events + [RoundStarted(1, list(LAB)), step("phone", 1, 0.7)])
    qtbot.waitUntil(lambda: "id-phone" in window.devices.cards)
    window.apply_events([DeviceLost("id-phone", 1, "its connection was down for more than 30 s"),
                         RoundMerged(Round(1, 0.78, 200, 12.0, {"pi4": 6.1, "laptop": 5.0}, {"pi4": 6.0}, ["phone"])),
                         PlanMade(lab_plan({"id-pi4": "pi4", "id-laptop": "laptop"}, 2, "phone lost"))])
    card = window.devices.cards["id-phone"]
    qtbot.waitUntil(lambda: "LOST" in card.status.text())
    assert "#a1120b" in card.styleSheet()  # the red border of a lost device
    assert "Re-planned from round 2" in window.plan.reason.text()
    colours = window.plan.stack.layer_colours()
    assert window.model.colour("id-phone") not in colours  # its layers went to the others
    assert "phone" in window.status_error.text() and "lost" in window.status_error.text()
    qtbot.waitUntil(lambda: window.live.annotations() == ["phone lost: re-planned", "0.780"])


def test_errors_are_plain_words_on_the_card_and_in_the_status_bar(window, lab_events, qtbot) -> None:
    window.apply_events(lab_events)
    qtbot.waitUntil(lambda: "id-pi4" in window.devices.cards)
    window.apply_events([DeviceError("id-pi4", "pi4: the program does not fit its memory", "it is left out"),
                         DeviceStatus("id-pi4", "error", "does not fit")])
    card = window.devices.cards["id-pi4"]
    qtbot.waitUntil(lambda: "does not fit its memory" in card.error.text())
    assert card.error.text() == "The program does not fit its memory. It is left out."  # its name is on the card
    assert "does not fit its memory" in window.status_error.text()
    window.call_failed("start the run", "--rounds must be at least 1, got 0", "")
    assert "--rounds must be at least 1" in window.status_error.text()
    assert window.start_button.isEnabled()  # refused before it began: the operator may fix it and retry


def test_the_presenter_layout_hides_the_controls_and_escape_brings_them_back(window, lab_events, qtbot) -> None:
    window.apply_events(lab_events)
    window.enter_presenter()
    qtbot.waitUntil(lambda: not window.left.isVisible())
    assert window.live.isVisible() and window.plan.stack.isVisible() and not window.plan.table.isVisible()
    window.leave_presenter()
    qtbot.waitUntil(lambda: window.left.isVisible())
    assert window.plan.table.isVisible()


def test_a_blocks_replicas_share_its_band_side_by_side(window, lab_events, qtbot) -> None:
    from dataclasses import replace

    window.apply_events(lab_events)
    plan = window.model.state.plan
    laptop = next(a for a in plan.active() if a.device == "id-laptop")
    pi = next(a for a in plan.assignments if a.device == "id-pi4")
    replicated = replace(plan, assignments=tuple(
        replace(a, block=laptop.block, first_layer=laptop.first_layer, last_layer=laptop.last_layer,
                offset=laptop.offset, size=laptop.size) if a is pi else a for a in plan.assignments))
    window.apply_events([PlanMade(replicated)])
    stack = window.plan.stack
    order = [a.device for a in replicated.active() if a.first_layer == laptop.first_layer]
    assert sorted(order) == ["id-laptop", "id-pi4"] and stack.layer_devices()[laptop.first_layer] == order
    qtbot.waitUntil(lambda: stack.height() > 200)
    image = stack.grab().toImage()
    band = stack.layer_rect(laptop.first_layer)
    left = image.pixelColor(int(band.left() + band.width() / 4), int(band.center().y())).name()
    right = image.pixelColor(int(band.left() + 3 * band.width() / 4), int(band.center().y())).name()
    assert (left, right) == tuple(QColor(window.model.colour(d)).name() for d in order)


def test_export_progress_shows_with_time_left_while_devices_are_found_and_goes_when_the_exporter_is_done(qtbot) -> None:
    from desktop.engine.events import ExportUpdate, PhaseChanged
    from export.progress import ExportProgress
    from desktop.ui.model import DashboardModel
    from desktop.ui.progress import EXPORT_QUIET_S
    from desktop.ui.window import MainWindow

    now = [100.0]
    window = MainWindow(DashboardModel(clock=lambda: now[0]))
    qtbot.addWidget(window)
    window.show()
    window.apply_events([PhaseChanged("discovering"), ExportUpdate(ExportProgress(
        "lower", "running", 0.4, 65.0, 97.0, "lowering step of block L22-24", program="L22-24", method="step"))])
    bar = window.export
    assert bar.isVisible() and "Exporting: lowering step of block L22-24 — 40%" in bar.label.text()
    assert "1 min 05 s so far, about 1 min 37 s left" in bar.label.text() and bar.bar.value() == 400
    now[0] += EXPORT_QUIET_S + 1  # the exporter went quiet: its programs are done
    qtbot.waitUntil(lambda: not bar.isVisible(), timeout=5_000)


def test_after_a_round_the_plan_table_shows_each_devices_measured_round_beside_its_prediction(
        window, lab_events, qtbot) -> None:
    # the Round line alone, as a replay of metrics.jsonl has it: devices named as the plan names them
    names = [name for name, _cls in LAB.values()]
    measured = {name: 20.0 + i for i, name in enumerate(names)}
    window.apply_events(lab_events + [RoundMerged(Round(1, 0.8, 200, 30.0, measured, {names[0]: 19.5}, []))])
    column = [window.plan.table.horizontalHeaderItem(c).text() for c in range(window.plan.table.columnCount())].index(
        "measured s")

    def cell(name: str) -> str:
        row = next(r for r in range(window.plan.table.rowCount()) if window.plan.table.item(r, 0).text() == name)
        return window.plan.table.item(row, column).text()

    qtbot.waitUntil(lambda: cell(names[0]) != "-")
    assert cell(names[0]) == "20.00 (round 1, predicted 19.50)"
    assert cell(names[1]) == "21.00 (round 1)"


def test_block_labels_never_print_over_each_other() -> None:
    from desktop.ui.plan_view import spread_labels

    line = 16.0
    # three one-layer blocks 8 px apart (the demo's L28, L29 on a 30-layer stack): pushed apart
    tops = spread_labels([100.0, 92.0, 300.0], line, 0.0, 400.0)
    ordered = sorted(tops)
    assert all(b - a >= line for a, b in zip(ordered, ordered[1:]))
    assert tops[2] == 300.0 - line / 2  # a label with room stays centred on its block
    assert abs((tops[0] + tops[1]) / 2 + line / 2 - 96.0) <= line / 2  # the pair stays about its blocks
    # at the bottom edge the column is pulled back up, at the top it is never above it
    near_bottom = spread_labels([395.0, 398.0], line, 0.0, 400.0)
    assert max(near_bottom) + line <= 400.0 and abs(near_bottom[0] - near_bottom[1]) >= line
    assert min(spread_labels([1.0, 2.0, 3.0], line, 0.0, 400.0)) >= 0.0
    assert spread_labels([50.0], line, 0.0, 400.0) == [42.0]
