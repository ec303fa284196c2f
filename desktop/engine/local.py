"""Agents on this machine: start, kill and restart ``deftly-agent`` processes, and cut their links.

A simulated fleet (``deftly-agent --simulate CLASS``) runs as processes here; the
tests and ``deftly bench agent`` drive real agent processes the same way.
:class:`LocalAgent` starts one on a free port and reads the port and the
pairing token from what it prints; :class:`CuttableProxy` sits between a client
and an agent and drops every connection on demand, as a Wi-Fi link does.
Nothing here imports the agent: it is a separate program.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # a loaded 2-core machine can take a while to import numpy and websockets
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def read_banner(process: subprocess.Popen, timeout_s: float) -> tuple[list[str], bool]:
    """A started agent's banner: its stdout lines up to the one about advertising, which ends it.

    Returns:
        The lines read, and whether reading stopped within ``timeout_s`` (that line came, or
        stdout ended); False: the agent is still starting.
    """
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(("advertising", "not advertising")):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return list(lines), not reader.is_alive()


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM when the parent dies, so no agent outlives a killed demo.

    (Linux sends it when the *thread* that started the agent ends: start agents from the main thread.)
    """
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalAgent:
    """One ``deftly-agent`` process; restartable on the same port and state dir."""

    def __init__(self, state_dir: Path, args: list[str] = ()) -> None:
        """
        Args:
            state_dir: its ``--state-dir``.
            args: further command-line arguments (``--host``, ``--port`` and
                ``--state-dir`` are set here).
        """
        self.state_dir = Path(state_dir)
        self.args = list(args)
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.banner: list[str] = []  # what it printed at start
        self._stderr = None

    def start(self) -> "LocalAgent":
        """Start it and wait for its banner (port 0 the first time, the same port after)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "device_agent.cli", "--host", "127.0.0.1", "--port", str(self.port or 0),
                   "--state-dir", str(self.state_dir), *self.args]
        self._stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO,
                                        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent if _PRCTL is not None else None)
        lines, stopped = read_banner(self.process, START_TIMEOUT_S)
        self.banner = lines
        match = next((re.search(r"listening on wss?://[^:]+:(\d+)/", line) for line in lines if "listening on" in line),
                     None)
        if match is None or not stopped:
            self.kill()
            raise RuntimeError(f"deftly-agent did not start: {lines}\n{self.stderr_text()[-2000:]}")
        self.port = int(match.group(1))
        return self

    @property
    def stderr_path(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.stderr"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return next(line.split(": ", 1)[1] for line in self.banner if line.startswith("pairing token"))

    @property
    def tls_fingerprint(self) -> str | None:
        """The sha256 (hex) of its certificate, as it printed it (None: it serves plain ws://)."""
        match = next((re.match(r"TLS certificate: sha256:([0-9a-f]+)", line) for line in self.banner
                      if line.startswith("TLS certificate")), None)
        return match.group(1) if match else None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        path = self.state_dir / "agent.log"
        return path.read_text() if path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: what a pulled plug looks like to the agent."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """SIGTERM, and wait for it to shut down."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap()

    def restart(self) -> "LocalAgent":
        """Kill it and start the same command again (a token it generated is read back from its state dir)."""
        self.kill()
        return self.start()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(10)
            if self.process.stdout:
                self.process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class CuttableProxy:
    """A TCP proxy in front of an agent whose connections :meth:`cut` drops at once."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.upstream_bytes = 0  # client-to-agent bytes carried
        self.cuts = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free port; returns it."""
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.links.append((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upstream: bool) -> None:
            try:
                while data := await source.read(1 << 16):
                    if upstream:
                        self.upstream_bytes += len(data)
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def cut(self) -> None:
        """Drop every connection now (a reset on both sides); new ones are carried again."""
        for down, up in self.links:
            down.transport.abort()
            up.transport.abort()
        self.links.clear()
        self.cuts += 1

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
