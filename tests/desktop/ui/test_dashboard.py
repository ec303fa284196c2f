"""The dashboard on real agents: found by zeroconf on 127.0.0.1, paired by the token typed on a card, trained.

Every agent is a real ``deftly-agent`` process (``desktop.engine.local_agents``, over ``desktop.engine.local``)
on loopback, stopped in teardown; the engine is the real one on its own thread;
the window is real, offscreen; the programs are the tiny model's (exported once
per session into the shared cache).
"""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.local_agents import LocalAgents
from desktop.ui.app import Dashboard
from desktop.ui.job_form import RunChoice
from shared.events import Step, read_events

# Per test session: another run's agents advertise on 127.0.0.1 too, and must not pair with ours.
RIGHT_TOKEN = f"right-token-{secrets.token_hex(4)}"
RUN_S = 300_000  # ms: a tiny run's time on a loaded 2-core machine, with its first export


def settings(tiny_job: JobSpec, export_cache: Path, out: Path, **overrides) -> EngineConfig:
    base = dict(job=tiny_job, out=out, rounds=2, local_steps=3, cache_dir=export_cache,
                discover=True, mdns_interfaces=("127.0.0.1",), eval_limit=16, test_limit=16, wait_s=120.0)
    return EngineConfig(**{**base, **overrides})


@pytest.fixture()
def lab(tmp_path):
    agents = LocalAgents(tmp_path / "agents", token=RIGHT_TOKEN)
    try:
        yield agents
    finally:
        agents.stop()
        assert not agents.running


@pytest.fixture()
def dashboards(qtbot):
    made: list[Dashboard] = []

    def make(config: EngineConfig, lobby: bool) -> Dashboard:
        dashboard = Dashboard(lambda: Engine(config), lambda _choice, _paired: config)
        qtbot.addWidget(dashboard.window)
        dashboard.window.resize(1400, 900)
        dashboard.window.show()
        dashboard.start(lobby=lobby)
        made.append(dashboard)
        return dashboard

    yield make
    for dashboard in made:
        dashboard.bridge.stop()
        assert not dashboard.bridge.running


def start(dashboard: Dashboard, config: EngineConfig) -> None:
    dashboard.window.start_run(RunChoice(config.job, config.rounds, config.local_steps))


def until_over(qtbot, window, timeout: int = RUN_S) -> None:
    """Until the run has finished; a run that failed fails the test at once, with what the window said."""
    state = window.model.state
    qtbot.waitUntil(lambda: state.finished is not None or state.phase == "failed", timeout=timeout)
    assert state.phase != "failed", f"the run failed: {window.status_error.text()}"


def test_an_agent_on_loopback_gets_a_card_and_a_wrong_token_is_said_on_that_card(
        lab, dashboards, qtbot, tmp_path) -> None:
    # prepare: one agent advertised on 127.0.0.1; the desktop knows no token for it (the job is not run)
    lab.start([("card-pi", "pi4-4gb")])
    lobby = EngineConfig(job=JobSpec(), out=tmp_path / "run", discover=True, mdns_interfaces=("127.0.0.1",),
                         cache_dir=tmp_path / "cache")
    dashboard = dashboards(lobby, lobby=True)
    cards = dashboard.window.devices.cards
    qtbot.waitUntil(lambda: any(c.name.text().endswith("card-pi</b>") for c in cards.values()), timeout=30_000)
    device, card = next((d, c) for d, c in cards.items() if "card-pi" in c.name.text())
    assert "SIMULATED · pi4-4gb" in card.badge.text() and "found by mDNS" in card.where.text()
    qtbot.waitUntil(lambda: "pairing token" in card.error.text(), timeout=30_000)
    assert not card.pair_row.isHidden()
    # execute: the operator types a wrong token, then the right one
    card.token.setText("wrong-token")
    card.pair_button.click()
    # assert: the refusal is said on this card, with what to do; the right token pairs it
    qtbot.waitUntil(lambda: dashboard.window.model.state.devices[device].status == "error", timeout=30_000)
    qtbot.waitUntil(lambda: "wrong pairing token" in card.error.text().lower()
                    and "check the token" in card.error.text().lower(), timeout=10_000)
    assert "#a1120b" in card.styleSheet() and not card.pair_row.isHidden()
    card.token.setText(RIGHT_TOKEN)
    card.pair_button.click()
    qtbot.waitUntil(lambda: dashboard.window.model.state.devices[device].status == "paired", timeout=30_000)
    qtbot.waitUntil(lambda: card.error.isHidden() and card.pair_row.isHidden(), timeout=10_000)


