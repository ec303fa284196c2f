"""`deftly plan` end to end: table, JSON, and `error: ...` with exit 2 on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from desktop.cli import main

ROOT = Path(__file__).resolve().parents[2]
LAB = str(ROOT / "assets/fleets/lab3.toml")
JOB = str(ROOT / "assets/jobs/smollm2.toml")


def test_table_lists_every_device_and_the_baselines(capsys) -> None:
    assert main(["plan", "--fleet", LAB, "--job", JOB, "--seeds", "5"]) == 0
    out = capsys.readouterr().out
    for word in ("pi4", "phone", "laptop", "share", "memory use/limit", "round latency", "gap to exact",
                 "equal-size blocks", "equal_bandwidth", "all_on_fastest"):
        assert word in out


def test_json_is_the_same_plan_as_data(capsys) -> None:
    assert main(["plan", "--fleet", LAB, "--job", JOB, "--json", "--seeds", "5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["device"] for d in data["devices"]] == ["pi4", "phone", "laptop"]
    assert data["round_s"] > 0 and set(data["baselines"]) >= {"random", "fastest_first"}


def test_bad_input_prints_error_and_exits_2(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "fleet.toml"
    bad.write_text(Path(LAB).read_text().replace("head_s = 0.0800", "head_s = \"slow\""))
    assert main(["plan", "--fleet", str(bad), "--job", JOB]) == 2
    assert capsys.readouterr().err.startswith("error: fleet.toml: device[0] 'pi4': field 'head_s'")


def test_example_commands_in_the_asset_headers_run() -> None:
    # Every example config starts with the exact command that uses it; run each once.
    for path in sorted((ROOT / "assets").glob("*/*.toml")):
        first = path.read_text().splitlines()[0]
        if not first.startswith("# deftly plan "):
            continue
        argv = first.removeprefix("# deftly ").split() + ["--json", "--seeds", "3"]
        proc = subprocess.run([sys.executable, "-m", "desktop.cli", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (path.name, proc.stderr)
        assert json.loads(proc.stdout)["round_s"] > 0


def test_bench_plan_writes_json_with_the_agreed_keys_and_a_png(tmp_path: Path) -> None:
    import argparse

    from desktop.bench import plan as bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path)
    bench.add_arguments(parser)
    results = bench.run(parser.parse_args(["--out-dir", str(tmp_path), "--instances", "30", "--repeats", "1"]))
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert set(saved) == {"exactness", "dual_ascent_gap", "time_s", "gain_vs_equal_random", "baselines"}
    assert {k: saved["exactness"][k] for k in ("instances", "mismatches")} == {"instances": 30, "mismatches": 0}
    boundaries = saved["exactness"]["boundaries"]
    assert boundaries["instances"] == 7 and boundaries["mismatches"] == 0
    assert boundaries["heuristic_bound_violations"] == 0 and boundaries["heuristic_worst_excess"] >= 0
    assert set(saved["time_s"]) == {"8", "64", "256"}
    assert set(saved["baselines"]) == {"lab3", "classroom10", "synthetic256"}
    assert results["gain_vs_equal_random"] == saved["gain_vs_equal_random"]
    assert (tmp_path / "plan.png").stat().st_size > 10_000
