"""The agent's zeroconf advert: ``_deftly._tcp.local.`` with a small TXT record.

mDNS says an agent is *there*; the WebSocket (its heartbeat) says it is
*alive*, and the full profile goes over it. So the TXT record holds only what a
desktop shows in its list before connecting (keys of a few letters; well under
the 1,300 bytes one mDNS packet carries):

    id     stable agent id          name   its name
    proto  protocol version         ver    deftly package version
    rt     runtime ("executorch 1.5.1")
    arch   CPU architecture         cores  CPU cores
    mem    memory, MiB              path   the WebSocket path
    sim    the simulated device class (only on a simulated agent)
    tls    sha256 fingerprint of its certificate (only when it serves TLS)

Uses python-zeroconf's asyncio API on the agent's own event loop.
"""
from __future__ import annotations

import logging
import socket

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from shared.protocol import AgentInfo
from shared.protocol_limits import WS_PATH

log = logging.getLogger("deftly.agent.advert")
SERVICE_TYPE = "_deftly._tcp.local."


def txt_properties(info: AgentInfo) -> dict[str, str]:
    """The TXT record's keys and values (see the module docstring)."""
    properties = {"id": info.id, "name": info.name, "proto": str(info.protocol), "ver": info.version,
                  "rt": info.runtime, "arch": info.arch, "cores": str(info.cores),
                  "mem": str(int(info.memory_mb)), "path": WS_PATH}
    if info.simulated:
        properties["sim"] = info.simulated
    if info.tls_fingerprint:
        properties["tls"] = info.tls_fingerprint
    return properties


def instance_name(info: AgentInfo) -> str:
    """``<name>-<id[:8]>._deftly._tcp.local.``: readable, and unique when two agents share a name."""
    label = "".join(c if c.isalnum() or c in "-_" else "-" for c in info.name)[:40] or "agent"
    return f"{label}-{info.id[:8]}.{SERVICE_TYPE}"


class Advert:
    """Registers the agent's service on the given IPv4 addresses until :meth:`stop`."""

    def __init__(self, info: AgentInfo, port: int, addresses: list[str]) -> None:
        self.addresses = addresses
        self.service = AsyncServiceInfo(
            SERVICE_TYPE, instance_name(info), port=port, properties=txt_properties(info),
            server=f"deftly-{info.id[:8]}.local.", addresses=[socket.inet_aton(a) for a in addresses])
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        """Register the service; on failure (an OSError where multicast is refused) nothing is left open."""
        zeroconf = AsyncZeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        try:
            await (await zeroconf.async_register_service(self.service, allow_name_change=True))
        except BaseException:
            await zeroconf.async_close()
            raise
        self._zeroconf = zeroconf
        log.info("advertising %s on %s", self.service.name, ", ".join(self.addresses))

    async def stop(self) -> None:
        if self._zeroconf is None:
            return
        try:
            await (await self._zeroconf.async_unregister_service(self.service))
        finally:
            await self._zeroconf.async_close()
            self._zeroconf = None
