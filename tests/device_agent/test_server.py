"""Faults and bad input against real `deftly-agent` processes on loopback.

Each case checks three things: the desktop gets a clear error on the wire, the
agent's log says what it refused, and the agent keeps serving (a fresh
connection after the fault says hello and gets an answer). The kill, cut and
restore cases also check that no acknowledged metric, stored file or finished
round is lost.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from desktop.engine.client import AgentBusy, AgentClient, AuthError, RequestFailed, VersionMismatch
from desktop.engine.local import CuttableProxy
from shared.hashing import sha256_file
from shared.manifest import Manifest
from shared.protocol import (Chunk, Error, Hello, Offer, OfferReply, ProtocolError, StartRound, Welcome, decode,
                             encode, encode_chunk, encode_f32)
from shared.protocol_limits import DESKTOP_HEADER, MAX_FRAME_BYTES, PROTOCOL_HEADER, TOKEN_HEADER, WS_PATH
from shared.task_data import save_splits
from tests.device_agent.conftest import TOKEN, write_task

B_SIZE = 768  # the tiny program's adapter
LR, EPS = 0.1, 1e-2


def run(coro, timeout_s: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def client(agent, desktop: str = "desk-A", **kwargs) -> AgentClient:
    return AgentClient(agent.address, agent.token, desktop_id=desktop, **{"reconnect": False, **kwargs})


async def raw(agent, token: str | None = TOKEN, version: str = "1", desktop: str = "raw-desktop"):
    headers = {PROTOCOL_HEADER: version, DESKTOP_HEADER: desktop}
    if token is not None:
        headers[TOKEN_HEADER] = f"Bearer {token}"
    return await connect(f"ws://{agent.address}{WS_PATH}", additional_headers=headers, proxy=None, compression=None,
                         max_size=None)


async def raw_hello(ws) -> Welcome:
    await ws.send(encode(Hello(id=1, desktop="raw")))
    welcome = decode(await ws.recv())
    assert isinstance(welcome, Welcome)
    return welcome


async def still_serves(agent) -> None:
    async with client(agent, desktop="desk-check") as check:
        assert check.welcome.agent.id


# -- the opening handshake ---------------------------------------------------------------------------------


def test_a_wrong_token_no_token_and_another_protocol_are_refused_before_any_frame(agents, monkeypatch) -> None:
    agent = agents()

    async def go() -> None:
        with pytest.raises(AuthError, match="HTTP 401: wrong pairing token"):
            await AgentClient(agent.address, "not-the-token", desktop_id="d", reconnect=False).connect()
        with pytest.raises(InvalidStatus) as caught:
            await raw(agent, token=None)
        assert caught.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as caught:
            await raw(agent, version="2")
        assert caught.value.response.status_code == 400
        monkeypatch.setattr("desktop.engine.client.PROTOCOL_VERSION", 2)
        with pytest.raises(VersionMismatch, match="protocol version '2'; this agent speaks 1"):
            await client(agent).connect()
        monkeypatch.undo()
        await still_serves(agent)

    run(go())
    log = agent.log()
    assert "401 wrong pairing token" in log and "401 no pairing token" in log and "400 protocol version '2'" in log


def test_a_second_desktop_is_told_the_agent_is_busy_and_may_connect_once_the_first_leaves(agents) -> None:
    agent = agents()

    async def go() -> None:
        first = client(agent, desktop="desk-A")
        await first.connect()
        with pytest.raises(AgentBusy, match="HTTP 409: busy: serving desktop desk-A"):
            await client(agent, desktop="desk-B").connect()
        await first.close()
        async with client(agent, desktop="desk-B") as second:
            assert second.welcome.state.state == "idle"

    run(go())
    assert "409 busy: serving desktop desk-A" in agent.log()


# -- frames that break the protocol: Error, then close 1008 -------------------------------------------------


def _bad_frames(sha: str) -> list[tuple[str, object, str, str]]:
    chunk = encode_chunk(Chunk(sha256=sha, offset=0, total=4, data=b"abcd"))
    return [
        ("malformed JSON", '{"type": "offer", "v": 1, "id": ', "bad_frame", "not JSON"),
        ("a message of the wrong shape", json.dumps({"type": "offer", "v": 1, "id": 2, "sha256": sha,
                                                      "size": "large", "name": "x"}),
         "bad_frame", "offer message.size: expected an integer"),
        ("an unknown type", '{"type": "format_disk", "v": 1}', "bad_frame", "unknown message type 'format_disk'"),
        ("another protocol version", encode(Hello(id=2, desktop="x")).replace('"v":1', '"v":7'), "version",
         "protocol version 7"),
        ("a binary frame before an offer", chunk, "out_of_place", "before its offer"),
        ("a message only agents send", encode(OfferReply(reply_to=1, sha256=sha, have=0)), "out_of_place",
         "offer_reply is a message the agent sends"),
        ("a start_round allotted no rate at all", encode(StartRound(
            id=2, round=0, program=sha, k=1, lr=LR, eps=EPS, seed=0, b_size=1, b=encode_f32(np.zeros(1)),
            link_bytes_per_s=1.0)).replace('"link_bytes_per_s":1.0', '"link_bytes_per_s":0'), "bad_frame",
         "StartRound.link_bytes_per_s: expected a finite positive number, got 0"),
    ]


def test_each_frame_that_breaks_the_protocol_gets_an_error_and_1008_and_the_agent_keeps_serving(agents) -> None:
    agent = agents()
    sha = hashlib.sha256(b"abcd").hexdigest()

    async def go() -> None:
        for what, frame, code, message in _bad_frames(sha):
            ws = await raw(agent)
            await raw_hello(ws)
            await ws.send(frame)
            error = decode(await ws.recv())
            assert isinstance(error, Error) and error.fatal, what
            assert error.code == code and message in error.message, (what, error)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008, what
        ws = await raw(agent)  # before hello, anything else is out of place
        await ws.send(encode(Offer(id=1, sha256=sha, size=4, name="x")))
        error = decode(await ws.recv())
        assert error.code == "out_of_place" and "offer before hello" in error.message
        await ws.close()
        await still_serves(agent)

    run(go())
    log = agent.log()
    for _, _, code, message in _bad_frames(sha):
        assert f"{code} (closing): " in log and message in log


def test_a_frame_over_the_limit_is_refused_with_1009(agents) -> None:
    agent = agents()

    async def go() -> None:
        ws = await raw(agent)
        await raw_hello(ws)
        await ws.send("x" * (MAX_FRAME_BYTES + 1))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1009
        await still_serves(agent)

    run(go())
    assert f"a frame over {MAX_FRAME_BYTES} bytes: closed with 1009" in agent.log()


# -- files ---------------------------------------------------------------------------------------------------


def test_chunks_out_of_order_or_past_the_end_are_refused_and_the_transfer_can_go_on(agents) -> None:
    agent = agents()
    data = bytes(range(256)) * 40
    sha = hashlib.sha256(data).hexdigest()

    async def go() -> None:
        ws = await raw(agent)
        await raw_hello(ws)
        await ws.send(encode(Offer(id=5, sha256=sha, size=len(data), name="blob")))
        assert decode(await ws.recv()) == OfferReply(reply_to=5, sha256=sha, have=0)
        for offset, payload, message in [(1000, data[1000:2000], "chunk at offset 1000, expected 0"),
                                         (0, data + b"extra", "runs past the end")]:
            total = len(data)
            await ws.send(encode_chunk(Chunk(sha256=sha, offset=offset, total=total, data=payload)))
            error = decode(await ws.recv())
            assert error.code == "chunk" and not error.fatal and message in error.message
            assert error.reply_to == 5
        await ws.send(encode_chunk(Chunk(sha256=sha, offset=0, total=len(data), data=data)))
        ack = decode(await ws.recv())
        assert ack.complete and ack.have == len(data)
        await ws.close()

    run(go())
    assert "chunk at offset 1000, expected 0" in agent.log()
    assert (agent.state_dir / "store" / "blobs" / sha).read_bytes() == data


def test_a_file_whose_hash_does_not_match_is_discarded_and_a_stored_file_is_not_sent_again(agents, tmp_path) -> None:
    agent = agents()
    blob = tmp_path / "weights.ptd"
    blob.write_bytes(np.random.default_rng(1).bytes(1_500_000))

    async def go() -> None:
        async with client(agent, chunk_bytes=256 * 1024) as desk:
            with pytest.raises(RequestFailed, match="not the offered 000000000000…; discarded") as caught:
                await desk.send_file(blob, sha256="0" * 64)
            assert caught.value.code == "hash_mismatch"
            first = await desk.send_file(blob)
            again = await desk.send_file(blob)
            assert first.sent_bytes == blob.stat().st_size and first.skipped_bytes == 0
            assert again.sent_bytes == 0 and again.skipped_bytes == blob.stat().st_size

    run(go())
    assert "discarded" in agent.log()
    assert not (agent.state_dir / "store" / "blobs" / ("0" * 64)).exists()


# -- programs, data and rounds --------------------------------------------------------------------------------


def _edited_program(agent_program, tmp_path: Path, edit) -> Path:
    """A copy of the tiny program whose manifest (and files) ``edit(directory, manifest)`` changes."""
    directory = tmp_path / "edited"
    shutil.copytree(agent_program.directory, directory)
    manifest = Manifest.load(directory / "step.manifest.json")
    edit(directory, manifest)
    for name in list(manifest.sha256):
        manifest.sha256[name] = sha256_file(directory / name)
    path = directory / "step.manifest.json"
    path.write_text(manifest.to_json())
    return path


def test_a_pte_that_is_not_a_program_and_a_manifest_for_another_model_are_refused(agents, agent_program,
                                                                                tmp_path) -> None:
    agent = agents()

    def garbage_pte(directory: Path, manifest: Manifest) -> None:
        (directory / manifest.method_files["step"]).write_bytes(b"this is not a flatbuffer" * 100)

    def other_model(directory: Path, manifest: Manifest) -> None:
        manifest.model_id = "some-other-model"
        manifest.block = None  # a single-device program of that model: its block is all its layers
        manifest.b_size = 1024
        manifest.b_layout[-1] = type(manifest.b_layout[-1])(**{**manifest.b_layout[-1].__dict__, "shape": (64, 8)})

    async def go() -> None:
        async with client(agent) as desk:
            await desk.send_data_shard(agent_program.data)
            for edit, size, code, message in [(garbage_pte, B_SIZE, "not_a_program", "ExecuTorch cannot load it"),
                                              (other_model, 1024, "wrong_model", "written for another model")]:
                program = await desk.send_program(_edited_program(agent_program, tmp_path / edit.__name__, edit))
                await desk.start_round(0, program, np.zeros(size, np.float32), k=2, lr=LR, eps=EPS)
                with pytest.raises(RequestFailed, match=message) as caught:
                    await desk.round_result(0)
                assert caught.value.code == code
            good = await desk.send_program(agent_program.manifest)
            done = await desk.run_round(1, good, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS)
            assert done.steps == 2

    run(go())
    log = agent.log()
    assert "round 0 failed: not_a_program" in log and "round 0 failed: wrong_model" in log


def test_a_start_round_with_the_wrong_size_of_b_or_no_data_is_refused(agents, agent_program) -> None:
    agent = agents()

    async def go() -> None:
        async with client(agent) as desk:
            program = await desk.send_program(agent_program.manifest)
            with pytest.raises(RequestFailed, match="no training data") as caught:
                await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS)
            assert caught.value.code == "bad_data"
            await desk.send_data_shard(agent_program.data)
            with pytest.raises(RequestFailed, match="b has 700 values, the program's adapter .* has 768") as caught:
                await desk.start_round(0, program, np.zeros(700, np.float32), k=2, lr=LR, eps=EPS)
            assert caught.value.code == "bad_request"
            with pytest.raises(RequestFailed, match="holds no file") as caught:
                await desk.start_round(0, "f" * 64, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS)
            assert caught.value.code == "unknown_file"

    run(go())
    assert "bad_request: round 0: b has 700 values" in agent.log()


def test_a_data_row_that_does_not_parse_is_named_on_the_wire_and_in_the_log(agents, agent_program, tmp_path) -> None:
    shard = tmp_path / "bad-shard.npz"
    save_splits(shard, {"train": (np.ones((8, 32)), np.array([4, 4, 4, 40, 4, 4, 4, 4]), np.zeros(8))})
    task = write_task(tmp_path)
    private = tmp_path / "mine.csv"
    private.write_text("text,label\nfine,fresh\nalso fine,rotten\n\"never closed,fresh\n")
    agent = agents("--data", str(private), "--task", str(task))

    async def go() -> None:
        async with client(agent) as desk:
            assert f"{private}, line 4" in desk.welcome.state.data_error
            program = await desk.send_program(agent_program.manifest)
            with pytest.raises(RequestFailed, match="line 4") as caught:
                await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS)
            assert caught.value.code == "bad_data"
            with pytest.raises(RequestFailed, match="row 3: length below 1 or above the row width") as caught:
                await desk.send_data_shard(shard)
            assert caught.value.code == "bad_data"

    run(go())
    log = agent.log()
    assert "private data unusable" in log and "line 4" in log and "row 3: length" in log


def test_a_private_text_file_trains_on_the_device_and_only_its_counts_leave_it(agents, agent_program,
                                                                              tmp_path) -> None:
    reviews = [f"secret review number {i} about a film" for i in range(12)]
    private = tmp_path / "mine.csv"
    private.write_text("text,label\n" + "".join(f"{t},{'fresh' if i % 3 else 'rotten'}\n"
                                                for i, t in enumerate(reviews)))
    task = write_task(tmp_path)
    agent = agents("--data", str(private), "--task", str(task))
    seen: list[str] = []

    async def go() -> None:
        async with client(agent, on_metric=lambda m: seen.append(repr(m))) as desk:
            state = desk.welcome.state
            assert state.data.source == "private" and state.data.examples == 12 and state.data.sha256 is None
            assert state.data.label_shares == {"rotten": pytest.approx(4 / 12), "fresh": pytest.approx(8 / 12)}
            seen.append(repr(desk.welcome))
            program = await desk.send_program(agent_program.manifest_with_tokenizer)
            done = await desk.run_round(0, program, np.zeros(B_SIZE, np.float32), k=3, lr=LR, eps=EPS)
            assert done.steps == 3 and np.isfinite(done.mean_loss)
            seen.append(repr(done))

    run(go())
    assert not any("secret" in text for text in seen)
    assert "secret" not in agent.log()


def test_pause_resume_and_stop_take_effect_at_step_boundaries(agents, agent_program, tmp_path) -> None:
    slow = tmp_path / "slow.toml"  # a slow simulated device: each step is held to its simulated time
    slow.write_text('[[class]]\nname = "slow"\ndescription = "slow"\ncompute_factor = 20\nmemory_gib = 8\n'
                    'link_mbit_s = 10000\ncores = 1\n')
    agent = agents("--simulate", f"{slow}:slow")
    metrics = []

    async def go() -> None:
        async with client(agent, on_metric=metrics.append) as desk:
            assert desk.welcome.agent.simulated == "slow"
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=400, lr=LR, eps=EPS)
            while len(metrics) < 3:
                await asyncio.sleep(0.01)
            paused = await desk.pause()
            assert paused.state == "paused"
            await asyncio.sleep(0.5)  # a held round takes no step
            assert (await desk.pause()).step == paused.step
            assert max(m.step.step for m in metrics) == paused.step
            assert (await desk.resume()).state == "training"
            while max(m.step.step for m in metrics) < paused.step + 2:
                await asyncio.sleep(0.01)
            stopped = await desk.stop()
            done = await desk.round_result(0)
            assert done.stopped and done.steps == stopped.step < 400
            assert done.simulated == "slow"

    run(go())
    steps = [m.step.step for m in metrics]
    assert steps == list(range(1, len(steps) + 1))  # every step once, in order, paused or not
    assert {m.step.device for m in metrics} == {"agent"} and {m.step.round for m in metrics} == {0}
    sent = [json.loads(line) for line in (agent.state_dir / "outbox.jsonl").read_text().splitlines()]
    assert {frame.get("simulated") for frame in sent} == {"slow"}  # every report says it is simulated


def test_a_round_allotted_a_low_rate_moves_its_b_down_and_its_block_up_no_faster_than_that_rate(
        agents, agent_program) -> None:
    agent = agents()
    rate = 4000.0  # bytes/s: the tiny b (768 float32, 4 KiB as base64) takes over a second each way
    heard: dict[str, float] = {}
    loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731

    async def go() -> tuple[float, float, int, int]:
        async with client(agent, on_metric=lambda m: heard.update(metric=loop_time()),
                          on_round_done=lambda d: heard.update(done=loop_time())) as desk:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            b = np.zeros(B_SIZE, np.float32)
            sent = loop_time()
            await desk.start_round(0, program, b, k=2, lr=LR, eps=EPS, link_bytes_per_s=rate)
            download = loop_time() - sent  # until the agent had the whole StartRound and took it
            done = await desk.round_result(0)
            upload = heard["done"] - heard["metric"]  # the last step's metric, then the paced block
            # the same agent, asked without a rate, still runs a round (unpaced)
            again = await desk.run_round(1, program, done.b_block_array(), k=2, lr=LR, eps=EPS)
            assert again.steps == 2 and not again.stopped
            return download, upload, len(encode_f32(b)), len(done.b_block)

    download, upload, b_bytes, block_bytes = run(go())
    # lower bounds only: each frame holds at least its b's bytes, which the pace holds to the rate
    assert download >= b_bytes / rate
    assert upload >= block_bytes / rate


def test_a_round_result_replayed_after_a_restart_goes_out_at_the_rate_its_round_was_allotted(
        agents, agent_program) -> None:
    agent = agents()
    rate = 3000.0  # bytes/s: the tiny block's RoundDone (about 4.4 KB) takes about 1.5 s
    loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731
    welcomes: list[tuple[float, Welcome]] = []
    results: list[tuple[float, object]] = []

    async def go() -> None:
        desk = AgentClient(agent.address, agent.token, desktop_id="desk-A",
                           on_connection=lambda w: w and welcomes.append((loop_time(), w)),
                           on_round_done=lambda d: results.append((loop_time(), d)))
        await desk.connect()
        try:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS,
                                   link_bytes_per_s=rate)
            while not (agent.state_dir / "completed.json").exists():  # the result is in the outbox, going out
                await asyncio.sleep(0.01)
            await asyncio.to_thread(agent.restart)  # SIGKILL well before the paced frame is through
            await desk.round_result(0, timeout_s=60)
        finally:
            await desk.close()

    run(go())
    assert len(welcomes) >= 2  # the first connection's, then the restarted agent's
    welcomed, back = welcomes[-1]
    assert back.state.completed_round == 0 and back.state.last_seq > back.state.acked_seq  # held, unacknowledged
    assert len(results) == 1 and results[0][0] > welcomed  # delivered by the replay, not before the kill
    arrived, done = results[0]
    assert done.paced_bytes_per_s == rate
    due = len(encode(done).encode()) / rate  # what the rate takes for the frame (unpaced: a few ms on loopback)
    assert 0.8 * due <= arrived - welcomed <= 1.5 * due + 0.5


# -- kill, cut, restore ---------------------------------------------------------------------------------------


def _two_rounds(agent, agent_program, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The blocks two rounds return on an agent that is never interrupted (round 1 starts from round 0's b)."""
    async def go() -> tuple[np.ndarray, np.ndarray]:
        async with client(agent, desktop="reference") as desk:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            first = await desk.run_round(0, program, np.zeros(B_SIZE, np.float32), k=k, lr=LR, eps=EPS, seed=3)
            second = await desk.run_round(1, program, first.b_block_array(), k=5, lr=LR, eps=EPS, seed=3)
            return first.b_block_array(), second.b_block_array()

    return run(go())


