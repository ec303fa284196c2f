"""Atomic file writes: whole or not at all."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.files import write_bytes_atomic


def test_write_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_bytes_atomic(path, b"old")
    write_bytes_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    write_bytes_atomic(path, b"old")

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shared.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_secret_is_written_with_its_mode_from_the_start(tmp_path: Path) -> None:
    # The temporary file is created with the mode, so the bytes are never readable by others on the way.
    import os
    import stat

    path = tmp_path / "tls.key"
    seen: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("shared.files.os.fsync", fsync)
        write_bytes_atomic(path, b"secret", mode=0o600)
    assert seen == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    write_bytes_atomic(path, b"public")  # without a mode: the usual bits
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
