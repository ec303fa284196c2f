"""The cards: a hundred devices streaming steps refresh only the cards in view; the rest catch up in view."""
from __future__ import annotations

from desktop.engine.events import DeviceSeen, DeviceStatus, StepReceived
from shared.events import Step


def test_cards_out_of_view_wait_and_are_filled_once_scrolled_into_view(window, qtbot) -> None:
    ids = [f"dev-{i:02d}" for i in range(30)]
    window.apply_events([e for i, d in enumerate(ids) for e in (
        DeviceSeen(d, f"sim-{i:02d}", f"10.0.0.{i}:8765", "address"), DeviceStatus(d, "training", round=1))])
    panel = window.devices
    panel.timer.stop()  # the test turns the refreshes itself
    while len(panel.cards) < len(ids):
        panel.refresh()
    first, last = panel.cards[ids[0]], panel.cards[ids[-1]]
    qtbot.waitUntil(lambda: not first.visibleRegion().isEmpty() and last.visibleRegion().isEmpty())  # laid out
    window.apply_events([StepReceived(Step(7, 0.5, 0.01, 0.1, 32, 300.0, 0.1, device=d, round=1)) for d in ids])
    panel.refresh()
    assert "step 7" in first.status.text()  # in view: filled
    assert last.visibleRegion().isEmpty() and "step 7" not in last.status.text()  # out of view: not yet
    bar = panel.scroll.verticalScrollBar()
    bar.setValue(bar.maximum())  # the operator scrolls down: the cards now in view are filled at once
    assert not last.visibleRegion().isEmpty() and "step 7" in last.status.text()
    window.devices.refresh_all()  # a screenshot's end state: every card, in view or not
    assert all("step 7" in card.status.text() for card in panel.cards.values())


def test_a_new_card_is_filled_at_once_even_when_the_refresh_has_no_budget_left(window) -> None:
    window.apply_events([DeviceSeen("a", "alpha", "10.0.0.1:8765", "address"),
                         DeviceSeen("b", "beta", "10.0.0.2:8765", "address")])
    panel = window.devices
    panel.timer.stop()
    panel.refresh(budget_ms=0.0)  # a loaded machine: the budget is spent before the first card is filled
    assert sorted(panel.cards) == ["a", "b"]
    assert "alpha" in panel.cards["a"].name.text() and "beta" in panel.cards["b"].name.text()
