"""Discovery: real zeroconf on 127.0.0.1, and the address and TXT parsers."""
from __future__ import annotations

import asyncio
import socket

import pytest

from desktop.engine.discovery import SERVICE_TYPE, Browser, advert_from_address, advert_from_txt, parse_address
from shared.errors import InputError


def test_parse_address_with_and_without_a_token() -> None:
    assert parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765, None)
    assert parse_address("abc123@pi.local:9000") == ("pi.local", 9000, "abc123")
    assert parse_address("[::1]:80") == ("::1", 80, None)


FINGERPRINT = "0f" * 32


def test_an_address_says_tls_with_wss_or_a_fingerprint_and_the_fingerprint_is_the_operators() -> None:
    plain, token = advert_from_address("tok@127.0.0.1:8765")
    assert (plain.tls, plain.tls_fingerprint, plain.via, plain.name, token) == \
        (False, None, "address", "127.0.0.1:8765", "tok")  # the token is not in the name a view shows
    tofu, _ = advert_from_address("wss://pi.local:8765/deftly")  # as the agent prints it
    assert (tofu.host, tofu.port, tofu.tls, tofu.tls_fingerprint) == ("pi.local", 8765, True, None)
    colons = ":".join([FINGERPRINT[:2].upper()] * 32)
    pinned, token = advert_from_address(f"tok@pi.local:8765#SHA256:{colons}")
    assert (pinned.tls, pinned.tls_fingerprint, token) == (True, FINGERPRINT, "tok")
    assert advert_from_address(f"wss://tok@pi.local:1#sha256:{FINGERPRINT}")[0].tls_fingerprint == FINGERPRINT
    assert parse_address(f"wss://tok@pi.local:1#sha256:{FINGERPRINT}") == ("pi.local", 1, "tok")
    assert advert_from_address("ws://pi.local:1")[0].tls is False


@pytest.mark.parametrize("text, message", [("pi.local", "expected HOST:PORT"), ("h:port", "not a number"),
                                           ("h:70000", "outside 1-65535"), ("@h:1", "empty token"),
                                           ("https://h:1", "https:// is not an agent's scheme"),
                                           (f"ws://h:1#sha256:{FINGERPRINT}", "a fingerprint is for a TLS agent"),
                                           ("h:1#md5:00", "expected #sha256:<hex>"),
                                           ("h:1#sha256:00", "is not a TLS fingerprint")])
def test_bad_addresses_are_named(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_address(text)


def test_advert_reads_bytes_and_tolerates_missing_keys() -> None:
    advert = advert_from_txt({b"id": b"a1", b"name": b"pi4", b"protocol": b"1", b"sim": b"pi4-4gb", b"x": None},
                             "10.0.0.2", 8765, service="pi4._deftly._tcp.local.")
    assert (advert.id, advert.name, advert.protocol, advert.simulated, advert.address) == \
        ("a1", "pi4", 1, "pi4-4gb", "10.0.0.2:8765")
    bare = advert_from_txt({}, "10.0.0.3", 1, service="lab-laptop._deftly._tcp.local.")
    assert (bare.id, bare.name, bare.protocol) == (None, "lab-laptop", None)


def test_an_advert_with_a_tls_fingerprint_is_a_tls_agent() -> None:
    advert = advert_from_txt({b"id": b"a1", b"tls": FINGERPRINT.upper().encode()}, "10.0.0.2", 8765)
    assert (advert.tls, advert.tls_fingerprint) == (True, FINGERPRINT)
    odd = advert_from_txt({b"tls": b"not-hex"}, "10.0.0.2", 8765)  # still TLS: the connection pins what it shows
    assert (odd.tls, odd.tls_fingerprint) == (True, None)
    assert advert_from_txt({b"id": b"a1"}, "10.0.0.2", 8765).tls is False


def test_advert_reads_the_hardware_an_agent_advertises() -> None:
    # The keys device_agent.advert writes: a card shows them before the device is paired.
    advert = advert_from_txt({"arch": "aarch64", "cores": "4", "mem": "3072", "rt": "executorch 1.5.1"}, "h", 1)
    assert (advert.arch, advert.cores, advert.memory_mb, advert.runtime) == ("aarch64", 4, 3072.0, "executorch 1.5.1")
    odd = advert_from_txt({"cores": "many", "mem": "-1"}, "h", 1)
    assert (odd.cores, odd.memory_mb) == (None, None)


def test_browser_sees_a_service_registered_on_loopback_and_its_removal() -> None:
    from zeroconf import IPVersion, ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    async def scenario() -> tuple[list, list]:
        seen, gone = [], []
        arrived, left = asyncio.Event(), asyncio.Event()
        advertiser = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        browser = Browser(lambda a: (seen.append(a), arrived.set()), lambda a: (gone.append(a), left.set()),
                          interfaces=["127.0.0.1"])
        info = ServiceInfo(SERVICE_TYPE, "test-agent._deftly._tcp.local.", port=8765,
                           addresses=[socket.inet_aton("127.0.0.1")], server="test-agent.local.",
                           properties={"id": "id-1", "name": "test-agent", "protocol": "1"})
        try:
            await advertiser.async_register_service(info)
            await browser.start()
            await asyncio.wait_for(arrived.wait(), 15)
            await advertiser.async_unregister_service(info)
            await asyncio.wait_for(left.wait(), 15)
        finally:
            await browser.close()
            await advertiser.async_close()
        return seen, gone

    seen, gone = asyncio.run(scenario())
    assert [(a.id, a.name, a.address) for a in seen] == [("id-1", "test-agent", "127.0.0.1:8765")]
    assert [a.id for a in gone] == ["id-1"]
