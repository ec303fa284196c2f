"""The agent and its protocol, measured against real `deftly-agent` processes on loopback.

`deftly bench agent` writes `bench/results/agent.json` (flat keys) and `agent.png`:

* `transfer_over_link`     a program and its weights shipped to an agent simulating a laptop
                           (`--simulate laptop`, its link shaped to 300 Mbit/s): achieved rate
                           / 300 Mbit/s, chunk acks and the agent's hashing included   (target ≥ 0.9)
* `loopback_MB_s`          the same kind of transfer to an unshaped agent, beside
                           `plain_tcp_MB_s`, the same bytes over a plain TCP socket     (target ≥ 100);
                           and per CPU-second of the agent and of the desktop, the rate
                           each side could sustain with a core of its own
* `resent_bytes_after_cut` bytes the agent had acknowledged before a cut (of the link, and a
                           kill of the agent) that were sent again after it; beside them
                           `in_flight_at_cut_bytes`, the unacknowledged window resent by design
                                                                                       (target ≤ one chunk)
* `weights_resent_on_new_plan` weights bytes sent when a second program of the same model
                           follows the first (a new plan)                               (target 0)
* `metric_latency_p99_ms`  a step's end on the agent (its `ended_at`) to the desktop's receipt,
                           on loopback, while training                                  (target ≤ 100)
* `idle_rss_mb`            the agent's resident memory in MiB, connected and idle       (target ≤ 80)
* `fuzz_frames`, `crashes` mutated frames through the codec (and some at a live agent), and
                           the failures that were not the codec's own ProtocolError   (≥ 10,000 / 0)
* `lost_acked_metrics`     metrics the desktop had acknowledged that were missing after an agent
                           was killed mid-round and restarted, and after a link was cut mid-round
                           and restored (the whole stream is checked, acknowledged or not)  (target 0)

The programs are the tiny random Llama's (2 layers, hidden 64) exported twice with
different trainable layers, so they share one weights file; the transfer figures add
a synthetic weights file of `--weights-mb` random bytes (incompressible, as weights
are to a byte compressor; the WebSocket compression is off anyway). `install_mb`
(the agent's fresh install per platform, MiB) is `deftly bench install`'s, read from the
install.json beside agent.json (`desktop.bench.install.recorded_install_mb`). Timings come from whatever else the machine is doing:
the JSON says how many cores it had and the load average at the start and end.

The ``*_mb`` keys (`idle_rss_mb`, `rss_loaded_mb`, `weights_file_mb`, `install_mb`) hold MiB (bytes / 2**20);
the ``*_MB_s`` rates are 10**6 bytes a second. The names stay: committed results use them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from desktop.bench.install import recorded_install_mb
from desktop.engine.client import AgentClient
from desktop.engine.local import CuttableProxy, LocalAgent
from shared.hashing import sha256_file
from shared.manifest import Manifest
from shared.protocol import (Ack, Chunk, Hello, Offer, ProtocolError, StartRound, decode, decode_chunk, encode,
                             encode_chunk, encode_f32)
from shared.protocol_limits import CHUNK_BYTES, CHUNK_WINDOW

LAPTOP_BYTES_PER_S = 300e6 / 8
TOKEN = "bench-token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights-mb", type=int, default=128, help="synthetic weights file, MiB (default 128)")
    parser.add_argument("--latency-steps", type=int, default=600, help="steps of the latency round (default 600)")
    parser.add_argument("--fuzz-frames", type=int, default=12000, help="mutated frames through the codec "
                        "(default 12000)")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: a temporary one)")


# -- programs ---------------------------------------------------------------------------------


def tiny_programs(directory: Path) -> tuple[Path, Path]:
    """Two tiny programs of one model (trainable layers 1 and 0-1): manifests that share a weights file."""
    from export.models import load_tokenizer, tiny_llama
    from export.program import ExportConfig, export_program

    tokenizer = load_tokenizer("smollm2", progress=lambda _m: None)
    loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=tokenizer)
    manifests = []
    for name, layers in (("plan_a", "1-1"), ("plan_b", "0-1")):
        config = ExportConfig(model="tiny", layers=layers, seq_len=32, methods=("step",), length_buckets=(16,),
                              calibrate="none")
        out = directory / name / "step.pte"
        out.parent.mkdir(parents=True, exist_ok=True)
        manifests.append(export_program(config, out, progress=lambda _m: None, loaded=loaded).manifest_path)
    return manifests[0], manifests[1]


def _start(work: Path, name: str, *args: str) -> LocalAgent:
    return LocalAgent(work / f"state-{name}", [*args, "--name", name, "--no-advertise", "--token", TOKEN]).start()


def _client(agent: LocalAgent | str, **kwargs) -> AgentClient:
    address = agent if isinstance(agent, str) else agent.address
    return AgentClient(address, TOKEN, desktop_id="bench", **{"reconnect": False, **kwargs})


# -- transfers --------------------------------------------------------------------------------


async def _send_files(agent: LocalAgent, paths: list[Path]) -> dict:
    """Ship files; the hashes are given, as a manifest gives them.

    Returns:
        ``bytes`` sent, ``seconds`` from the first offer to the last ack, and the CPU
        seconds the agent and this process spent meanwhile (what the rate costs,
        whatever else the machine is doing).
    """
    hashes = [sha256_file(p) for p in paths]
    agent_process, this_process = psutil.Process(agent.pid), psutil.Process()
    async with _client(agent) as desk:
        agent_cpu, own_cpu = _cpu(agent_process), _cpu(this_process)
        started = time.perf_counter()
        sent = 0
        for path, sha in zip(paths, hashes):
            sent += (await desk.send_file(path, sha256=sha)).sent_bytes
        return {"bytes": sent, "seconds": time.perf_counter() - started,
                "agent_cpu_s": _cpu(agent_process) - agent_cpu, "desktop_cpu_s": _cpu(this_process) - own_cpu}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _program_files(manifest_path: Path) -> list[Path]:
    manifest = Manifest.load(manifest_path)
    return [manifest.file(role, manifest_path) for role in ("program", "weights")] + [manifest_path]


def plain_tcp_rate(path: Path) -> float:
    """Bytes/s of the file's bytes over a plain TCP socket to another process that reads and drops them."""
    receiver = subprocess.Popen([sys.executable, "-c", (
        "import socket,sys\n"
        "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1); print(s.getsockname()[1], flush=True)\n"
        "c,_=s.accept(); n=0\n"
        "while (b:=c.recv(1<<20)): n+=len(b)\n"
        "c.sendall(b'k'); print(n, flush=True)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(receiver.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
            started = time.perf_counter()
            while block := f.read(CHUNK_BYTES):
                sock.sendall(block)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
            seconds = time.perf_counter() - started
        return path.stat().st_size / seconds
    finally:
        receiver.kill()
        receiver.wait()


async def _resent_after_cut(agent: LocalAgent, path: Path) -> dict:
    """Cut the link a quarter of the way through a transfer; what was sent twice."""
    proxy = CuttableProxy(agent.port)
    port = await proxy.start()
    state = {"acked_at_cut": None}

    def on_progress(have: int, size: int) -> None:
        if state["acked_at_cut"] is None and have >= size // 4:
            state["acked_at_cut"] = have
            proxy.cut()

    desk = AgentClient(f"127.0.0.1:{port}", TOKEN, desktop_id="bench")
    await desk.connect()
    try:
        transfer = await desk.send_file(path, on_progress=on_progress)
    finally:
        await desk.close()
        await proxy.close()
    resumed = transfer.resumed_at[0]
    return {"acked_at_cut": state["acked_at_cut"], "resumed_at": resumed,
            "resent_verified": max(0, state["acked_at_cut"] - resumed),
            "sent_twice": transfer.sent_bytes - transfer.size}


async def _resent_after_kill(agent: LocalAgent, path: Path) -> dict:
    """Kill the agent a quarter of the way through a transfer, restart it; what was sent twice."""
    state = {"acked_at_kill": None}
    killed = asyncio.Event()

    def on_progress(have: int, size: int) -> None:
        if state["acked_at_kill"] is None and have >= size // 4:
            state["acked_at_kill"] = have
            agent.kill()
            killed.set()

    desk = AgentClient(agent.address, TOKEN, desktop_id="bench")
    await desk.connect()
    try:
        sending = asyncio.create_task(desk.send_file(path, on_progress=on_progress))
        await killed.wait()
        await asyncio.to_thread(agent.start)
        transfer = await sending
    finally:
        await desk.close()
    resumed = transfer.resumed_at[0]
    return {"acked_at_kill": state["acked_at_kill"], "resumed_at": resumed,
            "resent_verified": max(0, state["acked_at_kill"] - resumed)}


# -- rounds -----------------------------------------------------------------------------------------


async def _prepared(desk: AgentClient, manifest_path: Path) -> str:
    sha = await desk.send_program(manifest_path)
    await desk.send_data_shard(Manifest.load(manifest_path).file("data", manifest_path))
    return sha


async def _metric_latency(agent: LocalAgent, manifest_path: Path, steps: int) -> dict:
    latencies: list[float] = []

    def on_metric(metric) -> None:
        latencies.append(time.time() - metric.step.ended_at)

    async with _client(agent, on_metric=on_metric) as desk:
        program = await _prepared(desk, manifest_path)
        b = np.zeros(Manifest.load(manifest_path).b_size, np.float32)
        started = time.perf_counter()
        done = await desk.run_round(0, program, b, k=steps, lr=0.1, eps=1e-2)
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "metrics": len(ms), "steps_per_s": done.steps / seconds, "rss_loaded_mb": psutil.Process(agent.pid)
            .memory_info().rss / 2**20, "histogram_ms": ms.tolist()}


async def _metrics_over_fault(agent: LocalAgent, manifest_path: Path, k: int, fault: str) -> dict:
    """A third of the way through a round, kill and restart the agent (``fault="kill"``) or cut its link
    (``"cut"``); then check the whole metric stream: every step's metric once, acknowledged or not."""
    proxy = CuttableProxy(agent.port) if fault == "cut" else None
    address = f"127.0.0.1:{await proxy.start()}" if proxy else agent.address
    metrics = []
    desk = AgentClient(address, TOKEN, desktop_id="bench", on_metric=metrics.append)
    await desk.connect()
    try:
        program = await _prepared(desk, manifest_path)
        b = np.zeros(Manifest.load(manifest_path).b_size, np.float32)
        await desk.start_round(0, program, b, k=k, lr=0.1, eps=1e-2)
        while len(metrics) < k // 3:
            await asyncio.sleep(0.005)
        delivered_before = len(metrics)
        if proxy is not None:
            proxy.cut()
        else:
            await asyncio.to_thread(agent.restart)
        done = await desk.round_result(0, timeout_s=300)
    finally:
        await desk.close()
        if proxy is not None:
            await proxy.close()
    steps = [m.step.step for m in metrics]
    return {"delivered_before_fault": delivered_before, "lost": len(set(range(1, k + 1)) - set(steps)),
            "duplicates": len(steps) - len(set(steps)), "round_resumed_at": done.resumed_at}


# -- fuzzing ------------------------------------------------------------------------------------------


def _seed_frames(outbox: Path) -> list[str]:
    """Real frames: what an agent sent (its outbox) and the requests a desktop sends."""
    frames = outbox.read_text().splitlines()[:50] if outbox.exists() else []
    sha = "ab" * 32
    frames += [encode(Hello(id=1, desktop="bench", acked=3)), encode(Offer(id=2, sha256=sha, size=9, name="x.pte")),
               encode(StartRound(id=3, round=1, program=sha, k=10, lr=0.1, eps=1e-3, seed=0, b_size=4,
                                 b=encode_f32(np.ones(4, np.float32)))), encode(Ack(seq=9))]
    return frames


def _mutate_text(frame: str, rng: random.Random) -> str:
    choice = rng.randrange(4)
    if choice == 0:  # a byte-level edit
        i = rng.randrange(len(frame))
        return frame[:i] + rng.choice('{}[]",:0123456789aeznul-.\\') + frame[i + rng.randrange(2):]
    if choice == 1:  # cut short
        return frame[:rng.randrange(len(frame))]
    data = json.loads(frame)
    key = rng.choice(sorted(data))
    values = [None, True, -1, 2**70, 1e308, "x" * rng.randrange(100), [], {}, [1, "a"], {"k": None}, 0.5]
    if choice == 2:
        data[key] = rng.choice(values)
    else:
        data.pop(key)
        data[rng.choice(["extra", key.upper(), ""])] = rng.choice(values)
    return json.dumps(data)


def _mutate_chunk(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[:rng.randrange(len(data) + 1)]) if rng.random() < 0.3 else bytes(data)


def fuzz_codec(seeds: list[str], frames: int, seed: int = 0) -> dict:
    """Mutated text and chunk frames through the decoder; a crash is any exception but ProtocolError."""
    rng = random.Random(seed)
    chunk = encode_chunk(Chunk(sha256="cd" * 32, offset=0, total=64, data=bytes(range(64))))
    crashes, refused = [], 0
    for n in range(frames):
        frame = _mutate_chunk(chunk, rng) if n % 4 == 3 else _mutate_text(rng.choice(seeds), rng)
        try:
            (decode_chunk if isinstance(frame, bytes) else decode)(frame)
        except ProtocolError:
            refused += 1
        except Exception as exc:  # the figure this benchmark exists to count
            crashes.append(f"{type(exc).__name__}: {exc}"[:200])
    return {"frames": frames, "refused": refused, "crashes": len(crashes), "examples": crashes[:5]}


async def fuzz_agent(agent: LocalAgent, seeds: list[str], frames: int, seed: int = 1) -> dict:
    """Mutated frames at a live agent, each after a hello on a fresh connection; it must answer and live."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    rng = random.Random(seed)
    answered = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "Deftly-Protocol": "1", "Deftly-Desktop": "fuzz"}
    for _ in range(frames):
        async with connect(f"ws://{agent.address}/deftly", additional_headers=headers, proxy=None,
                           compression=None) as ws:
            await ws.send(encode(Hello(id=1, desktop="fuzz")))
            await ws.recv()
            await ws.send(_mutate_text(rng.choice(seeds), rng))
            try:
                await asyncio.wait_for(ws.recv(), 2.0)
                answered += 1
            except (ConnectionClosed, TimeoutError):
                pass
    async with _client(agent) as desk:
        serving = desk.welcome is not None
    return {"frames": frames, "answered": answered, "agent_alive": agent.alive(), "still_serving": serving}


# -- the run ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="deftly-bench-agent-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    plan_a, plan_b = tiny_programs(work / "programs")
    weights = work / "synthetic-weights.bin"
    weights.write_bytes(np.random.default_rng(0).bytes(args.weights_mb * 2**20))
    agents: list[LocalAgent] = []

    def start(name: str, *extra: str) -> LocalAgent:
        agents.append(_start(work, name, *extra))
        return agents[-1]

    try:
        results = asyncio.run(_measure(args, work, plan_a, plan_b, weights, start))
    finally:
        for agent in agents:
            agent.kill()
    results["machine"] = {"cores": os.cpu_count(), "load_average_start": load_start,
                          "load_average_end": os.getloadavg(),
                          "note": "shared with other work while measured: timings are inflated"}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    histogram = results.pop("latency_histogram_ms")
    results["install_mb"] = recorded_install_mb(out_dir)
    (out_dir / "agent.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, histogram, out_dir / "agent.png")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


async def _measure(args, work: Path, plan_a: Path, plan_b: Path, weights: Path, start) -> dict:
    results: dict = {"chunk_bytes": CHUNK_BYTES, "chunk_window": CHUNK_WINDOW,
                     "weights_file_mb": args.weights_mb,
                     "programs": "tiny random Llama (2 layers, hidden 64), trainable layers 1 and 0-1"}
    # Idle memory: started, connected, nothing loaded.
    plain = start("loopback")
    async with _client(plain):
        results["idle_rss_mb"] = psutil.Process(plain.pid).memory_info().rss / 2**20
    # Throughput, unshaped, beside a plain socket.
    loopback = await _send_files(plain, [weights])
    results["loopback_MB_s"] = loopback["bytes"] / loopback["seconds"] / 1e6
    results["plain_tcp_MB_s"] = plain_tcp_rate(weights) / 1e6
    # Per CPU-second of each side: the rate each could sustain with a core to itself.
    results["loopback_MB_per_agent_cpu_s"] = loopback["bytes"] / loopback["agent_cpu_s"] / 1e6
    results["loopback_MB_per_desktop_cpu_s"] = loopback["bytes"] / loopback["desktop_cpu_s"] / 1e6
    # Shaped to a laptop's link: a program, its weights, and the synthetic weights.
    laptop = start("laptop", "--simulate", "laptop")
    files = _program_files(plan_a) + [weights]
    shaped = await _send_files(laptop, files)
    results["transfer_over_link"] = shaped["bytes"] / shaped["seconds"] / LAPTOP_BYTES_PER_S
    results["transfer_over_link_bytes"] = shaped["bytes"]
    results["transfer_over_link_MB_s"] = shaped["bytes"] / shaped["seconds"] / 1e6
    # A new plan: the second program of the same model.
    weights_b = Manifest.load(plan_b).file("weights", plan_b)
    async with _client(laptop) as desk:
        sent_by_name = {}
        for path in _program_files(plan_b):
            sent_by_name[path.name] = (await desk.send_file(path)).sent_bytes
    results["weights_resent_on_new_plan"] = sent_by_name[weights_b.name]
    results["new_plan_bytes_sent"] = sum(sent_by_name.values())
    results["shared_weights_file"] = weights_b.name == Manifest.load(plan_a).file("weights", plan_a).name
    # A cut link and a killed agent, mid-transfer.
    cut_target = start("cut")
    cut = await _resent_after_cut(cut_target, weights)
    kill = await _resent_after_kill(start("kill-transfer"), weights)
    results["resent_bytes_after_cut"] = max(cut["resent_verified"], kill["resent_verified"])
    results["resent_after_link_cut"] = cut
    results["resent_after_agent_kill"] = kill
    results["in_flight_at_cut_bytes"] = cut["sent_twice"] - cut["resent_verified"]
    # Metric latency while training (unshaped, loopback).
    latency = await _metric_latency(plain, plan_a, args.latency_steps)
    results["latency_histogram_ms"] = latency.pop("histogram_ms")
    results["metric_latency_p99_ms"] = latency["p99_ms"]
    results["metric_latency"] = latency
    # Nothing lost over a kill and a cut mid-round (a simulated Pi: steps slow enough to fault mid-round).
    over_kill = await _metrics_over_fault(start("kill-round", "--simulate", "pi4-4gb"), plan_a, 300, "kill")
    over_cut = await _metrics_over_fault(start("cut-round", "--simulate", "pi4-4gb"), plan_a, 300, "cut")
    results["lost_acked_metrics"] = over_kill["lost"] + over_cut["lost"]
    results["metrics_over_kill"] = over_kill
    results["metrics_over_cut"] = over_cut
    # Fuzz: the codec, and a live agent.
    seeds = _seed_frames(plain.state_dir / "outbox.jsonl")
    codec = fuzz_codec(seeds, args.fuzz_frames)
    live = await fuzz_agent(plain, seeds, 300)
    results["fuzz_frames"] = codec["frames"] + live["frames"]
    results["crashes"] = codec["crashes"] + (0 if live["agent_alive"] and live["still_serving"] else 1)
    results["fuzz_codec"] = codec
    results["fuzz_live_agent"] = live
    return results


def draw(results: dict, latency_ms: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = ["agent, loopback", "plain TCP", "agent, shaped\nto 300 Mbit/s", "300 Mbit/s"]
    values = [results["loopback_MB_s"], results["plain_tcp_MB_s"], results["transfer_over_link_MB_s"],
              LAPTOP_BYTES_PER_S / 1e6]
    bars = left.bar(labels, values, color=["black", "grey", "tab:blue", "lightsteelblue"])
    for bar, value in zip(bars, values):
        left.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center", va="bottom", fontsize=9)
    left.axhline(100, color="red", linestyle="--", linewidth=1, label="loopback target 100 MB/s")
    left.set_ylabel("MB/s")
    left.set_title(f"file transfer ({results['weights_file_mb']} MiB): over the link "
                   f"{results['transfer_over_link']:.2f} of its rate", fontsize=10)
    left.legend(fontsize=8)
    right.hist(latency_ms, bins=50, color="black")
    right.axvline(100, color="red", linestyle="--", linewidth=1, label="target p99 100 ms")
    right.set_xlabel("step end to desktop receipt (ms)")
    right.set_ylabel("metrics")
    right.set_title(f"metric latency while training: p99 {results['metric_latency_p99_ms']:.1f} ms", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
