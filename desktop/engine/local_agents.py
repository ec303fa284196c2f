"""A lab on this machine: several ``deftly-agent`` processes started, and stopped, together.

``deftly demo`` stands up a simulated lab: a few agents (``desktop.engine.local.LocalAgent``),
each a real ``deftly-agent --simulate CLASS`` process listening on loopback and advertised
there, all with one pairing token, so the engine finds them by zeroconf exactly as it finds
devices on a network and the demo can pair them. :meth:`LocalAgents.stop` ends every one it
started (SIGTERM, then SIGKILL); each also ends when the process that started it dies.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from desktop.engine.local import LocalAgent
from shared.errors import InputError


class LocalAgents:
    """Starts named, simulated agents on loopback; :meth:`stop` ends every one it started.

    Args:
        root: their state directories (``root/NAME``, kept between runs: stored programs and
            weights cross each simulated link once).
        token: the pairing token of every agent (default: a fresh random one).
    """

    def __init__(self, root: Path, token: str | None = None) -> None:
        self.root = Path(root)
        self.token = token or secrets.token_hex(8)
        self.agents: dict[str, LocalAgent] = {}

    def __enter__(self) -> "LocalAgents":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self, specs: list[tuple[str, str | None]], advertise: bool = True) -> list[LocalAgent]:
        """One agent per (name, device class or None); returns them once each listens.

        Raises:
            InputError: an agent did not start (what it printed is in the message).
        """
        started = []
        try:
            for name, simulate in specs:
                args = ["--name", name, "--token", self.token, "--advertise" if advertise else "--no-advertise"]
                agent = self.agents[name] = LocalAgent(self.root / name, args + (["--simulate", simulate]
                                                                                  if simulate else []))
                try:
                    started.append(agent.start())
                except RuntimeError as exc:
                    raise InputError(f"agent {name} did not start: {exc}") from None
        except BaseException:
            self.stop()
            raise
        return started

    def stop(self) -> None:
        """End every agent started here."""
        for agent in self.agents.values():
            agent.stop()

    @property
    def running(self) -> list[str]:
        return [name for name, agent in self.agents.items() if agent.alive()]
