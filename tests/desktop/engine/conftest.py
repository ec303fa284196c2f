"""Fixtures for the engine's tests: a tiny model on disk, a small task, and real agents on loopback.

The agents are real ``deftly-agent`` processes (``python -m device_agent.cli``)
listening on 127.0.0.1 with a port of their own choosing and advertising on
127.0.0.1 only; every one is killed in the fixture's teardown, whatever the test
did. The tiny model is saved as a Hugging Face directory so that the engine's
export worker loads it the way it loads any local model.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from export.models import tiny_llama

ROOT = Path(__file__).resolve().parents[3]
AGENT_START_S = 60.0  # an agent imports little at start; this covers a loaded machine

POSITIVE = ["warm", "funny", "sharp", "moving", "bright", "gripping", "tender", "clever"]
NEGATIVE = ["flat", "dull", "tired", "clumsy", "hollow", "grating", "limp", "muddled"]
THINGS = ["film", "script", "cast", "ending", "score", "story"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    folder = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=smollm2_tokenizer)
    loaded.model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """A small review task (240 rows, two classes) as a task TOML beside its CSV."""
    folder = tmp_path_factory.mktemp("tiny-task")
    rows = ["review,sentiment"]
    for i in range(240):
        words, label = (POSITIVE, "positive") if i % 2 else (NEGATIVE, "negative")
        rows.append(f'"A {words[i % 8]} {THINGS[i % 6]}, {words[(i // 8) % 8]} from start to end.",{label}')
    (folder / "reviews.csv").write_text("\n".join(rows) + "\n")
    (folder / "task.toml").write_text(
        'name = "tiny_reviews"\ndata = "reviews.csv"\ntext_column = "review"\nlabel_column = "sentiment"\n'
        'template = "Review: {text} Sentiment:"\nsplit_fractions = [0.6, 0.2, 0.2]\n\n'
        '[verbalizer]\nnegative = " negative"\npositive = " positive"\n')
    return folder / "task.toml"


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    """One export cache for the session: each program is lowered once, then found there."""
    return tmp_path_factory.mktemp("export-cache")


@dataclass
class AgentProcess:
    name: str
    port: int
    token: str
    state_dir: Path
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class Agents:
    """Starts agent processes; :meth:`close` kills every one it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[AgentProcess] = []
        self.drains: list[threading.Thread] = []

    def start(self, name: str, simulate: str | None = None, token: str = "test-token", advertise: bool = True,
              state_dir: Path | None = None) -> AgentProcess:
        state_dir = state_dir or self.root / name
        command = [sys.executable, "-m", "device_agent.cli", "--name", name, "--host", "127.0.0.1", "--port", "0",
                   "--token", token, "--state-dir", str(state_dir),
                   "--advertise" if advertise else "--no-advertise"]
        if simulate:
            command += ["--simulate", simulate]
        log = open(self.root / f"{name}.out", "ab")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
        handle = AgentProcess(name, 0, token, state_dir, process)
        self.started.append(handle)
        deadline = time.monotonic() + AGENT_START_S
        assert process.stdout is not None
        for line in process.stdout:
            found = re.search(r"listening on ws://[^:]+:(\d+)", line)
            if found:
                handle.port = int(found.group(1))
            if line.startswith(("advertising", "not advertising")):
                break
            if time.monotonic() > deadline:
                break
        if not handle.port:
            handle.kill()
            raise RuntimeError(f"agent {name} did not start; see {self.root / f'{name}.out'}")
        # Keep reading its stdout so that a full pipe never blocks it; the thread ends with the process.
        drain = threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True)
        drain.start()
        self.drains.append(drain)
        return handle

    def restart(self, handle: AgentProcess, simulate: str | None = None) -> AgentProcess:
        """The same agent (state dir, name, token) started again after it was killed."""
        handle.kill()
        return self.start(handle.name, simulate, handle.token, state_dir=handle.state_dir)

    def close(self) -> None:
        for handle in self.started:
            if handle.process.poll() is None:
                handle.process.send_signal(signal.SIGTERM)
        for handle in self.started:
            try:
                handle.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                handle.kill()
        for drain in self.drains:
            drain.join(timeout=10)


@pytest.fixture()
def agents(tmp_path):
    pool = Agents(tmp_path / "agents")
    pool.root.mkdir()
    try:
        yield pool
    finally:
        pool.close()
