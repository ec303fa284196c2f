"""Programs for a plan, exported in a worker process with structured progress.

Lowering a program takes torch, transformers and ExecuTorch's exporter, whole
minutes on a cold cache and more than a gigabyte of memory. The engine keeps
its event loop (the agents' heartbeats, the metrics, the views) responsive by
running the exporter in a separate process (``desktop.engine.export_worker``):
the request goes in as a JSON file, progress comes back as JSON lines (the
exporter's ``export.progress.ExportProgress`` records) that become
:class:`desktop.engine.events.ExportUpdate` events, and the result is
the exported manifests' paths. The exporter's own warnings go to
``<run>/export.log``, not to the operator's terminal.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from desktop.engine.events import ExportUpdate
from desktop.engine.job import JobSpec
from shared.errors import InputError
from shared.records import from_plain, to_plain

WORKER = "desktop.engine.export_worker"


@dataclass(frozen=True)
class ExportRequest:
    """What to export: the job's probe, its eval program, and one program per block."""

    job: JobSpec
    out_dir: str  # where the programs' files go (a run's programs/ folder)
    cache_dir: str | None = None  # the export cache (default: the exporter's)
    probe: bool = False
    eval: bool = False
    blocks: tuple[tuple[int, int], ...] = ()  # (first_layer, last_layer) of each block program


@dataclass(frozen=True)
class ExportResult:
    """Manifest paths of what was exported; a block's key is ``"first-last"``."""

    probe: str | None = None
    eval: str | None = None
    blocks: dict[str, str] = field(default_factory=dict)
    from_cache: int = 0  # programs (or, for a plan, lowered units) found in the cache
    lowered: int = 0  # ... that had to be lowered
    seconds: float = 0.0


def block_key(first_layer: int, last_layer: int) -> str:
    return f"{first_layer}-{last_layer}"


async def run_export(request: ExportRequest, on_progress: Callable[[ExportUpdate], None],
                     log_path: Path | None = None) -> ExportResult:
    """Export in a worker process; progress as events; the result once it is done.

    Raises:
        InputError: the exporter refused the job (its message, e.g. an unknown model or task).
        RuntimeError: the worker died without saying why (its log says).
    """
    out = Path(request.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    request_path = out / ".export-request.json"
    request_path.write_text(json.dumps(to_plain(request)))
    log_path = log_path or out / "export.log"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER, str(request_path), stdout=asyncio.subprocess.PIPE, stderr=log, env=env)
        result: ExportResult | None = None
        error: str | None = None
        try:
            assert process.stdout is not None
            async for raw in process.stdout:
                try:
                    message = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a stray print from a library: not ours
                if "progress" in message:
                    from export.progress import ExportProgress

                    on_progress(ExportUpdate(from_plain(ExportProgress, message["progress"], "export progress")))
                elif "result" in message:
                    result = from_plain(ExportResult, message["result"], "export result")
                elif "error" in message:
                    error = str(message["error"])
            code = await process.wait()
        except BaseException:
            if process.returncode is None:
                process.kill()
                await process.wait()
            raise
    if error is not None:
        raise InputError(error)
    if code != 0 or result is None:
        raise RuntimeError(f"the export worker exited with status {code}; see {log_path}")
    return result
