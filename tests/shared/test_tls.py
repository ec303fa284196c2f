"""Tests for shared/tls.py: the fingerprint both sides compute, and the spellings a person may type."""
from __future__ import annotations

import hashlib

import pytest

from shared.errors import InputError
from shared.tls import certificate_fingerprint, parse_fingerprint


def test_the_fingerprint_is_the_sha256_of_the_der_bytes_in_lowercase_hex() -> None:
    der = b"\x30\x82\x01\x0a certificate bytes"
    assert certificate_fingerprint(der) == hashlib.sha256(der).hexdigest()
    assert len(certificate_fingerprint(der)) == 64


def test_a_fingerprint_is_read_with_or_without_its_prefix_colons_and_capitals() -> None:
    digits = "0123456789abcdef" * 4
    colons = ":".join(digits[i:i + 2].upper() for i in range(0, 64, 2))
    assert parse_fingerprint(f"sha256:{digits}", "x") == digits
    assert parse_fingerprint(f"SHA256:{colons}", "x") == digits
    assert parse_fingerprint(f" {digits} ", "x") == digits


@pytest.mark.parametrize("text", ["sha256:abc", "sha256:" + "g" * 64, "", "sha256:" + "a" * 65])
def test_anything_else_is_refused_naming_where(text: str) -> None:
    with pytest.raises(InputError, match=r"--agent 'pi:1': .* is not a TLS fingerprint \(expected sha256:<64 hex"):
        parse_fingerprint(text, "--agent 'pi:1'")
