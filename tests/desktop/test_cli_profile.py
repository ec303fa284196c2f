"""`deftly profile` end to end on a small local model directory: the probe, then this machine measured."""
from __future__ import annotations

import json
from pathlib import Path

from desktop.cli import main
from desktop.measured import load_profile
from shared.probe import ProbeManifest


def test_profile_exports_the_probe_and_writes_a_measured_profile(tiny_program, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny_program.loaded.model.save_pretrained(model_dir)
    tiny_program.loaded.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "probe"
    argv = ["profile", "--out", str(out), "--model", str(model_dir), "--layers", "1-1", "--seq", "16",
            "--name", "tiny-here", "--repeats", "2", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    probe = ProbeManifest.load(out / "probe.probe.json")
    profile = load_profile(out / "profile.json")
    assert profile.name == "tiny-here" and profile.measurement.probe == probe.probe_id
    assert probe.seq_len == 16 and probe.job_layers == (1,) and probe.model_id == str(model_dir.resolve())
    assert "lowered in" in printed and all(method in printed for method in probe.methods)
    assert json.loads((out / "profile.json").read_text())["measurement"]["repeats"] == 2
    assert main(argv[:3] + ["--q", "0"]) == 2 and "--q must be at least 1" in capsys.readouterr().err
