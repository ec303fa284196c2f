"""`python -m device_agent.selfcheck [PROGRAM]`: does this install run the agent?

What a lab runs on a Raspberry Pi or a phone after installing the agent (README,
"Run an agent on a Raspberry Pi / phone / laptop"), and what `deftly bench install`
and the install test run inside a fresh environment:

1. imports ``device_agent.program`` alone and notes the resident memory then (the
   runtime's share of an idle agent: torch and the ExecuTorch extension);
2. imports every other module of the agent, so a distribution the install lacks is
   named here rather than when the desktop first connects;
3. given a program (its ``.pte`` or manifest), loads it and runs one ``step`` on the
   first training rows (b = 0, z drawn from numpy's PCG64 with seed 0, the program's
   lr and eps) and one ``class_logits`` call on the first eval batch.

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

DISTRIBUTIONS = ("torch", "executorch", "numpy", "websockets", "zeroconf", "psutil", "safetensors")


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
    """Load the program at ``path`` and run one step and one eval call; their outputs, times and memory."""
    import numpy as np

    from device_agent.program import Program

    start = time.perf_counter()
    program = Program(path)
    train = program.load_data()["train"]
    bs, ebs = program.batch_size, program.eval_batch_size
    b = np.zeros(program.b_size, dtype=np.float32)
    z = np.random.default_rng(0).standard_normal((program.q, program.b_size), dtype=np.float32)  # [q, P]
    lr, eps = program.manifest.lr, program.manifest.eps
    loaded_s = time.perf_counter() - start

    start = time.perf_counter()
    b_new, loss, g = program.step(train.input_ids[:bs], train.lengths[:bs], train.labels[:bs], b, z, lr, eps)
    step_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = program.class_logits(train.input_ids[:ebs], train.lengths[:ebs], b)  # [ebs, C]
    eval_s = time.perf_counter() - start
    return {
        "program": str(path), "load_s": round(loaded_s, 3), "step_s": round(step_s, 3), "eval_s": round(eval_s, 3),
        "loss": loss, "g": g.tolist(), "b_step_norm": float(np.linalg.norm(b_new - b)),
        "logits": logits.tolist(), "rss_mb": _rss_mb(),
    }


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
    parser.add_argument("program", nargs="?", type=Path, help="a program's .pte or .manifest.json to run once")
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
