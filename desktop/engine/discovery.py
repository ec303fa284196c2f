"""Finding agents: python-zeroconf's asyncio browser on ``_deftly._tcp.local.``, and addresses typed in.

mDNS only means "seen": an advert says who an agent is and where it listens;
whether it is alive is for its WebSocket's heartbeat to say. Multicast is
blocked on many Wi-Fi networks and on Android, so an agent can always be added
by ``host:port`` as well (:func:`parse_address`).

An agent serving TLS (``deftly-agent --tls``) advertises its certificate's
fingerprint (TXT ``tls``); typed in, it is ``wss://HOST:PORT`` (trusted on first
use) or ``HOST:PORT#sha256:<hex>`` (checked from the first connection).

:class:`Browser` is the thin transport edge: it turns zeroconf's callbacks into
:class:`Advert` records passed to ``on_seen`` / ``on_gone`` on the event loop.
:func:`advert_from_txt` is the pure part, tested on its own.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Callable

from shared.errors import InputError
from shared.tls import PREFIX as FINGERPRINT_PREFIX
from shared.tls import parse_fingerprint

SERVICE_TYPE = "_deftly._tcp.local."
RESOLVE_TIMEOUT_MS = 3000  # how long to wait for an advert's SRV/TXT/A records
# TXT keys the engine reads, each with the spellings an agent may use; unknown keys are ignored.
TXT_KEYS = {
    "id": ("id",),
    "name": ("name",),
    "protocol": ("protocol", "proto", "pv"),
    "version": ("version", "ver"),
    "simulated": ("simulated", "sim"),
    "tls_fingerprint": ("tls_fingerprint", "fingerprint", "fp", "tls"),
    "arch": ("arch",),
    "cores": ("cores",),
    "memory_mb": ("mem", "memory_mb"),
    "runtime": ("rt", "runtime"),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Advert:
    """What an agent says about itself before any connection."""

    id: str | None  # its stable id (None when the advert does not carry one, or for an address typed in)
    name: str
    host: str
    port: int
    protocol: int | None = None
    version: str | None = None
    simulated: str | None = None
    tls_fingerprint: str | None = None  # advertised (mDNS), or given by the operator (address)
    via: str = "mdns"  # "mdns" or "address"
    service: str | None = None  # the mDNS service name, to match its removal
    arch: str | None = None  # what the agent says of itself, for its card before it is paired
    cores: int | None = None
    memory_mb: float | None = None
    runtime: str | None = None
    tls: bool = False  # it serves wss:// (advertised with a fingerprint, or typed as wss:// or with one)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int, str | None]:
    """``[ws://|wss://][TOKEN@]HOST:PORT[#sha256:HEX]`` → (host, port, token or None).

    Raises:
        InputError: naming the text and what is wrong with it.
    """
    return _address_parts(text)[:3]


def advert_from_address(text: str) -> tuple[Advert, str | None]:
    """An agent typed in (``--agent``, "add by address"): its advert and the token given with it, if any.

    ``wss://`` or a ``#sha256:<hex>`` fingerprint says it serves TLS; the fingerprint, if given,
    is the one its certificate must have.

    Raises:
        InputError: naming the text and what is wrong with it.
    """
    host, port, token, tls, fingerprint = _address_parts(text)
    return Advert(None, f"{host}:{port}", host, port, tls_fingerprint=fingerprint, via="address", tls=tls), token


def _address_parts(text: str) -> tuple[str, int, str | None, bool, str | None]:
    """(host, port, token, tls, fingerprint) of an address typed in; see :func:`parse_address`."""
    spec = text.strip()
    scheme, found, rest = spec.partition("://")
    if not found:
        scheme, rest = "", spec
    elif scheme.lower() not in ("ws", "wss"):
        raise InputError(f"--agent {text!r}: {scheme}:// is not an agent's scheme (ws:// or wss://)")
    rest, hashed, pin = rest.partition("#")
    fingerprint = None
    if hashed:
        if scheme.lower() == "ws":
            raise InputError(f"--agent {text!r}: a fingerprint is for a TLS agent (wss://), not ws://")
        if not pin.lower().startswith(FINGERPRINT_PREFIX):
            raise InputError(f"--agent {text!r}: expected #{FINGERPRINT_PREFIX}<hex> after the address")
        fingerprint = parse_fingerprint(pin, f"--agent {text!r}")
    host, port, token = _host_port_token(text, rest.split("/", 1)[0])  # the path the agent prints is its only one
    return host, port, token, scheme.lower() == "wss" or fingerprint is not None, fingerprint


def _host_port_token(text: str, spec: str) -> tuple[str, int, str | None]:
    token = None
    if "@" in spec:
        token, spec = spec.rsplit("@", 1)
        if not token:
            raise InputError(f"--agent {text!r}: empty token before '@'")
    if spec.startswith("["):  # [v6]:port
        host, _, port_text = spec[1:].partition("]:")
    else:
        host, _, port_text = spec.rpartition(":")
    if not host or not port_text:
        raise InputError(f"--agent {text!r}: expected HOST:PORT (e.g. 192.168.1.20:8765)")
    try:
        port = int(port_text)
    except ValueError:
        raise InputError(f"--agent {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise InputError(f"--agent {text!r}: port {port} is outside 1-65535")
    return host, port, token


def advert_from_txt(properties: dict[bytes | str, bytes | str | None], host: str, port: int,
                    service: str | None = None) -> Advert:
    """An :class:`Advert` from a service's TXT properties (bytes or text) and its address."""
    text: dict[str, str] = {}
    for key, value in properties.items():
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if value is None:
            continue
        text[k.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    def first(field: str) -> str | None:
        return next((text[k] for k in TXT_KEYS[field] if text.get(k)), None)

    protocol, advertised = first("protocol"), first("tls_fingerprint")
    try:
        fingerprint = parse_fingerprint(advertised, f"{service or host}: TXT tls") if advertised else None
    except InputError as exc:  # still a TLS agent: the connection pins what it presents
        log.warning("%s", exc)
        fingerprint = None
    name = first("name") or (service.split(".")[0] if service else f"{host}:{port}")
    cores, memory = first("cores"), first("memory_mb")
    return Advert(id=first("id"), name=name, host=host, port=port,
                  protocol=int(protocol) if protocol and protocol.isdigit() else None, version=first("version"),
                  simulated=first("simulated"), tls_fingerprint=fingerprint, service=service,
                  arch=first("arch"), cores=int(cores) if cores and cores.isdigit() else None,
                  memory_mb=float(memory) if memory and memory.isdigit() else None, runtime=first("runtime"),
                  tls=advertised is not None)


class Browser:
    """Browse ``_deftly._tcp.local.`` and report adverts as they come and go.

    Args:
        on_seen: called with each new or changed advert (on the event loop).
        on_gone: called with the advert of a service that left.
        interfaces: the addresses to bind mDNS to (e.g. ``["127.0.0.1"]`` in tests);
            None: every interface.
    """

    def __init__(self, on_seen: Callable[[Advert], None], on_gone: Callable[[Advert], None],
                 interfaces: list[str] | None = None) -> None:
        self.on_seen, self.on_gone = on_seen, on_gone
        self.interfaces = interfaces
        self._zeroconf = None
        self._browser = None
        self._known: dict[str, Advert] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        from zeroconf import IPVersion, InterfaceChoice
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        self._loop = asyncio.get_running_loop()
        self._zeroconf = AsyncZeroconf(interfaces=self.interfaces or InterfaceChoice.All,
                                       ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._changed])

    def _changed(self, zeroconf, service_type: str, name: str, state_change) -> None:
        # zeroconf calls this on its own loop thread or ours; hop onto ours either way.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._schedule, service_type, name, state_change.name)

    def _schedule(self, service_type: str, name: str, change: str) -> None:
        if change == "Removed":
            advert = self._known.pop(name, None)
            if advert is not None:
                self.on_gone(advert)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        if self._zeroconf is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zeroconf.zeroconf, RESOLVE_TIMEOUT_MS):
            log.info("mDNS: %s did not answer with its address", name)
            return
        addresses = [a for a in info.parsed_addresses() if _is_ipv4(a)]
        if not addresses or not info.port:
            return
        advert = advert_from_txt(info.properties or {}, addresses[0], int(info.port), service=name)
        if self._known.get(name) != advert:
            self._known[name] = advert
            self.on_seen(advert)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
            self._zeroconf = None


def _is_ipv4(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address)
    except ValueError:
        return False
