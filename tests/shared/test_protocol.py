"""Tests for shared/protocol.py: every message round-trips; every class of bad frame is a named ProtocolError."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InputError
from shared.events import Step
from shared.profiles import DeviceProfile
from shared.protocol import (CHUNK_HEADER, ERROR_CODES, MESSAGE_TYPES, PROTOCOL_VERSION, Ack, AgentInfo, AgentState,
                             Chunk, ChunkAck, DataReady, DataShard, DataSummary, Error, Hello, Metric, Offer,
                             OfferReply, Pause, ProfileRequest, ProfileResponse, ProtocolError, Resume, RoundDone,
                             StartRound, Status, StepMetrics, Stop, VersionError, Welcome, decode, decode_chunk,
                             decode_f32, encode, encode_chunk, encode_f32)
from shared.protocol_limits import CHUNK_BYTES

SHA = "0123456789abcdef" * 4
B = np.array([0.5, -1.25, 3.0e-7], dtype=np.float32)


def _step(step: int = 1) -> Step:
    return Step(step=step, loss=0.69, g_abs_mean=1.5, seconds=0.2, seq_len=32, rss_mb=70.0, lr=0.1,
                peak_rss_mb=75.0, device="pi4-a", round=3)


def every_message() -> list:
    info = AgentInfo(id="a1", name="pi", version="0.1.0", protocol=PROTOCOL_VERSION, runtime="executorch 1.5.1",
                     arch="aarch64", system="Linux", cores=4, memory_mb=3072.0, simulated="pi4-4gb")
    data = DataSummary(source="private", examples=120, label_shares={"negative": 0.4, "positive": 0.6}, seq_len=64)
    state = AgentState(state="paused", program=SHA, round=3, step=2, completed_round=2, last_seq=17, acked_seq=9,
                       data=data)
    profile = DeviceProfile(name="pi", layer_s_bs=(0.03,), layer_s_wide=(0.2, 0.21), head_s=0.08,
                            memory_bytes=3e9, link_bytes_per_s=7.5e6)
    return [
        Hello(id=1, desktop="lab desktop", acked=4),
        Welcome(reply_to=1, agent=info, state=state),
        ProfileRequest(id=2, probe=SHA, link_bytes_per_s=7.5e6),
        ProfileResponse(reply_to=2, profile=profile, simulated="pi4-4gb"),
        Offer(id=3, sha256=SHA, size=1 << 30, name="weights-abc.ptd"),
        OfferReply(reply_to=3, sha256=SHA, have=524288),
        ChunkAck(sha256=SHA, have=1048576, complete=False),
        DataShard(id=4, sha256=SHA),
        DataReady(reply_to=4, data=DataSummary(source="shard", examples=8, label_shares={"a": 1.0}, sha256=SHA)),
        StartRound(id=5, round=3, program=SHA, k=10, lr=0.1, eps=1e-3, seed=7, b_size=3, b=encode_f32(B)),
        StartRound(id=9, round=4, program=SHA, k=10, lr=0.1, eps=1e-3, seed=7, b_size=3, b=encode_f32(B),
                   link_bytes_per_s=1.25e4, run="0f3c9a_run-2"),
        StepMetrics(metrics=(Metric(seq=11, step=_step(1)), Metric(seq=12, step=_step(2))), simulated="pi4-4gb"),
        RoundDone(seq=13, round=3, program=SHA, device="pi4-a", steps=10, stopped=False, block_offset=1,
                  block_size=2, b_block=encode_f32(B[1:]), seconds=4.5, mean_loss=0.68, resumed_at=4,
                  paced_bytes_per_s=1.25e4),
        Pause(id=6), Resume(id=7), Stop(id=8), Ack(seq=13),
        Status(reply_to=5, state="training", round=3, step=0),
        Error(reply_to=None, code="bad_frame", message="not JSON", fatal=True),
    ]


def test_every_message_type_round_trips_through_a_text_frame() -> None:
    messages = every_message()
    assert {m.type for m in messages} == set(MESSAGE_TYPES)
    for message in messages:
        frame = encode(message)
        plain = json.loads(frame)
        assert list(plain)[:2] == ["type", "v"] and plain["v"] == PROTOCOL_VERSION
        assert decode(frame) == message


def test_float32_vectors_cross_exactly() -> None:
    start = next(m for m in every_message() if isinstance(m, StartRound))
    np.testing.assert_array_equal(decode(encode(start)).b_array(), B)
    done = next(m for m in every_message() if isinstance(m, RoundDone))
    np.testing.assert_array_equal(done.b_block_array(), B[1:])


def test_a_nan_loss_crosses() -> None:
    metrics = StepMetrics(metrics=(Metric(seq=1, step=Step(step=1, loss=math.nan, g_abs_mean=0.0, seconds=0.1,
                                                           seq_len=8, rss_mb=1.0, lr=0.1, device="d", round=0)),))
    assert math.isnan(decode(encode(metrics)).metrics[0].step.loss)


def test_chunks_round_trip_with_their_header() -> None:
    chunk = Chunk(sha256=SHA, offset=1024, total=4096, data=bytes(range(256)) * 4)
    frame = encode_chunk(chunk)
    assert len(frame) == CHUNK_HEADER.size + 1024
    assert decode_chunk(frame) == chunk


@pytest.mark.parametrize("frame, code, message", [
    ("{not json", "bad_frame", "not JSON"),
    ("[1, 2]", "bad_frame", "expected a JSON object, got list"),
    ("[" * 100000 + "]" * 100000, "bad_frame", "not usable JSON"),
    ('{"type": "hello", "id": 1, "desktop": "d"}', "bad_frame", "without a protocol version"),
    ('{"type": "hello", "v": 2, "id": 1, "desktop": "d"}', "version", "protocol version 2; this side speaks 1"),
    ('{"type": "hello", "v": "1", "id": 1, "desktop": "d"}', "version", "protocol version '1'"),
    ('{"type": "launch", "v": 1}', "bad_frame", "unknown message type 'launch'"),
    ('{"v": 1}', "bad_frame", "unknown message type 'None'"),
    ('{"type": "hello", "v": 1, "id": 1}', "bad_frame", "hello message: missing field 'desktop'"),
    ('{"type": "hello", "v": 1, "id": 1, "desktop": "d", "x": 0}', "bad_frame", "unknown field 'x'"),
    ('{"type": "hello", "v": 1, "id": "1", "desktop": "d"}', "bad_frame", r"hello message\.id: expected an integer"),
    ('{"type": "ack", "v": 1, "seq": -1}', "bad_frame", r"Ack\.seq: expected an integer >= 0"),
    ('{"type": "offer", "v": 1, "id": 1, "sha256": "xyz", "size": 1, "name": "a"}', "bad_frame", "a sha256"),
    (f'{{"type": "offer", "v": 1, "id": 1, "sha256": "{SHA}", "size": 1, "name": "../etc"}}', "bad_frame",
     "a plain file name"),
    (f'{{"type": "start_round", "v": 1, "id": 1, "round": 0, "program": "{SHA}", "k": 1, "lr": 0.1, "eps": 0.01,'
     f' "seed": 0, "b_size": 4, "b": "{encode_f32(B)}"}}', "bad_frame", "hold 3 float32 values, expected 4"),
    (f'{{"type": "start_round", "v": 1, "id": 1, "round": 0, "program": "{SHA}", "k": 0, "lr": 0.1, "eps": 0.01,'
     f' "seed": 0, "b_size": 3, "b": "{encode_f32(B)}"}}', "bad_frame", r"StartRound\.k: expected an integer >= 1"),
    (f'{{"type": "start_round", "v": 1, "id": 1, "round": 0, "program": "{SHA}", "k": 1, "lr": 0.1, "eps": 0.01,'
     f' "seed": 0, "b_size": 3, "b": "@@@@"}}', "bad_frame", "not base64"),
    ('{"type": "status", "v": 1, "reply_to": null, "state": "dancing"}', "bad_frame", "expected one of idle"),
    ('{"type": "step_metrics", "v": 1, "metrics": []}', "bad_frame", "empty"),
    ('{"type": "step_metrics", "v": 1, "metrics": [{"seq": 1, "step": {"step": 1, "loss": 0.1, "g_abs_mean": 0.1,'
     ' "seconds": 0.1, "seq_len": 8, "rss_mb": 1.0, "lr": 0.1}}]}', "bad_frame", "must carry device and round"),
])
def test_each_kind_of_bad_text_frame_is_a_named_protocol_error(frame: str, code: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as caught:
        decode(frame)
    assert caught.value.code == code and isinstance(caught.value, InputError)
    if code == "version":
        assert isinstance(caught.value, VersionError)


def _chunk_frame(**change) -> bytearray:
    return bytearray(encode_chunk(Chunk(sha256=SHA, offset=0, total=8, data=b"12345678", **change)))


def test_each_kind_of_bad_binary_frame_is_a_named_protocol_error() -> None:
    cases = []
    cases.append((bytes(10), "shorter than a chunk header"))
    bad_magic = _chunk_frame()
    bad_magic[0:4] = b"XXXX"
    cases.append((bytes(bad_magic), "does not start with a chunk header"))
    short = _chunk_frame()[:-1]
    cases.append((bytes(short), "says 8 payload bytes, the frame holds 7"))
    flipped = _chunk_frame()
    flipped[-1] ^= 0xFF
    cases.append((bytes(flipped), "CRC-32 mismatch"))
    for frame, message in cases:
        with pytest.raises(ProtocolError, match=message):
            decode_chunk(frame)
    other_version = _chunk_frame()
    other_version[4] = PROTOCOL_VERSION + 1
    with pytest.raises(VersionError):
        decode_chunk(bytes(other_version))
    with pytest.raises(ProtocolError, match="limit is"):
        Chunk(sha256=SHA, offset=0, total=CHUNK_BYTES + 1, data=bytes(CHUNK_BYTES + 1))


START_ROUND = (f'{{"type": "start_round", "v": 1, "id": 1, "round": 0, "program": "{SHA}", "k": 1, "lr": 0.1, '
               f'"eps": 0.01, "seed": 0, "b_size": 3, "b": "{encode_f32(B)}"')


def test_a_start_round_without_an_allotted_rate_is_unpaced_and_one_with_a_rate_carries_it() -> None:
    # an older desktop's frame has no link_bytes_per_s at all
    assert decode(START_ROUND + "}").link_bytes_per_s is None
    assert decode(START_ROUND + ', "link_bytes_per_s": null}').link_bytes_per_s is None
    assert decode(START_ROUND + ', "link_bytes_per_s": 2500}').link_bytes_per_s == 2500.0


@pytest.mark.parametrize("run", ['""', '"a b"', '"../x"', '"' + "r" * 65 + '"', "7"])
def test_a_run_id_that_is_not_a_short_name_is_a_named_protocol_error(run: str) -> None:
    assert decode(START_ROUND + "}").run is None  # an older desktop names no run
    assert decode(START_ROUND + ', "run": "ab12"}').run == "ab12"
    with pytest.raises(ProtocolError, match=r"(StartRound|start_round message)\.run") as caught:
        decode(START_ROUND + f', "run": {run}}}')
    assert caught.value.code == "bad_frame"


@pytest.mark.parametrize("rate", ["0", "-3.5", "NaN", "Infinity", "-Infinity"])
def test_an_allotted_rate_that_is_not_finite_and_positive_is_a_named_protocol_error(rate: str) -> None:
    with pytest.raises(ProtocolError, match=r"StartRound\.link_bytes_per_s: expected a finite positive number") as caught:
        decode(START_ROUND + f', "link_bytes_per_s": {rate}}}')
    assert caught.value.code == "bad_frame"
    with pytest.raises(ProtocolError, match=r"StartRound\.link_bytes_per_s"):
        StartRound(id=1, round=0, program=SHA, k=1, lr=0.1, eps=0.01, seed=0, b_size=3, b=encode_f32(B),
                   link_bytes_per_s=float(rate))
    with pytest.raises(ProtocolError, match=r"RoundDone\.paced_bytes_per_s: expected a finite positive number"):
        RoundDone(seq=1, round=0, program=SHA, device="d", steps=1, stopped=False, block_offset=0, block_size=3,
                  b_block=encode_f32(B), seconds=0.1, paced_bytes_per_s=float(rate))


def test_values_are_checked_when_messages_are_built_in_code_too() -> None:
    with pytest.raises(ProtocolError, match="unknown code"):
        Error(reply_to=None, code="oops", message="")
    with pytest.raises(ProtocolError, match="expected 4"):
        decode_f32(encode_f32(B), 4, "b")
    assert set(ERROR_CODES) >= {"bad_frame", "version", "busy", "hash_mismatch", "wrong_model", "bad_data"}


# -- fuzz: whatever arrives, the decoder answers with a message or a ProtocolError -----------------------

VALID_FRAMES = [encode(m) for m in every_message()]
VALID_CHUNK = bytes(_chunk_frame())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _decodes_or_refuses(frame) -> None:
    """Either a ProtocolError, or a message that encodes and decodes back to itself."""
    try:
        decoded = (decode_chunk if isinstance(frame, bytes) else decode)(frame)
    except ProtocolError:
        return
    if isinstance(decoded, Chunk):
        assert decode_chunk(encode_chunk(decoded)) == decoded
    else:
        assert encode(decode(encode(decoded))) == encode(decoded)


@st.composite
def mutated_messages(draw) -> str:
    """A valid message with one field dropped, replaced by any JSON value, or one field added."""
    plain = json.loads(draw(st.sampled_from(VALID_FRAMES)))
    key = draw(st.sampled_from(sorted(plain)))
    action = draw(st.sampled_from(("drop", "replace", "add")))
    if action == "drop":
        del plain[key]
    elif action == "replace":
        plain[key] = draw(JSON_VALUES)
    else:
        plain[draw(st.text(max_size=8))] = draw(JSON_VALUES)
    return json.dumps(plain)


@st.composite
def mutated_chunks(draw) -> bytes:
    """A valid chunk frame with some bytes overwritten and possibly cut short or extended."""
    frame = bytearray(VALID_CHUNK)
    for _ in range(draw(st.integers(1, 4))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame[:draw(st.integers(0, len(frame)))]) + draw(st.binary(max_size=8))


FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text_never_crashes_the_decoder(frame: str) -> None:
    _decodes_or_refuses(frame)


@FUZZ
@given(mutated_messages())
def test_fuzz_mutated_messages_never_crash_the_decoder(frame: str) -> None:
    _decodes_or_refuses(frame)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_never_crash_the_chunk_decoder(frame: bytes) -> None:
    _decodes_or_refuses(frame)


@FUZZ
@given(mutated_chunks())
def test_fuzz_mutated_chunks_never_crash_the_chunk_decoder(frame: bytes) -> None:
    _decodes_or_refuses(frame)
