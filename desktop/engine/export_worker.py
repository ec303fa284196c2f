"""The export worker: ``python -m desktop.engine.export_worker REQUEST.json`` (run by ``exports.run_export``).

Reads an :class:`desktop.engine.exports.ExportRequest`, loads the model once,
exports what it asks for through the exporter's own calls (which take every
lowered program from the export cache when they can), and writes one JSON
object per line to stdout: ``{"progress": ExportProgress}`` as it goes, then
``{"result": ExportResult}``, or ``{"error": message}`` for input the exporter
refused (exit status 2). Everything else (library warnings) goes to stderr,
which the engine sends to a log file.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from desktop.engine.events import ExportProgress
from desktop.engine.exports import ExportRequest, ExportResult, block_key
from shared.errors import InputError
from shared.records import from_plain, to_plain


def _say(key: str, record) -> None:
    sys.stdout.write(json.dumps({key: to_plain(record) if not isinstance(record, str) else record}) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    request = from_plain(ExportRequest, json.loads(Path(argv[0]).read_text()), "export request")
    start = time.perf_counter()
    try:
        result = export(request, start)
    except InputError as exc:
        _say("error", str(exc))
        return 2
    _say("result", replace(result, seconds=time.perf_counter() - start))
    return 0


def export(request: ExportRequest, start: float) -> ExportResult:
    from export.models import load_model
    from export.program import ExportConfig, export_program

    out = Path(request.out_dir)
    cache_dir = Path(request.cache_dir) if request.cache_dir else None
    current = {"program": "model"}

    def progress(line: str) -> None:
        _say("progress", ExportProgress(stage=line.strip(), program=current["program"],
                                        elapsed_s=time.perf_counter() - start))

    loaded = load_model(request.job.model or ExportConfig().model, cache_dir=cache_dir, progress=progress)
    base = ExportConfig(**request.job.export_settings())
    found = lowered = 0

    def one(name: str, cfg, file: str) -> str:
        nonlocal found, lowered
        current["program"] = name
        result = export_program(cfg, out / file, cache_dir=cache_dir, progress=progress, loaded=loaded)
        found, lowered = found + result.from_cache, lowered + (not result.from_cache)
        return str(result.manifest_path)

    probe = evaluation = None
    if request.probe:
        from export.probe import export_probe

        current["program"] = "probe"
        probe = str(export_probe(base, out / "probe", cache_dir=cache_dir, progress=progress,
                                 loaded=loaded).manifest_path)
    if request.eval:
        evaluation = one("eval", replace(base, methods=("eval",)), "eval.pte")
    blocks: dict[str, str] = {}
    for first, last in request.blocks:
        blocks[block_key(first, last)] = one(f"block L{first}-{last}", _block_config(base, first, last),
                                             f"block-{first}-{last}.pte")
    return ExportResult(probe=probe, eval=evaluation, blocks=blocks, from_cache=found, lowered=lowered)


def _block_config(base, first: int, last: int):
    """The exporter's settings for the program that trains layers first..last of the job."""
    raise InputError(f"block L{first}-{last}: this build of the exporter has no block programs yet")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