def test_a_new_run_starts_its_trainer_from_the_seed_and_a_run_goes_on_with_its_own_after_a_restart(
        agents, agent_program) -> None:
    agent = agents()
    zeros = np.zeros(B_SIZE, np.float32)

    async def rounds(run_id: str, first: int, b: np.ndarray, count: int) -> list[np.ndarray]:
        async with client(agent, desktop="desk-runs") as desk:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            blocks = []
            for r in range(first, first + count):
                done = await desk.run_round(r, program, b, k=3, lr=LR, eps=EPS, seed=3, run=run_id)
                b = done.b_block_array()
                blocks.append(b)
            return blocks

    a0, a1 = run(rounds("run-a", 0, zeros, 2))
    (b0,) = run(rounds("run-b", 0, zeros, 1))  # the same program, data and seed, in a new run
    np.testing.assert_array_equal(b0, a0)  # not the continuation of run-a's sequence
    agent.restart()
    (b1,) = run(rounds("run-b", 1, b0, 1))
    np.testing.assert_array_equal(b1, a1)  # run-b's second round goes on from run-b's saved trainer
    assert [p.name for p in agent.state_dir.glob("trainer*.npz")] == ["trainer-run-b.npz"]


def test_an_agent_killed_mid_round_comes_back_as_itself_and_finishes_the_round_exactly(agents, agent_program) -> None:
    k = 300
    slow = agent_program.directory.parent / "kill.toml"
    slow.write_text('[[class]]\nname = "k"\ndescription = "k"\ncompute_factor = 3\nmemory_gib = 8\n'
                    'link_mbit_s = 10000\ncores = 1\n')
    agent = agents("--simulate", f"{slow}:k", name="victim", token=None)
    reference = _two_rounds(agents("--simulate", f"{slow}:k", name="reference"), agent_program, k)
    metrics, welcomes = [], []
    token = agent.token

    async def go() -> np.ndarray:
        desk = AgentClient(agent.address, agent.token, desktop_id="desk-A", on_metric=metrics.append,
                           on_connection=lambda w: w and welcomes.append(w))
        await desk.connect()
        try:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=k, lr=LR, eps=EPS, seed=3)
            while len(metrics) < 40:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(agent.restart)  # SIGKILL, then the same command line again
            done = await desk.round_result(0, timeout_s=60)
            assert done.resumed_at > 0 and done.steps == k
            await asyncio.to_thread(agent.restart)  # and once more between rounds
            second = await desk.run_round(1, program, done.b_block_array(), k=5, lr=LR, eps=EPS, seed=3)
            return done.b_block_array(), second.b_block_array()
        finally:
            await desk.close()

    b, b_next = run(go())
    assert agent.token == token and welcomes[0].agent.id == welcomes[-1].agent.id  # the same agent came back
    back = welcomes[1].state
    assert back.round == 0 and back.step >= 40 and back.state == "idle"  # it says where it stopped
    np.testing.assert_array_equal(b, reference[0])  # as if it had never been killed
    np.testing.assert_array_equal(b_next, reference[1])  # the next round goes on from the saved trainer
    steps = [m.step.step for m in metrics]
    assert steps == list(range(1, k + 6))  # every metric exactly once, none lost over the kills
    assert [m.seq for m in metrics] == sorted({m.seq for m in metrics})


