"""The export worker: ``python -m desktop.engine.export_worker REQUEST.json`` (run by ``exports.run_export``).

Reads an :class:`desktop.engine.exports.ExportRequest`, loads the model once,
exports what it asks for through the exporter's own calls (each takes every
lowered method from the export cache when it can), and writes one JSON object
per line to stdout: ``{"progress": export.progress.ExportProgress}`` as it goes,
then ``{"result": ExportResult}``, or ``{"error": message}`` for input the
exporter refused (exit status 2). Everything else (library warnings) goes to
stderr, which the engine sends to a log file.

Where the files go, under the request's ``out_dir``: ``job/`` the job's eval
program and ``probe/`` its probe (asked for once, before any plan), ``plan/``
the block programs of the latest plan with their own copy of the eval program.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from desktop.engine.exports import ExportRequest, ExportResult, block_key
from shared.blocks import BlockSpan
from shared.errors import InputError
from shared.records import from_plain, to_plain


def _say(key: str, value) -> None:
    sys.stdout.write(json.dumps({key: value}) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    request = from_plain(ExportRequest, json.loads(Path(argv[0]).read_text()), "export request")
    start = time.perf_counter()
    try:
        result = export(request, start)
    except InputError as exc:
        _say("error", str(exc))
        return 2
    _say("result", to_plain(replace(result, seconds=time.perf_counter() - start)))
    return 0


def export(request: ExportRequest, start: float) -> ExportResult:
    from export.models import load_model
    from export.program import ExportConfig, export_plan, export_program
    from export.progress import ExportProgress

    out = Path(request.out_dir)
    cache_dir = Path(request.cache_dir) if request.cache_dir else None

    def progress(event: ExportProgress) -> None:
        _say("progress", to_plain(event))

    def note(line: str) -> None:
        """The model loader reports lines of text: passed on as running notes."""
        progress(ExportProgress(stage="load", state="running", fraction=0.0, elapsed_s=time.perf_counter() - start,
                                remaining_s=None, message=line.strip(), program="model"))

    base = ExportConfig(**request.job.export_settings())
    base.check()
    loaded = load_model(base.model, cache_dir=cache_dir, progress=note)
    found = lowered = 0
    probe = evaluation = None
    blocks: dict[str, str] = {}
    if request.eval:
        result = export_program(replace(base, methods=("eval",)), out / "job" / "eval.pte", cache_dir=cache_dir,
                                on_progress=progress, loaded=loaded)
        evaluation = str(result.manifest_path)
        found, lowered = found + result.from_cache, lowered + (not result.from_cache)
    if request.probe:
        from export.probe import export_probe

        result = export_probe(base, out / "probe", cache_dir=cache_dir, on_progress=progress, loaded=loaded)
        probe = str(result.manifest_path)
        found, lowered = found + result.from_cache, lowered + (not result.from_cache)
    if request.blocks:
        plan = export_plan(base, list(request.blocks), out / "plan", cache_dir=cache_dir, on_progress=progress,
                           loaded=loaded)
        for first, last in request.blocks:
            blocks[block_key(first, last)] = str(plan.blocks[BlockSpan(first, last, 0, 0).name].manifest_path)
        found, lowered = found + plan.cached, lowered + plan.lowered
    return ExportResult(probe=probe, eval=evaluation, blocks=blocks, from_cache=found, lowered=lowered)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
