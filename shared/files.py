"""Writing files so that a crash or a full disk never leaves half of one behind.

Hand-written: the standard library has no atomic write, the package that had one
(``atomicwrites``) is archived, and ``shared/`` takes no dependency beyond numpy.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` whole or not at all.

    The bytes go to a temporary file beside ``path``, are synced, and the file is
    renamed over ``path``; on any failure the temporary file is removed and the
    previous ``path``, if any, is untouched.

    Args:
        sync: fsync before the rename. Without it the file still survives the
            process being killed (the rename is atomic), but not a power cut; for
            bookkeeping rewritten many times a second.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
