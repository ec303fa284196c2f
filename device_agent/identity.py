"""Who an agent is, kept in its state dir so that a restart changes nothing a desktop knows.

``agent.json`` holds the stable id (generated once); ``token`` the pairing token
(generated once unless given, readable by the owner only). Both survive restarts,
so a desktop that paired once reconnects without the operator typing anything.
With ``--tls``, ``tls.crt`` and ``tls.key`` (owner only) are its self-signed
certificate (ECDSA P-256), made once the same way: a desktop pins its
fingerprint on first use, so a new certificate means a new pairing.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import secrets
import ssl
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from shared.errors import InputError
from shared.files import write_bytes_atomic
from shared.protocol import PROTOCOL_VERSION, AgentInfo
from shared.protocol_limits import TOKEN_BYTES
from shared.tls import certificate_fingerprint

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
    write_bytes_atomic(path, token.encode(), mode=0o600)
    os.chmod(path, 0o600)
    return token


CERT_FILE, KEY_FILE = "tls.crt", "tls.key"
CERT_VALIDITY_DAYS = 20 * 365  # desktops check the pinned fingerprint, not the dates: long enough never to matter
CRYPTOGRAPHY_PIN = "cryptography==50.0.2"  # the version the agent extra and requirements-agent.txt pin


@dataclass(frozen=True)
class TlsIdentity:
    """The agent's certificate: its files and its fingerprint (sha256 of the DER, hex)."""

    cert: Path
    key: Path
    fingerprint: str

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSL context serving this certificate (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        return context


def tls_identity(state_dir: Path, agent: str) -> TlsIdentity:
    """The certificate kept in the state dir, or a new one made and kept there (both files, or neither usable).

    Raises:
        InputError: a certificate must be made and the ``cryptography`` package is missing.
    """
    cert, key = Path(state_dir) / CERT_FILE, Path(state_dir) / KEY_FILE
    kept = _kept_identity(cert, key)
    if kept is not None:
        return kept
    key_pem, cert_pem = _self_signed(agent)
    write_bytes_atomic(key, key_pem, mode=0o600)  # the key first: a cert without its key is made again
    write_bytes_atomic(cert, cert_pem)
    made = _kept_identity(cert, key)
    assert made is not None, "a certificate just made does not load"
    return made


def _kept_identity(cert: Path, key: Path) -> TlsIdentity | None:
    """The kept certificate if both files are there and belong together (the key loads with the cert)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(cert.read_text())
        identity = TlsIdentity(cert, key, certificate_fingerprint(der))
        identity.server_context()
    except (OSError, ValueError, ssl.SSLError):
        return None
    return identity


def _self_signed(agent: str) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a self-signed certificate for it, both PEM."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise InputError(f"--tls: making the agent's certificate needs the cryptography package, which is not "
                         f"installed: pip install {CRYPTOGRAPHY_PIN} (requirements-agent.txt lists it)") from None
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"deftly-agent {agent}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
                   .sign(private, hashes.SHA256()))
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def agent_info(agent: str, name: str, simulated: DeviceClass | None, tls_fingerprint: str | None = None) -> AgentInfo:
    """What the agent says about itself (a simulated one: its class's cores and memory)."""
    return AgentInfo(
        id=agent, name=name, version=_version("deftly"), protocol=PROTOCOL_VERSION,
        runtime=f"executorch {_version('executorch')}", arch=platform.machine() or "unknown",
        system=platform.system() or "unknown",
        cores=simulated.cores if simulated else (psutil.cpu_count(logical=True) or 1),
        memory_mb=round((simulated.memory_bytes if simulated else psutil.virtual_memory().total) / 2**20, 1),
        simulated=simulated.name if simulated else None, tls_fingerprint=tls_fingerprint)
