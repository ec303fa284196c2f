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
