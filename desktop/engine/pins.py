"""Which TLS certificate an agent must present, and what the desktop remembers of it.

An agent started with ``--tls`` serves a self-signed certificate; the desktop
checks its SHA-256 fingerprint instead of a CA. The fingerprint expected of a
connection is, in this order: the one the operator typed with the address
(``--agent HOST:PORT#sha256:<hex>``), the one pinned for the agent's id in the
cache's ``agents.json`` (``desktop.engine.profiles``), the one its mDNS advert
says; with none of these the first connection's certificate is trusted and
pinned (trust on first use), with a notice. A pinned agent that presents
another certificate, or serves plain ``ws://`` again, is refused with a
per-device error naming both fingerprints and the file to edit if the change
was meant. The check itself runs inside the TLS handshake
(``desktop.engine.client``), before the token is sent; an agent added by
address, whose id is known only after its hello, is checked against its pin
once the hello says who it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from desktop.engine import profiles
from desktop.engine.client import AgentError, CertificateMismatch
from desktop.engine.discovery import Advert


class TlsMissing(AgentError):
    """An agent pinned to a TLS certificate serves plain ws:// now."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="tls")


@dataclass(frozen=True)
class TlsHint:
    """What was said of an agent's TLS before connecting: by its mDNS advert, or with its address."""

    tls: bool = False
    fingerprint: str | None = None
    via: str = ""  # "mdns", "address", or "" (nothing said: a resumed run's device)
    agent_id: str | None = None  # the id its advert says (None: typed in, its id known after the hello)


def hint(advert: Advert, before: TlsHint | None = None) -> TlsHint:
    """The hint of an advert; a plain address typed for a device known otherwise keeps what was known."""
    if advert.via == "address" and not advert.tls and before is not None:
        return before
    return TlsHint(advert.tls, advert.tls_fingerprint, advert.via, advert.id)


@dataclass(frozen=True)
class Expected:
    """What one connection to an agent must present."""

    tls: bool
    fingerprint: str | None  # None: trust the first certificate
    source: str  # "given", "pinned", "advertised", or "" (trust on first use)
    agent_id: str | None = None  # the id its pin was looked up by (None: not known before the hello)


def expected(cache_dir: Path | None, agent_id: str | None, said: TlsHint, where: str) -> Expected:
    """What a connection to this agent must present (see the module docstring).

    Raises:
        TlsMissing: its advert says plain ws://, but it is pinned to a certificate.
    """
    agent_id = agent_id or said.agent_id
    pinned = profiles.pinned_fingerprint(cache_dir, agent_id)
    if said.fingerprint and said.via == "address":
        return Expected(True, said.fingerprint, "given", agent_id)
    if pinned and said.via == "mdns" and not said.tls:
        raise _missing(cache_dir, agent_id, pinned, f"its advert at {where} says it serves plain ws://")
    if pinned:
        return Expected(True, pinned, "pinned", agent_id)
    if said.fingerprint:
        return Expected(True, said.fingerprint, "advertised", agent_id)
    return Expected(said.tls, None, "", agent_id)


def check(cache_dir: Path | None, agent_id: str, presented: str | None, wanted: Expected) -> None:
    """After the hello, the agent's id known: what it presented must be what is pinned for that id.

    Raises:
        CertificateMismatch: it presented another certificate than the one pinned.
        TlsMissing: it is pinned, and this connection was plain ws://.
    """
    pinned = profiles.pinned_fingerprint(cache_dir, agent_id)
    if pinned is None or wanted.source == "given":  # the operator's fingerprint was checked, and wins
        return
    if presented is None:
        raise _missing(cache_dir, agent_id, pinned, "it was reached over plain ws://")
    if presented != pinned:
        raise CertificateMismatch(f"its TLS certificate is sha256:{presented}, not sha256:{pinned}", pinned,
                                  presented)


def explain(exc: Exception, wanted: Expected | None, cache_dir: Path | None,
            agent_id: str | None) -> tuple[str, str] | None:
    """The message and advice for a refused certificate (None: ``exc`` is not about TLS)."""
    path = profiles.agents_path(cache_dir)
    agent_id = agent_id or (wanted.agent_id if wanted else None)
    agent = f"agent {agent_id}" if agent_id else "this agent"
    if isinstance(exc, TlsMissing):
        return str(exc), (f"start it with --tls again (its state dir keeps its certificate); if it is meant to serve "
                          f"plain ws:// now, delete the \"tls_fingerprint\" of {agent} in {path} and pair again")
    if not isinstance(exc, CertificateMismatch):
        return None
    presented, expected_fp, source = exc.presented, exc.expected, wanted.source if wanted else "pinned"
    if source == "given":
        return (f"it presented TLS certificate sha256:{presented}, not the sha256:{expected_fp} given with its "
                f"address", "check the fingerprint the agent printed at start (\"TLS certificate: sha256:...\")")
    if source == "advertised":
        return (f"it presented TLS certificate sha256:{presented}, not the sha256:{expected_fp} its mDNS advert "
                f"says", "another machine may be answering at its address; check the agent's banner")
    return (f"its TLS certificate changed: it presented sha256:{presented}, but this desktop pinned "
            f"sha256:{expected_fp} for {agent} in {path}",
            f"if its certificate was made again on purpose (its state dir or tls.crt was replaced), delete the "
            f"\"tls_fingerprint\" of {agent} in {path} and pair again; otherwise do not: another machine may be "
            f"answering at its address")


def remember(cache_dir: Path | None, agent_id: str, token: str, presented: str | None,
             wanted: Expected) -> str | None:
    """Keep the token and pin what it presented; returns a notice when a certificate was newly pinned."""
    before = profiles.pinned_fingerprint(cache_dir, agent_id)
    profiles.remember_agent(cache_dir, agent_id, token, presented, replace_pin=wanted.source == "given")
    if presented is None or presented == before:
        return None
    path = profiles.agents_path(cache_dir)
    if wanted.source == "given":
        return (f"pinned its TLS certificate sha256:{presented} (given with its address) in {path}"
                + (f", in place of sha256:{before}" if before else ""))
    if wanted.source == "advertised":
        return f"pinned its TLS certificate sha256:{presented}, the one its advert says, in {path}"
    return (f"trusted its TLS certificate sha256:{presented} on first use and pinned it in {path} (to check it "
            f"from the first connection, add it as HOST:PORT#sha256:<the fingerprint the agent prints>)")


def _missing(cache_dir: Path | None, agent_id: str | None, pinned: str, what: str) -> TlsMissing:
    return TlsMissing(f"{what}, but this desktop pinned TLS certificate sha256:{pinned} for agent {agent_id} in "
                      f"{profiles.agents_path(cache_dir)}")
