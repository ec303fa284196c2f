"""`deftly train` end to end on the tiny program: plain progress lines, resume, `error: ...` with exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from desktop.cli import main
from shared.events import Eval, Start, Step


@pytest.fixture(autouse=True)
def no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")  # plain lines, as in CI and logs


def train_args(program: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--program", str(program), "--steps", "12", "--eval-every", "6", "--out", str(out),
            "--eval-limit", "16", "--test-limit", "16", *extra]


def test_train_runs_and_resumes(tiny_program, tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs" / "tiny"
    assert main(train_args(tiny_program.pte, out, "--lr", "0.02", "--schedule", "cosine")) == 0
    printed = capsys.readouterr().out
    for text in ("starting at step 0 of 12", "lr 0.02 (cosine)", "step 10: loss", "s/step",
                 "step 6: validation accuracy", "test accuracy", f"adapter: {out / 'adapter'}"):
        assert text in printed
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "adapter" / "adapter_config.json").exists()

    # the manifest path works as well as the .pte, and --resume continues to the new total
    # (the second --steps overrides the first, as argparse does)
    assert main(train_args(tiny_program.export.manifest_path, out, "--steps", "14", "--resume")) == 0
    assert "resuming at step 12 of 14" in capsys.readouterr().out
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 14


def test_train_with_tail_averaging_says_what_it_averages(tiny_program, tmp_path: Path, capsys) -> None:
    out = tmp_path / "avg"
    assert main(train_args(tiny_program.pte, out, "--average-from", "6")) == 0
    printed = capsys.readouterr().out
    assert "averaging b after step 6" in printed
    assert "step 12: validation accuracy" in printed and "[mean of the last 6 b; the last b alone:" in printed
    assert main(train_args(tiny_program.pte, tmp_path / "late", "--average-from", "12")) == 2
    assert "average_from 12" in capsys.readouterr().err


def test_missing_program_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["train", "--program", str(tmp_path / "absent.pte"), "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'absent.pte'}: no such program")


def test_resume_without_a_checkpoint_is_an_error(tiny_program, tmp_path: Path, capsys) -> None:
    assert main(train_args(tiny_program.pte, tmp_path / "fresh", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_changed_program_file_is_an_error(tiny_program, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "prog"
    shutil.copytree(tiny_program.pte.parent, copy)
    data = copy / tiny_program.export.manifest.files["data"]
    data.write_bytes(data.read_bytes()[:-1])
    assert main(train_args(copy / tiny_program.pte.name, tmp_path / "run")) == 2
    assert f"{data.name}: sha256" in capsys.readouterr().err


def test_progress_bar_shows_step_loss_speed_and_accuracy(capsys) -> None:
    from desktop.cli.train import _Progress

    progress = _Progress(plain=False)
    progress(Start(step=0, steps=2, resumed=False, lr=0.01, eps=0.01, schedule="constant", batches="stratified",
                   average_from=None, train_examples=8))
    progress(Eval(step=0, split="validation", accuracy=0.5, examples=4, seconds=0.1))
    for step in (1, 2):
        progress(Step(step=step, loss=0.69, g_abs_mean=1.0, seconds=0.25, seq_len=16, rss_mb=100.0, lr=0.01))
    progress.close()
    captured = capsys.readouterr()
    assert "lr 0.01 (constant), eps 0.01, stratified batches" in captured.out
    err = captured.err  # tqdm draws on stderr
    assert "2/2" in err and "loss 0.6900" in err and "0.250 s/step" in err and "acc 0.500" in err


@pytest.mark.parametrize("option, value, message", [
    ("--eval-limit", "0", "eval_limit 0: must be at least 1"),
    ("--test-limit", "0", "test_limit 0: must be at least 1"),
    ("--resident-methods", "-1", "resident_methods -1"),
])
def test_the_librarys_checks_reach_the_user_as_errors(tmp_path: Path, capsys, option: str, value: str,
                                                      message: str) -> None:
    argv = ["train", "--program", str(tmp_path / "absent.pte"), "--steps", "1", "--out", str(tmp_path / "r"),
            option, value]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_train_without_evaluation_says_so(tiny_program, tmp_path: Path, capsys) -> None:
    assert main(train_args(tiny_program.pte, tmp_path / "run", "--no-eval", "--steps", "2")) == 0
    printed = capsys.readouterr().out
    assert "step 2: validation accuracy - (best -), test accuracy -" in printed
    assert "validation accuracy 0" not in printed
