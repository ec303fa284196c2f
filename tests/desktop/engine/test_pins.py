"""Tests for desktop/engine/pins.py through the engine: TLS agents found by zeroconf on 127.0.0.1, paired over
wss://, pinned on first use, and refused with a per-device error once their certificate changed.

Real ``deftly-agent --tls`` processes (conftest.py) and a real engine lobby (``Engine.open``: find and pair,
no job); the pins live in the test's own cache dir.
"""
from __future__ import annotations

import asyncio
import json
import time

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.events import DeviceError, DeviceStatus, Notice
from desktop.engine.profiles import desktop_id

PAIR_S = 90.0  # a loaded 2-core machine takes a while to see an advert and finish a handshake
# A token of these tests' own: other engines browsing 127.0.0.1 at the same time (another test run on this
# machine) are refused with 401 instead of occupying the agents.
TOKEN = "test-token-pins"


def lobby(tmp_path, cache, **overrides) -> EngineConfig:
    settings = dict(job=JobSpec(), out=tmp_path / "run", discover=True, mdns_interfaces=("127.0.0.1",),
                    cache_dir=cache, token=TOKEN)
    return EngineConfig(**{**settings, **overrides})


def pair(config: EngineConfig, done: callable, seen: list | None = None) -> list:
    """Open an engine lobby until ``done(events)`` holds (or PAIR_S passed); every event it emitted.

    ``seen``, if given, gets the engine's state model (what a dashboard shows)."""
    events: list = []

    async def go() -> None:
        engine = Engine(config)
        engine.subscribe(events.append)
        await engine.open()
        try:
            deadline = time.monotonic() + PAIR_S
            while not done(events) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await engine.close()
            if seen is not None:
                seen.append(engine.state)

    asyncio.run(go())
    return events


def since_start(agent) -> str:
    """Its log since it last started."""
    return agent.log().split("listening on port")[-1]


def statuses(events: list, status: str) -> set[str]:
    return {e.device for e in events if isinstance(e, DeviceStatus) and e.status == status}


def test_a_tls_agent_found_by_zeroconf_is_pinned_on_first_use_and_refused_once_its_certificate_changed(
        agents, tmp_path) -> None:
    # prepare: a TLS agent and a plain one, advertised on loopback; a desktop that knows neither
    secure = agents.start("tls-pi", tls=True, token=TOKEN)
    plain = agents.start("plain-pi", token=TOKEN)
    cache = tmp_path / "cache"
    first = secure.tls_fingerprint
    agent_id = json.loads((secure.state_dir / "agent.json").read_text())["id"]
    plain_id = json.loads((plain.state_dir / "agent.json").read_text())["id"]
    agents_file = cache / "agents.json"
    # execute: first pairing
    events = pair(lobby(tmp_path, cache), lambda ev: {agent_id, plain_id} <= statuses(ev, "paired"))
    # assert: both paired; the TLS one over wss://, its certificate pinned (its advert said the same one)
    assert {agent_id, plain_id} <= statuses(events, "paired"), [e for e in events if isinstance(e, DeviceError)]
    pins = json.loads(agents_file.read_text())
    assert pins[agent_id]["tls_fingerprint"] == first and "tls_fingerprint" not in pins[plain_id]
    notices = [e.message for e in events if isinstance(e, Notice) and "TLS certificate" in e.message]
    assert notices == [f"tls-pi: pinned its TLS certificate sha256:{first}, the one its advert says, in {agents_file}"]

    # execute: restarted with its certificate kept: paired again, nothing new to say
    secure.restart()
    assert secure.tls_fingerprint == first
    events = pair(lobby(tmp_path, cache), lambda ev: agent_id in statuses(ev, "paired"))
    assert agent_id in statuses(events, "paired")
    assert not [e for e in events if isinstance(e, (DeviceError, Notice)) and "TLS" in e.message]

    # execute: its certificate deleted and made again at restart
    (secure.state_dir / "tls.crt").unlink()
    secure.restart()
    second = secure.tls_fingerprint
    views: list = []
    events = pair(lobby(tmp_path, cache), lambda ev: agent_id in statuses(ev, "error")
                  and plain_id in statuses(ev, "paired"), views)
    # assert: refused with one per-device error naming it, both fingerprints and the file; the plain one pairs
    assert second != first
    errors = [e for e in events if isinstance(e, DeviceError) and e.device == agent_id]
    assert errors and len({(e.message, e.advice) for e in errors}) == 1, errors  # (again if its advert changes)
    message, advice = errors[0].message, errors[0].advice
    assert message.startswith("tls-pi (127.0.0.1:") and "its TLS certificate changed" in message
    assert f"presented sha256:{second}" in message and f"pinned sha256:{first} for agent {agent_id}" in message
    assert str(agents_file) in message and str(agents_file) in advice and "delete" in advice
    assert "Traceback" not in message + advice
    card = views[0].devices[agent_id]  # what the dashboard's card for it shows, as for a wrong token
    assert (card.status, card.error, card.advice) == ("error", message, advice)
    assert agent_id not in statuses(events, "paired") and plain_id in statuses(events, "paired")
    assert json.loads(agents_file.read_text())[agent_id]["tls_fingerprint"] == first  # the pin is kept
    assert f"desktop {desktop_id(cache)} connected" not in since_start(secure)  # it never saw the refused one

    # execute: the pinned agent started again without --tls
    secure.args.remove("--tls")
    secure.restart()
    events = pair(lobby(tmp_path, cache), lambda ev: agent_id in statuses(ev, "error"))
    # assert: refused before connecting (its advert says plain ws://), naming the pin and the file
    errors = [e for e in events if isinstance(e, DeviceError) and e.device == agent_id]
    assert errors and "says it serves plain ws://" in errors[0].message
    assert f"pinned TLS certificate sha256:{first} for agent {agent_id} in {agents_file}" in errors[0].message
    assert "--tls again" in errors[0].advice and agent_id not in statuses(events, "paired")
    assert f"desktop {desktop_id(cache)} connected" not in since_start(secure)