def test_a_connection_cut_mid_transfer_and_mid_round_is_restored_and_loses_nothing(agents, agent_program,
                                                                                   tmp_path) -> None:
    agent = agents()
    blob = tmp_path / "big.ptd"
    blob.write_bytes(np.random.default_rng(2).bytes(6_000_000))
    metrics, progress = [], []

    async def go() -> None:
        proxy = CuttableProxy(agent.port)
        port = await proxy.start()
        desk = AgentClient(f"127.0.0.1:{port}", agent.token, desktop_id="desk-A", on_metric=metrics.append,
                           chunk_bytes=128 * 1024, window=4)
        await desk.connect()
        try:
            def on_progress(have: int, size: int) -> None:
                progress.append(have)
                if len(progress) == 12:
                    proxy.cut()

            transfer = await desk.send_file(blob, on_progress=on_progress)
            assert transfer.resumed_at and 0 < transfer.resumed_at[0] < blob.stat().st_size
            acked_at_cut = progress[11]
            assert transfer.resumed_at[0] >= acked_at_cut  # no verified chunk is sent twice
            assert 0 <= transfer.sent_bytes - blob.stat().st_size <= 4 * 128 * 1024  # at most the window again
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=150, lr=LR, eps=EPS)
            while len(metrics) < 20:
                await asyncio.sleep(0.005)
            proxy.cut()
            done = await desk.round_result(0, timeout_s=60)
            assert done.steps == 150 and not done.stopped
        finally:
            await desk.close()
            await proxy.close()

    run(go())
    assert sha256_file(agent.state_dir / "store" / "blobs" / sha256_file(blob)) == sha256_file(blob)
    assert [m.step.step for m in metrics] == list(range(1, 151))
    assert agent.log().count("desktop desk-A connected") >= 3


