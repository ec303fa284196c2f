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


def test_what_an_agent_says_of_itself_reaches_its_card_and_a_later_event_does_not_erase_it() -> None:
    state = EngineState()
    state.apply(DeviceSeen("a", "pi", "h:1", "mdns", arch="aarch64", cores=4, memory_mb=3072.0,
                           runtime="executorch 1.5.1"))
    state.apply(DeviceSeen("a", "pi", "h:1", "address"))  # an address typed in says nothing of the hardware
    a = state.devices["a"]
    assert (a.arch, a.cores, a.memory_mb, a.runtime) == ("aarch64", 4, 3072.0, "executorch 1.5.1")


def test_a_device_that_pairs_after_an_error_no_longer_shows_it() -> None:
    state = EngineState()
    state.apply(DeviceSeen("a", "pi", "h:1", "mdns"))
    state.apply(DeviceError("a", "pi: wrong token", "check the token"))
    state.apply(DeviceStatus("a", "error", "wrong token"))
    assert state.devices["a"].error == "pi: wrong token"
    state.apply(DeviceStatus("a", "pairing"))
    assert state.devices["a"].error == "pi: wrong token"  # still trying: the last error still holds
    state.apply(DeviceStatus("a", "paired"))
    assert (state.devices["a"].error, state.devices["a"].advice) == (None, "")
    assert [e.message for e in state.errors] == ["pi: wrong token"]  # the run's history keeps it


def test_steps_tagged_with_the_plans_name_of_a_device_reach_its_series() -> None:
    # metrics.jsonl and the engine's StepReceived name a device as the plan does (its label), not by its id.
    state = EngineState()
    state.apply(DeviceSeen("id-a", "pi", "h:1", "mdns"))
    state.apply(PlanMade(plan("id-a")))  # the plan calls it "ID-A"
    state.apply(StepReceived(Step(1, 0.7, 0.1, 0.5, 32, 120.0, 0.1, device="ID-A", round=1)))
    assert state.devices["id-a"].loss.view()[1].tolist() == [0.7]
    assert state.device_named("ID-A") is state.devices["id-a"]


def test_a_merged_round_gives_each_device_its_measured_and_predicted_round_as_a_replay_needs() -> None:
    # a replay has only metrics.jsonl's Round lines (no DeviceRoundDone): they name devices as the plan does
    state = EngineState()
    state.apply(DeviceSeen("id-a", "pi", "h:1", "mdns"))
    state.apply(DeviceSeen("id-b", "phone", "h:2", "mdns"))
    state.apply(PlanMade(plan("id-a", "id-b")))
    state.apply(RoundMerged(Round(1, 0.8, 20, 3.0, {"ID-A": 2.5, "ID-B": 3.0}, {"ID-A": 2.25}, [],
                                  planned_round_s={"ID-A": 1.1, "ID-B": 1.1})))
    a, b = state.devices["id-a"], state.devices["id-b"]
    assert (a.measured_round_s, a.round_predicted_s) == ({1: 2.5}, {1: 2.25})
    assert (b.measured_round_s, b.round_predicted_s) == ({1: 3.0}, {})


def test_a_device_added_by_address_keeps_one_entry_once_its_id_is_known() -> None:
    state = EngineState()
    state.apply(DeviceSeen("10.0.0.2:8765", "10.0.0.2:8765", "10.0.0.2:8765", "address"))
    state.apply(DeviceStatus("10.0.0.2:8765", "pairing"))
    state.apply(DeviceSeen("id-a", "pi", "10.0.0.2:8765", "address", was="10.0.0.2:8765"))
    assert list(state.devices) == ["id-a"]
    assert (state.devices["id-a"].id, state.devices["id-a"].name, state.devices["id-a"].status) == \
        ("id-a", "pi", "pairing")
    # Found by mDNS under its id first, then typed in: the typed-in entry goes, the mDNS one stays.
    state.apply(DeviceSeen("10.0.0.3:1", "10.0.0.3:1", "10.0.0.3:1", "address"))
    state.apply(DeviceSeen("id-a", "pi", "10.0.0.2:8765", "mdns", was="10.0.0.3:1"))
    assert list(state.devices) == ["id-a"]
