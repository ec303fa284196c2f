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