def test_a_simulated_device_refuses_a_program_over_its_memory_and_its_link_holds_transfers_to_its_rate(
        agents, agent_program, tmp_path) -> None:
    small = tmp_path / "small.toml"
    small.write_text('[[class]]\nname = "tiny-phone"\ndescription = "a phone with little memory"\n'
                     'compute_factor = 1\nmemory_gib = 0.05\nlink_mbit_s = 40\ncores = 2\n')
    agent = agents("--simulate", f"{small}:tiny-phone")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(np.random.default_rng(3).bytes(2_000_000))

    async def go() -> None:
        async with client(agent) as desk:
            assert desk.welcome.agent.simulated == "tiny-phone" and desk.welcome.agent.memory_mb == 51.2
            transfer = await desk.send_file(blob)
            assert transfer.rate_bytes_per_s <= 40e6 / 8 * 1.02  # never faster than the simulated link
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.start_round(0, program, np.zeros(B_SIZE, np.float32), k=2, lr=LR, eps=EPS)
            with pytest.raises(RequestFailed, match="needs about .* MiB, the tiny-phone has 51 MiB") as caught:
                await desk.round_result(0)
            assert caught.value.code == "memory"

    run(go())
    assert "round 0 failed: memory" in agent.log()


def test_a_simulated_slow_device_reports_its_last_step_when_its_clock_has_run_it(agents, agent_program,
                                                                                tmp_path) -> None:
    slow = tmp_path / "slow.toml"
    # 600x: at 200x the tiny step simulated 0.297 s on an AMD EPYC (about 1.5 ms of its core), under
    # the 0.3 s this test needs to tell the two orders apart; a faster host shrinks it further
    slow.write_text('[[class]]\nname = "slow-board"\ndescription = "600x slower than one host core"\n'
                    'compute_factor = 600\nmemory_gib = 8\nlink_mbit_s = 1000\ncores = 1\n')
    agent = agents("--simulate", f"{slow}:slow-board")
    heard: list[tuple[float, float]] = []  # (loop time a metric arrived, its step's simulated seconds)
    loop_time = lambda: asyncio.get_running_loop().time()  # noqa: E731

    async def go() -> float:
        async with client(agent, on_metric=lambda m: heard.append((loop_time(), m.step.seconds))) as desk:
            program = await desk.send_program(agent_program.manifest)
            await desk.send_data_shard(agent_program.data)
            await desk.run_round(0, program, np.zeros(B_SIZE, np.float32), k=3, lr=LR, eps=EPS)
            return loop_time()

    done_at = run(go())
    # the agent holds each step back to the device's pace and only then reports it, so the round's block
    # follows its last metric at once; reported before that wait, the block would trail it by the wait
    # (nearly the whole simulated step, which the desktop would count as upload time)
    assert len(heard) == 3
    last_at, last_seconds = heard[-1]
    assert last_seconds > 0.3  # the wait this test would see is long
    assert done_at - last_at < 0.5 * last_seconds


