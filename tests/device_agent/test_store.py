"""Tests for device_agent/store.py: chunked receipt in order, resume after a restart, hashes checked once."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from device_agent.store import FileStore
from shared.protocol import Chunk, Offer, ProtocolError

DATA = np.random.default_rng(0).bytes(10_000)
SHA = hashlib.sha256(DATA).hexdigest()


def _offer(size: int = len(DATA), sha: str = SHA) -> Offer:
    return Offer(id=1, sha256=sha, size=size, name="weights.ptd")


def _chunk(offset: int, length: int, sha: str = SHA, total: int = len(DATA)) -> Chunk:
    return Chunk(sha256=sha, offset=offset, total=total, data=DATA[offset:offset + length])


def test_a_file_sent_in_chunks_is_stored_verified_and_never_asked_for_again(tmp_path) -> None:
    store = FileStore(tmp_path)
    assert store.offer(_offer()) == 0
    assert store.write(_chunk(0, 4000)) == (4000, False)
    assert store.write(_chunk(4000, 6000)) == (10_000, True)
    assert store.path(SHA).read_bytes() == DATA
    assert FileStore(tmp_path).offer(_offer()) == len(DATA)  # held: nothing to send
    assert store.held() == [SHA]


def test_a_transfer_cut_by_a_restart_resumes_from_the_last_chunk_written(tmp_path) -> None:
    store = FileStore(tmp_path)
    store.offer(_offer())
    store.write(_chunk(0, 3000))
    store.write(_chunk(3000, 3000))
    # A kill while the next chunk was being written leaves stray bytes past the last good one.
    with open(tmp_path / "partial" / f"{SHA}.part", "ab") as f:
        f.write(b"half a chunk")
    restarted = FileStore(tmp_path)
    assert restarted.offer(_offer()) == 6000
    assert restarted.write(_chunk(6000, 4000)) == (10_000, True)  # the hash, re-read from disk, still checks
    assert restarted.path(SHA).read_bytes() == DATA


@pytest.mark.parametrize("chunk, message", [
    (_chunk(100, 100), "chunk at offset 100, expected 0"),
    (Chunk(sha256=SHA, offset=0, total=len(DATA) + 1, data=DATA[:10]), "the offer said 10000"),
])
def test_chunks_out_of_order_or_of_another_size_are_refused_and_the_transfer_goes_on(tmp_path, chunk,
                                                                                      message) -> None:
    store = FileStore(tmp_path)
    store.offer(_offer())
    with pytest.raises(ProtocolError, match=message) as caught:
        store.write(chunk)
    assert caught.value.code == "chunk"
    assert store.write(_chunk(0, len(DATA))) == (len(DATA), True)


def test_a_chunk_past_the_end_is_refused(tmp_path) -> None:
    store = FileStore(tmp_path)
    store.offer(_offer(size=5000, sha=hashlib.sha256(DATA[:5000]).hexdigest()))
    with pytest.raises(ProtocolError, match="runs past the end"):
        store.write(Chunk(sha256=hashlib.sha256(DATA[:5000]).hexdigest(), offset=0, total=5000, data=DATA[:6000]))


def test_a_file_whose_bytes_do_not_hash_to_the_offer_is_discarded(tmp_path) -> None:
    wrong = "ab" * 32
    store = FileStore(tmp_path)
    store.offer(_offer(sha=wrong))
    with pytest.raises(ProtocolError, match="hash to .* not the offered abababababab") as caught:
        store.write(_chunk(0, len(DATA), sha=wrong))
    assert caught.value.code == "hash_mismatch"
    assert not store.has(wrong) and not list((tmp_path / "partial").iterdir())
    assert store.offer(_offer(sha=wrong)) == 0  # offered again: starts from nothing


def test_a_chunk_without_an_offer_is_out_of_place_and_an_unknown_file_is_named(tmp_path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(ProtocolError, match="before its offer") as caught:
        store.write(_chunk(0, 10))
    assert caught.value.code == "out_of_place"
    with pytest.raises(ProtocolError, match="holds no file") as caught:
        store.path(SHA)
    assert caught.value.code == "unknown_file"
