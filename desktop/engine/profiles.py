"""What the desktop remembers between runs: its own id, the agents it paired, their profiles.

Under the cache root (``$DEFTLY_CACHE`` or ``~/.cache/deftly``)::

    desktop.json                      this desktop's stable id (agents serve one desktop at a time by it)
    agents.json                       agent id -> its pairing token and pinned TLS fingerprint (mode 0600)
    profiles/<agent id>/<probe>.json  the profile an agent measured with a probe (model and shapes)

A profile is reused until the operator asks for a new measurement (``--reprofile``,
or ``Engine.reprofile``): probing costs a device a minute, and the device has
not changed. A TLS fingerprint is pinned the first time an agent shows one; a
later connection offering another is refused (``desktop.engine.client``).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from shared.files import write_bytes_atomic
from shared.profiles import DeviceProfile
from shared.records import RecordError, from_plain, to_plain


def cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DEFTLY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deftly"


def desktop_id(cache_dir: Path | None) -> str:
    """This desktop's stable id: read, or made once and kept."""
    path = cache_root(cache_dir) / "desktop.json"
    try:
        return str(json.loads(path.read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        path.parent.mkdir(parents=True, exist_ok=True)
        new = uuid.uuid4().hex[:16]
        write_bytes_atomic(path, json.dumps({"id": new}).encode())
        return new


def agents_path(cache_dir: Path | None) -> Path:
    """The file of the agents this desktop paired: tokens and pinned TLS fingerprints."""
    return cache_root(cache_dir) / "agents.json"


def _agents(cache_dir: Path | None) -> dict[str, dict]:
    try:
        data = json.loads(agents_path(cache_dir).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def known_token(cache_dir: Path | None, agent_id: str | None) -> str | None:
    """The token this desktop paired the agent with before, if any."""
    entry = _agents(cache_dir).get(agent_id or "")
    return entry.get("token") if isinstance(entry, dict) else None


def pinned_fingerprint(cache_dir: Path | None, agent_id: str | None) -> str | None:
    entry = _agents(cache_dir).get(agent_id or "")
    return entry.get("tls_fingerprint") if isinstance(entry, dict) else None


def remember_agent(cache_dir: Path | None, agent_id: str, token: str, tls_fingerprint: str | None,
                   replace_pin: bool = False) -> None:
    """Keep the token and pin the fingerprint (on first use, or in place of the pinned one), owner-readable only."""
    agents = _agents(cache_dir)
    entry = agents.get(agent_id) if isinstance(agents.get(agent_id), dict) else {}
    entry = {**entry, "token": token}
    if tls_fingerprint and (replace_pin or not entry.get("tls_fingerprint")):
        entry["tls_fingerprint"] = tls_fingerprint
    agents[agent_id] = entry
    path = agents_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(agents, indent=2).encode(), mode=0o600)
    os.chmod(path, 0o600)


def _profile_path(cache_dir: Path | None, agent_id: str, probe_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in agent_id)
    return cache_root(cache_dir) / "profiles" / safe / f"{probe_id}.json"


def cached_profile(cache_dir: Path | None, agent_id: str, probe_id: str) -> DeviceProfile | None:
    """The profile this agent measured with this probe, or None (none, or unreadable)."""
    path = _profile_path(cache_dir, agent_id, probe_id)
    try:
        return from_plain(DeviceProfile, json.loads(path.read_text()), str(path))
    except (OSError, ValueError, RecordError):
        return None


def save_profile(cache_dir: Path | None, agent_id: str, probe_id: str, profile: DeviceProfile) -> None:
    path = _profile_path(cache_dir, agent_id, probe_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(to_plain(profile), indent=2).encode())
