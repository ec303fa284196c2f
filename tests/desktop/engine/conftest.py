"""Fixtures for the engine's tests: real agents on loopback (the tiny model and task: tests/desktop/conftest.py).

The agents are real ``deftly-agent`` processes (``python -m device_agent.cli``)
listening on 127.0.0.1 with a port of their own choosing and advertising on
127.0.0.1 only; every one is killed in the fixture's teardown, whatever the test
did.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
AGENT_START_S = 60.0  # an agent imports little at start; this covers a loaded machine


@dataclass
class AgentProcess:
    name: str
    port: int
    token: str
    state_dir: Path
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class Agents:
    """Starts agent processes; :meth:`close` kills every one it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[AgentProcess] = []
        self.drains: list[threading.Thread] = []

    def start(self, name: str, simulate: str | None = None, token: str = "test-token", advertise: bool = True,
              state_dir: Path | None = None) -> AgentProcess:
        state_dir = state_dir or self.root / name
        command = [sys.executable, "-m", "device_agent.cli", "--name", name, "--host", "127.0.0.1", "--port", "0",
                   "--token", token, "--state-dir", str(state_dir),
                   "--advertise" if advertise else "--no-advertise"]
        if simulate:
            command += ["--simulate", simulate]
        log = open(self.root / f"{name}.out", "ab")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
        handle = AgentProcess(name, 0, token, state_dir, process)
        self.started.append(handle)
        deadline = time.monotonic() + AGENT_START_S
        assert process.stdout is not None
        for line in process.stdout:
            found = re.search(r"listening on ws://[^:]+:(\d+)", line)
            if found:
                handle.port = int(found.group(1))
            if line.startswith(("advertising", "not advertising")):
                break
            if time.monotonic() > deadline:
                break
        if not handle.port:
            handle.kill()
            raise RuntimeError(f"agent {name} did not start; see {self.root / f'{name}.out'}")
        # Keep reading its stdout so that a full pipe never blocks it; the thread ends with the process.
        drain = threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True)
        drain.start()
        self.drains.append(drain)
        return handle

    def restart(self, handle: AgentProcess, simulate: str | None = None) -> AgentProcess:
        """The same agent (state dir, name, token) started again after it was killed."""
        handle.kill()
        return self.start(handle.name, simulate, handle.token, state_dir=handle.state_dir)

    def close(self) -> None:
        for handle in self.started:
            if handle.process.poll() is None:
                handle.process.send_signal(signal.SIGTERM)
        for handle in self.started:
            try:
                handle.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                handle.kill()
        for drain in self.drains:
            drain.join(timeout=10)


@pytest.fixture()
def agents(tmp_path):
    pool = Agents(tmp_path / "agents")
    pool.root.mkdir()
    try:
        yield pool
    finally:
        pool.close()
