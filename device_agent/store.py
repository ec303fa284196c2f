"""The agent's file store: programs, weights, manifests and data shards, addressed by sha256.

Layout under the store's root::

    blobs/<sha256>           complete files, each verified once, when its last chunk arrived
    partial/<sha256>.part    a transfer under way: only chunks that arrived whole and in order
    partial/<sha256>.json    its offer (size, name) and how many bytes of .part are good

A transfer cut half way (a dropped link, a killed agent) resumes from the last
chunk written: :meth:`FileStore.offer` answers how many bytes it holds, and the
desktop sends from there. A file already in ``blobs/`` is never sent again.
When the last chunk arrives, the sha256 of the whole file (hashed as the
chunks arrived, or, after a restart, re-read once from the partial file) must be
the offered one; otherwise the partial file is discarded and the error says so.
Nothing re-hashes a stored file afterwards: loading trusts ``blobs/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from shared.files import write_bytes_atomic
from shared.protocol import Chunk, Offer, ProtocolError
from shared.protocol_limits import HASH_READ_BYTES

log = logging.getLogger("deftly.agent.store")


@dataclass
class _Transfer:
    """One file being received."""

    sha256: str
    size: int
    name: str
    have: int  # bytes of the partial file that are good
    hasher: "hashlib._Hash | None"  # sha256 of those bytes so far; None until re-read after a restart


class FileStore:
    """Files by sha256 in a directory; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._transfers: dict[str, _Transfer] = {}

    # -- what is held ------------------------------------------------------------------

    def has(self, sha256: str) -> bool:
        return (self.blobs / sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The stored, verified file.

        Raises:
            ProtocolError (unknown_file): the store does not hold it.
        """
        path = self.blobs / sha256
        if not path.is_file():
            raise ProtocolError(f"the agent holds no file {sha256[:12]}… (offer and send it first)", code="unknown_file")
        return path

    def held(self) -> list[str]:
        """sha256 of every complete file."""
        return sorted(p.name for p in self.blobs.iterdir() if p.is_file())

    # -- receiving ----------------------------------------------------------------------

    def offer(self, offer: Offer) -> int:
        """Register an offered file; returns the verified bytes already held (its size: complete).

        A partial file of another size for the same hash is discarded (the size is
        part of what was offered). After a restart the partial file is re-read once
        to restore its running hash; do not call this on the event loop for a big file.
        """
        if self.has(offer.sha256):
            size = (self.blobs / offer.sha256).stat().st_size
            if size != offer.size:
                raise ProtocolError(f"{offer.name}: offered as {offer.size} bytes, the stored file with that sha256 "
                                    f"has {size}", code="bad_request")
            return size
        transfer = self._transfers.get(offer.sha256)
        if transfer is None or transfer.size != offer.size:
            transfer = self._resume_from_disk(offer)
            self._transfers[offer.sha256] = transfer
        transfer.name = offer.name
        if transfer.hasher is None:
            transfer.hasher = self._rehash(transfer)
        if transfer.have == transfer.size:  # an empty file, or one whose last ack was lost
            self._finish(transfer)
        return transfer.have

    def write(self, chunk: Chunk) -> tuple[int, bool]:
        """Write one chunk in order; returns (verified bytes held, complete).

        Raises:
            ProtocolError: out_of_place (no offer for this file), chunk (wrong offset,
                past the end, another total), hash_mismatch (the completed file is not
                the offered one; it is discarded).
        """
        transfer = self._transfers.get(chunk.sha256)
        if transfer is None:
            if self.has(chunk.sha256):
                raise ProtocolError(f"chunk for {chunk.sha256[:12]}…: the file is already complete", code="chunk")
            raise ProtocolError(f"chunk for {chunk.sha256[:12]}… before its offer", code="out_of_place")
        if chunk.total != transfer.size:
            raise ProtocolError(f"{transfer.name}: chunk says the file has {chunk.total} bytes, the offer said "
                                f"{transfer.size}", code="chunk")
        if chunk.offset != transfer.have:
            raise ProtocolError(f"{transfer.name}: chunk at offset {chunk.offset}, expected {transfer.have} "
                                f"(chunks go in order from the offer's answer)", code="chunk")
        if chunk.offset + len(chunk.data) > transfer.size:
            raise ProtocolError(f"{transfer.name}: chunk [{chunk.offset}, {chunk.offset + len(chunk.data)}) runs past "
                                f"the end of the file ({transfer.size} bytes)", code="chunk")
        if not chunk.data:
            raise ProtocolError(f"{transfer.name}: empty chunk at offset {chunk.offset}", code="chunk")
        part = self._part(transfer.sha256)
        with open(part, "r+b" if part.exists() else "wb") as f:
            f.seek(chunk.offset)
            f.write(chunk.data)
            f.truncate()
        transfer.hasher.update(chunk.data)
        transfer.have += len(chunk.data)
        self._save_meta(transfer)
        if transfer.have == transfer.size:
            self._finish(transfer)
            return transfer.have, True
        return transfer.have, False

    # -- internals -----------------------------------------------------------------------

    def _part(self, sha256: str) -> Path:
        return self.partial / f"{sha256}.part"

    def _meta(self, sha256: str) -> Path:
        return self.partial / f"{sha256}.json"

    def _save_meta(self, transfer: _Transfer) -> None:
        # Written after the chunk's bytes: a kill between the two loses one chunk, never claims a bad one.
        write_bytes_atomic(self._meta(transfer.sha256), json.dumps(
            {"size": transfer.size, "name": transfer.name, "have": transfer.have}).encode(), sync=False)

    def _resume_from_disk(self, offer: Offer) -> _Transfer:
        part, meta = self._part(offer.sha256), self._meta(offer.sha256)
        have = 0
        try:
            saved = json.loads(meta.read_text())
            if saved.get("size") == offer.size and isinstance(saved.get("have"), int):
                have = min(saved["have"], part.stat().st_size, offer.size)
        except (OSError, ValueError):
            pass
        if have == 0:
            part.unlink(missing_ok=True)
        elif part.stat().st_size > have:
            os.truncate(part, have)  # bytes of a chunk whose write was cut off
        if have:
            log.info("resuming %s at %d of %d bytes", offer.name, have, offer.size)
        return _Transfer(sha256=offer.sha256, size=offer.size, name=offer.name, have=have, hasher=None)

    def _rehash(self, transfer: _Transfer) -> "hashlib._Hash":
        hasher = hashlib.sha256()
        if transfer.have:
            with open(self._part(transfer.sha256), "rb") as f:
                for block in iter(lambda: f.read(HASH_READ_BYTES), b""):
                    hasher.update(block)
        return hasher

    def _finish(self, transfer: _Transfer) -> None:
        del self._transfers[transfer.sha256]
        part = self._part(transfer.sha256)
        if transfer.size == 0:
            part.touch()
        actual = transfer.hasher.hexdigest()
        if actual != transfer.sha256:
            part.unlink(missing_ok=True)
            self._meta(transfer.sha256).unlink(missing_ok=True)
            raise ProtocolError(f"{transfer.name}: the received bytes hash to {actual[:12]}…, not the offered "
                                f"{transfer.sha256[:12]}…; discarded (send it again)", code="hash_mismatch")
        with open(part, "rb") as f:
            os.fsync(f.fileno())  # the file is the agent's from now on: make it survive a power cut
        os.replace(part, self.blobs / transfer.sha256)
        self._meta(transfer.sha256).unlink(missing_ok=True)
        log.info("stored %s (%d bytes, sha256 %s…)", transfer.name, transfer.size, transfer.sha256[:12])
