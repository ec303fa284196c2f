"""Writing files so that a crash or a full disk never leaves half of one behind.

Hand-written: the standard library has no atomic write, the package that had one
(``atomicwrites``) is archived, and ``shared/`` takes no dependency beyond numpy.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes, sync: bool = True, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    The bytes go to a temporary file beside ``path``, are synced, and the file is
    renamed over ``path``; on any failure the temporary file is removed and the
    previous ``path``, if any, is untouched.

    Args:
        sync: fsync before the rename. Without it the file still survives the
            process being killed (the rename is atomic), but not a power cut; for
            bookkeeping rewritten many times a second.
        mode: the file's permission bits (e.g. 0o600 for a secret), set when the
            temporary file is created, so the bytes are never readable by others.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with open(os.open(tmp, flags, 0o666 if mode is None else mode), "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # a temporary file left by a crash keeps its old bits otherwise
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
