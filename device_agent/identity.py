"""Who an agent is, kept in its state dir so that a restart changes nothing a desktop knows.

``agent.json`` holds the stable id (generated once); ``token`` the pairing token
(generated once unless given, readable by the owner only). Both survive restarts,
so a desktop that paired once reconnects without the operator typing anything.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import uuid
from importlib import metadata
from pathlib import Path

import psutil

from shared.files import write_bytes_atomic
from shared.protocol import PROTOCOL_VERSION, AgentInfo
from shared.protocol_limits import TOKEN_BYTES

from device_agent.simulate import DeviceClass


def agent_id(state_dir: Path) -> str:
    """The agent's stable id: read from ``agent.json``, or made and saved there."""
    path = Path(state_dir) / "agent.json"
    try:
        return str(json.loads(path.read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        new = uuid.uuid4().hex[:16]
        write_bytes_atomic(path, json.dumps({"id": new}).encode())
        return new


def pairing_token(state_dir: Path, given: str | None) -> str:
    """The token a desktop must present: ``given`` (and kept), or the one kept, or a new one."""
    path = Path(state_dir) / "token"
    if given is None and path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    token = given if given is not None else secrets.token_hex(TOKEN_BYTES)
    write_bytes_atomic(path, token.encode())
    os.chmod(path, 0o600)
    return token


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def agent_info(agent: str, name: str, simulated: DeviceClass | None) -> AgentInfo:
    """What the agent says about itself (a simulated one: its class's cores and memory)."""
    return AgentInfo(
        id=agent, name=name, version=_version("deftly"), protocol=PROTOCOL_VERSION,
        runtime=f"executorch {_version('executorch')}", arch=platform.machine() or "unknown",
        system=platform.system() or "unknown",
        cores=simulated.cores if simulated else (psutil.cpu_count(logical=True) or 1),
        memory_mb=round((simulated.memory_bytes if simulated else psutil.virtual_memory().total) / 2**20, 1),
        simulated=simulated.name if simulated else None)
