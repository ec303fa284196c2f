"""`python -m device_agent.selfcheck [PROGRAM]`: does this install run the agent?

What a lab runs on a Raspberry Pi or a phone after installing the agent (README,
"Run an agent on a Raspberry Pi / phone / laptop"), and what `deftly bench install`
and the install test run inside a fresh environment:

1. imports ``device_agent.program`` alone and notes the resident memory then (the
   runtime's share of an idle agent: torch and the ExecuTorch extension);
2. imports every other module of the agent, so a distribution the install lacks is
   named here rather than when the desktop first connects;
3. given a program (the ``.pte`` it was exported as, or its manifest), loads it
   (every method's ``.pte`` and the shared weights the manifest names, their sha256
   checked) and runs what it has of: one ``step`` on the first training rows (b = 0,
   z on the program's block drawn from numpy's PCG64 with seed 0, the program's lr
   and eps), and one ``class_logits`` call on the first eval batch. A block program
   (what a device receives) has only its ``step``; the eval program only ``eval``.

It prints one JSON object on stdout. Exit status 0 when every module imported and
the program (if given) ran; 1 otherwise, with the failure on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

DISTRIBUTIONS = ("torch", "executorch", "numpy", "websockets", "zeroconf", "psutil", "safetensors", "tokenizers")


def _rss_mb() -> float | None:
    """This process's resident memory in MiB, where psutil is installed."""
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"missing module {exc.name!r} ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _import_modules(report: dict) -> bool:
    """Import ``device_agent.program``, then every other agent module; record each outcome."""
    start = time.perf_counter()
    try:
        importlib.import_module("device_agent.program")
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the point is to name what is missing
        report["modules"] = {"device_agent.program": _failure(exc)}
        return False
    report["import_program_s"] = round(time.perf_counter() - start, 3)
    report["rss_mb_after_import_program"] = _rss_mb()
    import device_agent

    modules = {"device_agent.program": "ok"}
    for info in pkgutil.iter_modules(device_agent.__path__, "device_agent."):
        if info.name in modules or info.name.endswith((".selfcheck", ".__main__")):
            continue
        try:
            importlib.import_module(info.name)
            modules[info.name] = "ok"
        except Exception as exc:  # noqa: BLE001 - as above
            modules[info.name] = _failure(exc)
    report["modules"] = modules
    report["rss_mb_after_import_all"] = _rss_mb()
    return all(outcome == "ok" for outcome in modules.values())


def run_program(path: Path) -> dict:
    """Load the program at ``path`` and run one call of its ``step`` and of its ``eval`` (those it has).

    Returns:
        Its methods and method files, the outputs (step: loss, g, the size of the step;
        eval: the logits), the seconds each took and the resident memory after.

    Raises:
        InputError: the program's files are missing or altered, or it has neither method.
    """
    import numpy as np

    from device_agent.program import Program
    from shared.errors import InputError

    start = time.perf_counter()
    program = Program(path)
    train = program.load_data()["train"]
    methods = set(program.manifest.methods)
    if not methods & {"step", "eval"}:
        raise InputError(f"{path}: the program has neither a step nor an eval method (it has {sorted(methods)})")
    b = np.zeros(program.b_size, dtype=np.float32)  # [P], the job's whole b
    report: dict = {"program": str(path), "methods": sorted(methods),
                    "files": sorted(set(program.manifest.method_files.values()))}
    report["load_s"] = round(time.perf_counter() - start, 3)

    if "step" in methods:
        bs, block = program.batch_size, program.block
        z = np.random.default_rng(0).standard_normal((program.q, program.block_size), dtype=np.float32)  # [q, P_blk]
        start = time.perf_counter()
        b_new, loss, g = program.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs], b, z,
                                      program.manifest.lr, program.manifest.eps)  # b_new [P_blk]
        report |= {"step_s": round(time.perf_counter() - start, 3), "loss": loss, "g": g.tolist(),
                   "b_step_norm": float(np.linalg.norm(b_new - b[block.offset:block.stop]))}
    if "eval" in methods:
        ebs = program.eval_batch_size
        start = time.perf_counter()
        logits = program.class_logits(train.input_ids[:ebs], train.lengths[:ebs], b)  # [ebs, C]
        report |= {"eval_s": round(time.perf_counter() - start, 3), "logits": logits.tolist()}
    report["rss_mb"] = _rss_mb()
    return report


def check(program: Path | None) -> tuple[dict, bool]:
    """The report of one self-check and whether everything passed."""
    report: dict = {
        "python": platform.python_version(), "machine": platform.machine(),
        "rss_mb_at_start": _rss_mb(),
    }
    ok = _import_modules(report)
    report["versions"] = {}
    for name in DISTRIBUTIONS:
        try:
            report["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report["versions"][name] = None
    if program is not None and "rss_mb_after_import_program" in report:
        try:
            report["run"] = run_program(program)
        except Exception as exc:  # noqa: BLE001 - reported as the check's result
            report["run"] = {"program": str(program), "error": _failure(exc)}
            ok = False
    return report, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_agent.selfcheck", description=__doc__.split("\n")[0])
    parser.add_argument("program", nargs="?", type=Path,
                        help="a program to run once: the .pte it was exported as, or its .manifest.json")
    args = parser.parse_args(argv)
    report, ok = check(args.program)
    print(json.dumps(report))
    if not ok:
        failed = {name: outcome for name, outcome in report["modules"].items() if outcome != "ok"}
        for name, outcome in failed.items():
            print(f"selfcheck: {name}: {outcome}", file=sys.stderr)
        if "error" in report.get("run", {}):
            print(f"selfcheck: {report['run']['program']}: {report['run']['error']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
