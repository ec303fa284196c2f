"""The state model: events change it, in order, through one reducer; the bus isolates a broken view."""
from __future__ import annotations

import asyncio

import numpy as np

from desktop.engine.events import (
    Assignment, DeviceError, DeviceLost, DeviceSeen, DeviceStatus, EventBus, Notice, PlanMade, PlanView,
    RoundMerged, StepReceived, engine_event_to_plain,
)
from desktop.engine.state import EngineState, Series
from shared.events import Round, Step


def plan(*devices: str) -> PlanView:
    rows = tuple(Assignment(d, d.upper(), f"L{i}", i, i, i * 10, 10, 0.5, 1.0, 0.1, 1.1, 1e6, 2e6, "estimated")
                 for i, d in enumerate(devices))
    return PlanView(1, "start", "planned", 1.1, rows, {"random": 2.0}, 0.01, "job")


def test_series_is_a_ring_buffer_oldest_first() -> None:
    series = Series(capacity=4)
    for i in range(6):
        series.append(i, 10 * i)
    x, y = series.view()
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [20, 30, 40, 50]
    assert series.last() == 50 and len(series) == 4


def test_events_build_the_state_a_view_reads() -> None:
    state = EngineState()
    bus = EventBus(state.apply)
    bus.emit(DeviceSeen("a", "pi", "127.0.0.1:1", "mdns", simulated="pi4"))
    bus.emit(DeviceSeen("b", "laptop", "127.0.0.1:2", "address"))
    bus.emit(PlanMade(plan("a", "b")))
    bus.emit(DeviceStatus("a", "training", round=1))
    for n in (1, 2):
        bus.emit(StepReceived(Step(n, [0.6, 0.5][n - 1], 0.1, 0.5, 32, 120.0, 0.1, device="a", round=1)))
    bus.emit(RoundMerged(Round(1, 0.61, 20, 3.0, {"a": 1.0}, {"a": 1.1}, ["b"])))
    bus.emit(DeviceLost("b", 1, "connection dropped"))
    bus.emit(DeviceError("b", "out of memory", "give it a smaller block"))
    a, b = state.devices["a"], state.devices["b"]
    assert (a.block, a.share, a.status, a.step, a.simulated) == ("L0", 0.5, "training", 2, "pi4")
    assert a.loss.view()[1].tolist() == [0.6, 0.5] and a.step_rate == 2.0
    assert (b.status, b.error, b.advice) == ("lost", "out of memory", "give it a smaller block")
    assert state.accuracy == [(1, 0.61)] and state.lost == [(1, "b")]
    assert [d.name for d in state.active_devices()] == ["pi", "laptop"]


def test_a_failing_callback_is_dropped_and_reported_others_still_see_every_event() -> None:
    state = EngineState()
    bus = EventBus(state.apply)
    got = []

    def broken(event):
        raise RuntimeError("view bug")

    bus.subscribe(broken)
    bus.subscribe(got.append)

    async def with_queue():
        q = bus.queue()
        bus.emit(Notice("one"))
        bus.emit(Notice("two"))
        return [q.get_nowait() for _ in range(q.qsize())]

    queued = asyncio.run(with_queue())
    assert [e.message for e in got if isinstance(e, Notice)][0].startswith("a view's event callback failed")
    assert [e.message for e in got][-1] == "two"
    assert "two" in [e.message for e in queued]
    assert state.notices[-1] == "two"


def test_events_are_records_with_a_kind() -> None:
    plain = engine_event_to_plain(DeviceStatus("a", "receiving", fraction=0.5))
    assert plain == {"kind": "device_status", "device": "a", "status": "receiving", "detail": "", "fraction": 0.5,
                     "round": None}
