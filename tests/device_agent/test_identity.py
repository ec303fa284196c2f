"""Tests for device_agent/identity.py's certificate: made once, kept, remade only when unusable, key owner-only."""
from __future__ import annotations

import os
import ssl
import stat
import sys

import pytest

from device_agent.identity import CERT_FILE, KEY_FILE, tls_identity
from shared.errors import InputError
from shared.tls import certificate_fingerprint


def test_the_certificate_is_made_once_and_kept_with_its_key_readable_by_the_owner_only(tmp_path) -> None:
    made = tls_identity(tmp_path, "a1b2")
    kept = tls_identity(tmp_path, "a1b2")
    assert kept == made  # the same files, the same fingerprint
    der = ssl.PEM_cert_to_DER_cert((tmp_path / CERT_FILE).read_text())
    assert made.fingerprint == certificate_fingerprint(der)
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [CERT_FILE, KEY_FILE]  # no temporary file left
    context = made.server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_certificate_that_is_gone_or_does_not_match_its_key_is_made_again(tmp_path) -> None:
    first = tls_identity(tmp_path, "a1b2")
    (tmp_path / CERT_FILE).unlink()
    second = tls_identity(tmp_path, "a1b2")
    assert second.fingerprint != first.fingerprint
    other = tmp_path / "other"
    other.mkdir()
    tls_identity(other, "c3d4")
    (tmp_path / KEY_FILE).write_bytes((other / KEY_FILE).read_bytes())  # a key of another certificate
    third = tls_identity(tmp_path, "a1b2")
    assert third.fingerprint not in (first.fingerprint, second.fingerprint)
    third.server_context()  # the pair made again belongs together


def test_without_the_cryptography_package_making_one_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # as if it were not installed
    with pytest.raises(InputError, match=r"--tls: .* needs the cryptography package.*pip install cryptography=="):
        tls_identity(tmp_path / "new", "a1b2")


def test_a_kept_certificate_is_served_without_the_cryptography_package(tmp_path, monkeypatch) -> None:
    made = tls_identity(tmp_path, "a1b2")
    monkeypatch.setitem(sys.modules, "cryptography", None)
    assert tls_identity(tmp_path, "a1b2") == made  # only making one needs it
