"""Fixtures for the engine's tests: real agents on loopback (the tiny model and task: tests/desktop/conftest.py).

The agents are real ``deftly-agent`` processes (``desktop.engine.local.LocalAgent``)
listening on 127.0.0.1 with a port of their own choosing and advertising on
127.0.0.1 only; every one is killed in the fixture's teardown, whatever the test
did.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from desktop.engine.local import LocalAgent


# One pairing token per test session: other test runs on the same machine advertise their agents
# on 127.0.0.1 too, and with a token every run shared, their engines paired with ours.
TOKEN = f"test-token-{secrets.token_hex(4)}"


class Agents:
    """Starts ``deftly-agent`` processes (``desktop.engine.local.LocalAgent``); :meth:`close` kills every one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[LocalAgent] = []

    def start(self, name: str, simulate: str | None = None, token: str = TOKEN,
              advertise: bool = True, tls: bool = False) -> LocalAgent:
        args = ["--name", name, "--token", token, "--advertise" if advertise else "--no-advertise"]
        if simulate:
            args += ["--simulate", simulate]
        if tls:
            args.append("--tls")
        agent = LocalAgent(self.root / name, args)
        self.started.append(agent)
        return agent.start()

    def close(self) -> None:
        for agent in self.started:
            agent.kill()


@pytest.fixture()
def agents(tmp_path):
    pool = Agents(tmp_path / "agents")
    pool.root.mkdir()
    try:
        yield pool
    finally:
        pool.close()
