"""Tests for device_agent/advert.py: a real agent's zeroconf advert, found by a real browser on 127.0.0.1."""
from __future__ import annotations

import asyncio

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from device_agent.advert import SERVICE_TYPE


async def _browse(instance_prefix: str, timeout_s: float = 20.0) -> AsyncServiceInfo:
    zeroconf = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    found: asyncio.Queue[str] = asyncio.Queue()

    def on_change(zeroconf, service_type, name, state_change) -> None:
        if state_change is ServiceStateChange.Added and name.startswith(instance_prefix):
            found.put_nowait(name)

    browser = AsyncServiceBrowser(zeroconf.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        name = await asyncio.wait_for(found.get(), timeout_s)
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        assert await info.async_request(zeroconf.zeroconf, 3000)
        return info
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()


def test_the_advert_is_found_on_loopback_and_its_txt_carries_the_fields(agents) -> None:
    agent = agents("--simulate", "pi4-4gb", name="kitchen-pi", advertise=True)
    info = asyncio.run(_browse("kitchen-pi-"))
    txt = {key.decode(): value.decode() for key, value in info.properties.items()}
    welcome_id = agent.state_dir.joinpath("agent.json").read_text()
    assert txt["id"] in welcome_id and txt["name"] == "kitchen-pi"
    assert txt["proto"] == "1" and txt["path"] == "/deftly" and txt["sim"] == "pi4-4gb"
    assert txt["rt"].startswith("executorch ") and txt["arch"] and txt["cores"] == "4" and txt["mem"] == "3072"
    assert info.port == agent.port and info.parsed_addresses() == ["127.0.0.1"]
    assert sum(len(k) + len(v) + 2 for k, v in txt.items()) < 400  # a small TXT record
    assert any(line.startswith("advertising _deftly._tcp.local. as kitchen-pi-") for line in agent.banner)
