"""TLS certificate fingerprints: what an agent advertises and a desktop pins.

A fingerprint is the SHA-256 of the certificate's DER bytes, 64 lowercase hex
digits; people read and type it as ``sha256:<hex>`` (colons and case as other
tools print them are accepted on input).
"""
from __future__ import annotations

import hashlib
import string

from shared.errors import InputError

PREFIX = "sha256:"
HEX_DIGITS = 64


def certificate_fingerprint(der: bytes) -> str:
    """The SHA-256 of a DER certificate, as 64 lowercase hex digits."""
    return hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str, where: str) -> str:
    """``[sha256:]<hex>`` (with or without colons between bytes) → 64 lowercase hex digits.

    Raises:
        InputError: naming ``where`` and what is wrong with the text.
    """
    digits = text.strip().lower().removeprefix(PREFIX).replace(":", "")
    if len(digits) != HEX_DIGITS or any(c not in string.hexdigits for c in digits):
        raise InputError(f"{where}: {text!r} is not a TLS fingerprint (expected sha256:<{HEX_DIGITS} hex digits>, "
                         f"as the agent prints it)")
    return digits
