"""Tests for desktop/engine/client.py that need no agent: the backoff, and an address nobody answers.

The client's conversation with a real agent (every request, transfer, round, cut
and restart) is tested in tests/device_agent/test_server.py against agent processes.
"""
from __future__ import annotations

import asyncio
import random
import socket
from itertools import islice

import pytest

from desktop.engine.client import AgentClient, AgentUnreachable, backoff_delays


def test_reconnect_waits_double_up_to_the_cap_each_with_jitter_below_it() -> None:
    delays = list(islice(backoff_delays(first_s=0.2, cap_s=3.0, jitter=0.5, rng=random.Random(0)), 8))
    bounds = [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0, 3.0]
    assert all(0.5 * high <= d <= high for d, high in zip(delays, bounds))
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered: no two clients retry in lockstep


def test_an_address_where_nothing_listens_is_unreachable_not_a_traceback() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def go() -> None:
        with pytest.raises(AgentUnreachable, match=f"ws://127.0.0.1:{port}/deftly: no agent answers"):
            await AgentClient(f"127.0.0.1:{port}", "token", desktop_id="d", reconnect=False).connect()

    asyncio.run(go())


# -- a desktop that restarted takes up the round it asked for (continue_round) -------------------

TOKEN = "test-token-client"


def _program_files(tiny_program, folder):
    """The session's tiny program copied where the test may use it: (manifest path, its data as a shard)."""
    import shutil

    from shared.manifest import Manifest

    for path in tiny_program.export.manifest_path.parent.iterdir():
        shutil.copy2(path, folder / path.name)
    manifest = folder / "step.manifest.json"
    return manifest, folder / Manifest.load(manifest).files["data"]


@pytest.mark.parametrize("agent_restarts", [False, True])
def test_a_restarted_desktop_takes_up_its_round_without_running_it_twice(tiny_program, tmp_path,
                                                                         agent_restarts: bool) -> None:
    import numpy as np

    from desktop.engine.local import LocalAgent

    # prepare: a round asked for by one client, held at a step boundary; that desktop goes away
    (tmp_path / "program").mkdir()
    manifest, data = _program_files(tiny_program, tmp_path / "program")
    agent = LocalAgent(tmp_path / "state", ["--name", "a", "--token", TOKEN, "--no-advertise"]).start()
    k, b = 40, np.zeros(tiny_program.export.manifest.b_size, dtype=np.float32)
    first_metrics, second_metrics = [], []

    async def scenario():
        first = AgentClient(agent.address, TOKEN, desktop_id="desk", reconnect=False, on_metric=first_metrics.append)
        await first.connect()
        sha = await first.send_program(manifest)
        await first.send_data_shard(data)
        await first.start_round(round=1, program=sha, b=b, k=k, lr=0.1, eps=1e-2, seed=0)
        while len(first_metrics) < 2:  # a few steps in, so there is a checkpoint to continue from
            await asyncio.sleep(0.01)
        await first.pause()
        await first.close()
        if agent_restarts:
            await asyncio.to_thread(agent.restart)  # killed mid-round: it comes back idle, its round checkpointed
        # execute: the restarted desktop's new client takes the round up
        second = AgentClient(agent.address, TOKEN, desktop_id="desk", on_metric=second_metrics.append)
        try:
            await second.connect()
            await second.continue_round(round=1, program=sha, b=b, k=k, lr=0.1, eps=1e-2, seed=0)
            if not agent_restarts:
                await second.resume()
            return await second.round_result(1, timeout_s=120)
        finally:
            await second.close()

    try:
        done = asyncio.run(scenario())
    finally:
        agent.kill()
    # assert: one round of k steps; the steps the first desktop took are not sent again
    steps = [m.step.step for m in first_metrics + second_metrics]
    assert (done.round, done.steps, done.stopped) == (1, k, False)
    assert steps == list(range(1, k + 1))
    assert (done.resumed_at > 0) == agent_restarts  # continued from its checkpoint, not started over


# -- TLS: a round over wss://, and certificates checked inside the handshake ------------------------


def test_over_tls_a_round_trains_as_over_ws_and_another_certificate_is_refused_before_the_token_is_sent(
        tiny_program, tmp_path) -> None:
    import numpy as np

    from desktop.engine.client import CertificateMismatch
    from desktop.engine.local import LocalAgent

    # prepare: an agent serving TLS, its certificate made in its state dir
    (tmp_path / "program").mkdir()
    manifest, data = _program_files(tiny_program, tmp_path / "program")
    agent = LocalAgent(tmp_path / "state", ["--name", "tls", "--token", TOKEN, "--no-advertise", "--tls"]).start()
    fingerprint, b = agent.tls_fingerprint, np.zeros(tiny_program.export.manifest.b_size, dtype=np.float32)
    metrics = []

    async def scenario():
        # execute: trust on first use, then a whole round over wss://
        client = AgentClient(agent.address, TOKEN, desktop_id="desk", tls=True, reconnect=False,
                             on_metric=metrics.append)
        try:
            welcome = await client.connect()
            sha = await client.send_program(manifest)
            await client.send_data_shard(data)
            done = await client.run_round(round=1, program=sha, b=b, k=3, lr=0.1, eps=1e-2, seed=0)
        finally:
            await client.close()
        # execute: a client expecting another certificate, with the right token
        intruder = AgentClient(agent.address, TOKEN, desktop_id="other-desk", tls=True,
                               tls_fingerprint="0" * 64, reconnect=False)
        with pytest.raises(CertificateMismatch) as refused:
            await intruder.connect()
        await intruder.close()
        return client, welcome, done, refused.value

    try:
        client, welcome, done, refused = asyncio.run(scenario())
    finally:
        agent.kill()
    # assert: pinned on first use to what the agent printed and says in its hello; the round is whole
    assert client.uri.startswith("wss://") and client.tls_fingerprint == client.tls_pin == fingerprint
    assert welcome.agent.tls_fingerprint == fingerprint
    assert (done.round, done.steps, done.stopped) == (1, 3, False) and len(metrics) == 3
    assert np.isfinite(done.mean_loss)
    # assert: refused in the handshake with both fingerprints: the agent never saw the request
    assert (refused.expected, refused.presented) == ("0" * 64, fingerprint)
    assert f"sha256:{fingerprint}" in str(refused) and f"sha256:{'0' * 64}" in str(refused)
    assert "other-desk" not in agent.log()


def test_a_reconnection_must_present_the_certificate_the_first_connection_did(tmp_path) -> None:
    from desktop.engine.client import CertificateMismatch
    from desktop.engine.local import LocalAgent

    # prepare: a client that trusted the agent's certificate on first use
    agent = LocalAgent(tmp_path / "state", ["--name", "tls", "--token", TOKEN, "--no-advertise", "--tls"]).start()
    first = agent.tls_fingerprint

    async def scenario():
        client = AgentClient(agent.address, TOKEN, desktop_id="desk", tls=True,
                             backoff=lambda: iter([0.05] * 400))
        await client.connect()
        try:
            # execute: the agent comes back on its port with a new certificate (its old one deleted)
            (agent.state_dir / "tls.crt").unlink()
            await asyncio.to_thread(agent.restart)
            # assert: reconnecting stops at the first handshake, with the permanent error
            with pytest.raises(CertificateMismatch) as refused:
                await asyncio.wait_for(client.wait_connected(), 60)
            return refused.value
        finally:
            await client.close()

    try:
        refused = asyncio.run(scenario())
    finally:
        agent.kill()
    assert agent.tls_fingerprint != first
    assert (refused.expected, refused.presented) == (first, agent.tls_fingerprint)