def test_an_address_with_a_fingerprint_is_checked_from_the_first_connection_and_wss_alone_is_trusted_on_first_use(
        agents, tmp_path) -> None:
    # prepare: a TLS agent reached by address only
    secure = agents.start("addr-pi", tls=True, advertise=False, token=TOKEN)
    cache, wrong, right = tmp_path / "cache", "ab" * 32, secure.tls_fingerprint

    def by_address(address: str) -> EngineConfig:
        return lobby(tmp_path, cache, discover=False, agents=(address,))

    def settled(events: list) -> bool:
        return bool(statuses(events, "paired") or statuses(events, "error"))

    # execute: a fingerprint that is not its own
    events = pair(by_address(f"{secure.address}#sha256:{wrong}"), settled)
    # assert: an error saying it was the one given with the address, and what it presented; nothing pinned
    errors = [e for e in events if isinstance(e, DeviceError)]
    assert len(errors) == 1 and not statuses(events, "paired")
    assert f"presented TLS certificate sha256:{right}, not the sha256:{wrong} given with its address" in \
        errors[0].message
    assert not (cache / "agents.json").exists() or "tls_fingerprint" not in (cache / "agents.json").read_text()
    # execute: wss:// alone
    events = pair(by_address(f"wss://{secure.address}"), settled)
    # assert: paired, trusted on first use with a notice, pinned
    assert statuses(events, "paired") and not [e for e in events if isinstance(e, DeviceError)]
    notices = [e.message for e in events if isinstance(e, Notice) and "TLS" in e.message]
    assert len(notices) == 1 and f"trusted its TLS certificate sha256:{right} on first use" in notices[0]
    pins = json.loads((cache / "agents.json").read_text())
    assert [entry["tls_fingerprint"] for entry in pins.values()] == [right]
    # execute: its own fingerprint given: pairs, nothing new pinned
    events = pair(by_address(f"{secure.address}#sha256:{right}"), settled)
    assert statuses(events, "paired") and not [e for e in events if isinstance(e, (DeviceError, Notice))
                                               and "TLS" in e.message]
