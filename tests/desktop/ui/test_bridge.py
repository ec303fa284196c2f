"""The engine beside Qt: its own thread and loop, events to the GUI thread in order and in batches."""
from __future__ import annotations

import threading

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.events import Notice, PhaseChanged
from desktop.ui.bridge import EngineBridge


def lobby_engine(tmp_path) -> Engine:
    return Engine(EngineConfig(job=JobSpec(), out=tmp_path / "run", discover=True, mdns_interfaces=("127.0.0.1",),
                               cache_dir=tmp_path / "cache"))


def test_events_cross_to_the_gui_thread_in_order_and_in_few_batches(qapp, qtbot, tmp_path) -> None:
    bridge = EngineBridge(lambda: lobby_engine(tmp_path))
    batches: list[list] = []
    threads: set[str] = set()

    def received(batch: list) -> None:
        batches.append(batch)
        threads.add(threading.current_thread().name)

    bridge.events.connect(received)
    bridge.start()
    try:
        async def burst(engine) -> None:  # on the engine's loop, as its own events are
            for i in range(5000):
                engine.bus.emit(Notice(f"n{i}"))

        with qtbot.waitSignal(bridge.finished_call, timeout=20_000):
            bridge.call("burst", burst)
        qtbot.waitUntil(lambda: bridge.delivered >= 5000, timeout=20_000)
        notices = [e.message for b in batches for e in b if isinstance(e, Notice)]
        assert notices == [f"n{i}" for i in range(5000)]
        assert len(batches) < 1000  # coalesced: the GUI wakes once per burst it missed, not once per event
        assert threads == {threading.main_thread().name}
    finally:
        bridge.stop()
    assert not bridge.running


def test_the_engine_opens_its_lobby_and_a_failed_call_comes_back_in_words(qapp, qtbot, tmp_path) -> None:
    bridge = EngineBridge(lambda: lobby_engine(tmp_path))
    phases: list[str] = []
    bridge.events.connect(lambda batch: phases.extend(e.phase for e in batch if isinstance(e, PhaseChanged)))
    bridge.start()
    try:
        with qtbot.waitSignal(bridge.finished_call, timeout=20_000):
            bridge.call("find agents", lambda engine: engine.open())  # a real zeroconf browser on 127.0.0.1
        qtbot.waitUntil(lambda: "discovering" in phases)

        async def bad(engine) -> None:
            engine.add_agent("no-port-here")

        with qtbot.waitSignal(bridge.failed, timeout=20_000) as failed:
            bridge.call("add no-port-here", bad)
        what, message, _advice = failed.args
        assert what == "add no-port-here" and "expected HOST:PORT" in message
    finally:
        bridge.stop()
    assert not bridge.running