def test_a_profile_request_measures_the_device_with_the_probe_and_its_own_link(agents, tiny_probe, tmp_path) -> None:
    phone = tmp_path / "phone.toml"
    phone.write_text('[[class]]\nname = "phone"\ndescription = "a phone"\ncompute_factor = 1.5\nmemory_gib = 2\n'
                     'link_mbit_s = 100\ncores = 8\n')
    real, simulated = agents(name="desk-pc"), agents("--simulate", f"{phone}:phone", name="sim-phone")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(np.random.default_rng(4).bytes(6 * 2**20))

    async def go() -> None:
        async with client(real) as desk:
            probe = await desk.send_probe(tiny_probe.manifest_path)
            with pytest.raises(RequestFailed, match="has not measured its link yet") as caught:
                await desk.profile(probe)
            assert caught.value.code == "bad_request"
            await desk.send_file(blob)  # long enough to measure the link on
            measured = (await desk.profile(probe)).profile
            assert measured.name == "desk-pc" and measured.measured and measured.link_bytes_per_s > 0
            assert set(measured.measurement.method_s) == set(tiny_probe.manifest.methods)
        await asyncio.to_thread(real.restart)  # SIGKILL, then the same command line again
        async with client(real) as desk:  # it holds the probe's files: nothing crosses the link this time
            again = (await desk.profile(await desk.send_probe(tiny_probe.manifest_path))).profile
            assert again.link_bytes_per_s == pytest.approx(measured.link_bytes_per_s)  # kept across the restart
        async with client(simulated) as desk:
            reply = await desk.profile(await desk.send_probe(tiny_probe.manifest_path))
            assert reply.simulated == "phone" and reply.profile.link_bytes_per_s == 100e6 / 8
            assert 0 < reply.profile.memory_bytes < 2 * 2**30  # what the phone has left, not the host
            assert all(t > 0 for t in reply.profile.measurement.method_s.values())

    run(go())
    assert "link measured on" in real.log() and "profiling with probe" in simulated.log()