def test_what_real_agents_stream_is_what_the_plots_draw(
        lab, dashboards, qtbot, tiny_job, export_cache, tmp_path) -> None:
    # prepare: two simulated devices of different classes, paired with their token
    lab.start([("plot-laptop", "laptop"), ("plot-phone", "midrange-phone")])
    config = settings(tiny_job, export_cache, tmp_path / "run", token=RIGHT_TOKEN, devices=2,
                      zero_shot=True)
    dashboard = dashboards(config, lobby=False)
    window = dashboard.window
    # execute: the whole run, as the operator's Start asks it
    start(dashboard, config)
    until_over(qtbot, window)
    window.live.redraw()
    # assert: every device's plotted losses, latencies and memory are its metrics, in order
    state = window.model.state
    assert not state.finished.stopped and state.finished.rounds_done == 2
    recorded = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if isinstance(e, Step)]
    assert len(recorded) == 2 * 2 * 3
    for label in ("plot-laptop", "plot-phone"):
        view = state.device_named(label)
        sent = [s for s in recorded if s.device == label]
        assert window.live.plotted(view.id)[1].tolist() == [s.loss for s in sent]
        assert window.live.plotted(view.id, "step_s")[1].tolist() == [s.seconds for s in sent]
        assert window.live.plotted(view.id, "rss_mb")[1].tolist() == [s.rss_mb for s in sent]
    rounds, _accuracy = window.live.plotted_accuracy()
    assert rounds.tolist() == [0, 1, 2]  # the untrained adapter, then each merged round
    assert "zero-shot" in window.results.accuracy.text()
    assert str(tmp_path / "run") in window.results.report.text() and window.results.open_button.isEnabled()


def test_a_device_killed_mid_round_turns_red_and_the_plan_view_shows_the_replan(
        lab, dashboards, qtbot, tiny_job, export_cache, tmp_path) -> None:
    # prepare: two devices; the phone is killed at its first step
    laptop, phone = lab.start([("lost-laptop", "laptop"), ("lost-phone", "midrange-phone")])
    # rounds of 300 tiny steps (seconds): the kill lands mid-round, not after the phone's round is done
    config = settings(tiny_job, export_cache, tmp_path / "run", token=RIGHT_TOKEN, devices=2,
                      rounds=2, local_steps=300, patience_s=1.0)
    dashboard = dashboards(config, lobby=False)
    window = dashboard.window
    start(dashboard, config)
    qtbot.waitUntil(lambda: ((v := window.model.state.device_named("lost-phone")) is not None and len(v.loss) > 0)
                    or window.model.state.phase == "failed", timeout=RUN_S)
    assert window.model.state.phase != "failed", f"the run failed: {window.status_error.text()}"
    # execute
    phone.kill()
    # assert: its card turns red, the plan view re-plans without it, the run ends with the other
    view = window.model.state.device_named("lost-phone")
    card = window.devices.cards[view.id]
    qtbot.waitUntil(lambda: "LOST" in card.status.text(), timeout=60_000)
    assert "#a1120b" in card.styleSheet()
    # the re-plan is drawn once its new block program is exported (a lowering: minutes on a loaded machine)
    qtbot.waitUntil(lambda: len(window.model.state.plans) == 2, timeout=RUN_S)
    assert "Re-planned from round 2" in window.plan.reason.text() and "lost-phone lost" in window.plan.reason.text()
    assert window.model.colour(view.id) not in window.plan.stack.layer_colours()
    assert [a.name for a in window.model.state.plan.active()] == ["lost-laptop"]
    until_over(qtbot, window)
    assert window.model.state.finished.rounds_done == 2
    qtbot.waitUntil(lambda: "lost-phone lost: re-planned" in window.live.annotations(), timeout=10_000)


def test_an_agent_added_by_address_with_its_token_gets_one_paired_card(lab, dashboards, qtbot, tmp_path) -> None:
    # prepare: an agent that does not advertise (multicast blocked, as on many Wi-Fi networks)
    (agent,) = lab.start([("addr-phone", "midrange-phone")], advertise=False)
    lobby = EngineConfig(job=JobSpec(), out=tmp_path / "run", discover=True, mdns_interfaces=("127.0.0.1",),
                         cache_dir=tmp_path / "cache")
    dashboard = dashboards(lobby, lobby=True)
    window = dashboard.window
    # execute: the operator types its address with the token it printed
    window.devices.address.setText(f"{RIGHT_TOKEN}@{agent.address}")
    window.devices.add_button.click()
    # assert: one card, named by the agent once it said who it is, paired
    qtbot.waitUntil(lambda: any(v.name == "addr-phone" and v.status == "paired"
                                for v in window.model.state.devices.values()), timeout=30_000)
    # (one card for it: other cards can only be another test run's agents advertised on loopback)
    mine = lambda: [c for c in window.devices.cards.values() if "addr-phone" in c.name.text()]  # noqa: E731
    qtbot.waitUntil(lambda: len(mine()) == 1, timeout=10_000)
    card = mine()[0]
    assert "added by address" in card.where.text() and "SIMULATED · midrange-phone" in card.badge.text()
