"""`deftly export`: bad options are the library's input errors, reported before any model is loaded."""
from __future__ import annotations

import pytest

from desktop.cli import main


@pytest.mark.parametrize("argv,message", [
    (["--q", "0"], "--q 0: must be an integer of at least 1"),
    (["--eval-bs", "0"], "--eval-bs 0: must be an integer of at least 1"),
    (["--block", "5-3"], "--block '5-3': expected FIRST-LAST trainable layers"),
    (["--block", "twenty"], "--block 'twenty': expected FIRST-LAST"),
    (["--blocks", ","], "--blocks ',': expected ranges like 22-24,25-27"),
    (["--methods", "step,train"], "--methods: unknown train"),
    (["--targets", ","], "--targets: name at least one target linear"),
    (["--int8-smoothing", "2"], "--int8-smoothing 2: expected a value between 0 and 1"),
    (["--loss", "vocab"], "--calibrate median needs --loss verbalizer"),
    (["--workers", "0"], "--workers 0: expected 1 or more"),
])
def test_a_bad_option_is_an_error_naming_it(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / ("plan" if "--blocks" in argv else "x.pte")
    assert main(["export", *argv, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before anything was loaded or lowered


def test_block_and_eval_only_cannot_be_combined(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--block", "22-25", "--eval-only", "--out", str(tmp_path / "x.pte")])
    assert "not allowed with argument" in capsys.readouterr().err
