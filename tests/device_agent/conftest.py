"""Real agent processes on loopback for the agent's tests, and the program files they are fed.

`agents` starts `deftly-agent` processes (``desktop.engine.local.LocalAgent``) on
port 0, reading the bound port from what each prints; every process started is
killed in the fixture's teardown, whatever the test did. `agent_program` is the session's
tiny exported program copied into a directory the tests may not modify, with
the model's `tokenizer.json` beside it and a second manifest that names it
(role "tokenizer"), for the private-text-data path.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from desktop.engine.local import LocalAgent
from shared.hashing import sha256_file
from shared.manifest import Manifest

TOKEN = "test-token-0123"


@dataclass
class ProgramFiles:
    directory: Path
    manifest: Path  # step.manifest.json: .pte + .ptd (+ data, lora_a)
    manifest_with_tokenizer: Path  # the same program, also naming tokenizer.json
    data: Path  # the task's tokenised splits (.npz), usable as a shard
    tokenizer: Path


@pytest.fixture(scope="session")
def agent_program(tiny_program, smollm2_tokenizer, tmp_path_factory) -> ProgramFiles:
    directory = tmp_path_factory.mktemp("agent-program")
    source = tiny_program.export.manifest_path.parent
    for path in source.iterdir():
        shutil.copy2(path, directory / path.name)
    tokenizer = directory / "tokenizer.json"
    smollm2_tokenizer.backend_tokenizer.save(str(tokenizer))
    manifest_path = directory / "step.manifest.json"
    manifest = Manifest.load(manifest_path)
    manifest.files["tokenizer"] = tokenizer.name
    manifest.sha256[tokenizer.name] = sha256_file(tokenizer)
    with_tokenizer = directory / "text.manifest.json"
    with_tokenizer.write_text(manifest.to_json())
    return ProgramFiles(directory=directory, manifest=manifest_path, manifest_with_tokenizer=with_tokenizer,
                        data=directory / manifest.files["data"], tokenizer=tokenizer)


@pytest.fixture()
def agents(tmp_path):
    """Start agents with ``agents(*args, name=...)``; all are killed at teardown."""
    started: list[LocalAgent] = []

    def start(*args: str, name: str = "agent", token: str | None = TOKEN, advertise: bool = False) -> LocalAgent:
        extra = [*args, "--name", name, "--advertise" if advertise else "--no-advertise"]
        if token is not None:
            extra += ["--token", token]
        agent = LocalAgent(tmp_path / f"state-{name}-{len(started)}", extra)
        started.append(agent)
        return agent.start()

    try:
        yield start
    finally:
        for agent in started:
            agent.kill()


def write_task(directory: Path, data: str = "mine.csv") -> Path:
    """A task file for a private CSV (columns text, label) posed as the tiny program's task:
    its template, and its labels and answer words in its order."""
    path = directory / "task.toml"
    path.write_text(f'data = "{data}"\ntext_column = "text"\nlabel_column = "label"\n'
                    'template = "Review: {text}\\nSentiment:"\nsplit_fractions = [1.0, 0.0, 0.0]\n'
                    '[verbalizer]\nrotten = " negative"\nfresh = " positive"\n')
    return path
