"""Agents on this machine: ``deftly-agent`` processes a demo (or a test) starts, and stops, itself.

``deftly demo`` stands up a simulated lab on one machine: a few agents, each a
real ``deftly-agent --simulate CLASS`` process listening on loopback and
advertising there, so the engine finds them by zeroconf exactly as it finds
devices on a network. :class:`LocalAgents` starts them (all at once, then
reads the port each one printed), and :meth:`LocalAgents.stop` ends every one
it started: SIGTERM, then SIGKILL after a grace period. On Linux each agent is
also told to end when its parent dies (``PR_SET_PDEATHSIG``), so a demo killed
outright leaves no agent behind either. (Linux sends that signal when the
*thread* that started the agent ends: start them from the main thread.)
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InputError

AGENT_START_S = 60.0  # an agent imports little before it listens; this covers a loaded 2-core machine
AGENT_STOP_S = 10.0  # SIGTERM, then this long before SIGKILL
LOOPBACK = "127.0.0.1"
_PORT = re.compile(r"listening on ws://[^\s:]+:(\d+)")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class LocalAgent:
    """One agent process."""

    name: str
    simulate: str | None
    token: str
    state_dir: Path
    log: Path
    process: subprocess.Popen
    port: int = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """End it at once (a device pulled from the wall)."""
        if self.running:
            self.process.kill()
            self.process.wait(AGENT_STOP_S)


def _libc_prctl():
    """libc's prctl, looked up here in the parent: the child between fork and exec must only call it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalAgents:
    """Starts agents on loopback; :meth:`stop` ends every one it started.

    Args:
        root: where each agent's state directory and log go (``root/NAME``, ``root/NAME.log``).
        token: the pairing token of every agent (default: a fresh random one), so the
            process that started them can pair them.
    """

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        self.token = token or secrets.token_hex(8)
        self.agents: list[LocalAgent] = []
        self._drains: list[threading.Thread] = []

    def __enter__(self) -> "LocalAgents":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self, specs: list[tuple[str, str | None]], advertise: bool = True) -> list[LocalAgent]:
        """Start one agent per (name, device class or None), all at once; returns them once each listens.

        Raises:
            InputError: an agent exited or did not say where it listens in time (its log is named).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        started = [self._spawn(name, simulate, advertise) for name, simulate in specs]
        deadline = time.monotonic() + AGENT_START_S
        try:
            for agent in started:
                self._wait_listening(agent, deadline)
        except BaseException:
            self.stop()
            raise
        return started

    def _spawn(self, name: str, simulate: str | None, advertise: bool) -> LocalAgent:
        state_dir = self.root / name
        log = self.root / f"{name}.log"
        command = [sys.executable, "-m", "device_agent.cli", "--name", name, "--host", LOOPBACK, "--port", "0",
                   "--token", self.token, "--state-dir", str(state_dir),
                   "--advertise" if advertise else "--no-advertise"]
        if simulate:
            command += ["--simulate", simulate]
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH"))
                                                           if p)}
        with open(log, "ab") as err:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                       text=True, env=env, cwd=root,
                                       preexec_fn=_die_with_parent if _PRCTL is not None else None)
        agent = LocalAgent(name, simulate, self.token, state_dir, log, process)
        self.agents.append(agent)
        return agent

    def _wait_listening(self, agent: LocalAgent, deadline: float) -> None:
        assert agent.process.stdout is not None
        lines: list[str] = []
        for line in agent.process.stdout:  # its start-up lines; the last says what it advertises
            lines.append(line)
            found = _PORT.search(line)
            if found:
                agent.port = int(found.group(1))
            if line.startswith(("advertising", "not advertising")) or time.monotonic() > deadline:
                break
        if not agent.port:
            raise InputError(f"agent {agent.name} did not start: {''.join(lines[-3:]).strip() or 'no output'} "
                             f"(see {agent.log})")
        with open(agent.log, "a") as log:
            log.writelines(lines)
        # Keep reading its stdout so that a full pipe never blocks it; the thread ends with the process.
        drain = threading.Thread(target=_drain, args=(agent.process.stdout,), name=f"agent-{agent.name}",
                                 daemon=True)
        drain.start()
        self._drains.append(drain)

    def stop(self) -> None:
        """End every agent started here: SIGTERM, then SIGKILL for one that does not go."""
        for agent in self.agents:
            if agent.running:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.process.wait(AGENT_STOP_S)
            except subprocess.TimeoutExpired:
                agent.kill()
        for drain in self._drains:
            drain.join(AGENT_STOP_S)
        self._drains.clear()

    @property
    def running(self) -> list[LocalAgent]:
        return [a for a in self.agents if a.running]


def _drain(stream) -> None:
    for _line in stream:
        pass
