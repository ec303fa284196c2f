"""`deftly run` parses and calls: its options become the engine's settings; the engine checks them."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from desktop.cli import main, run
from shared.errors import InputError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deftly")
    run.register(parser.add_subparsers())
    return parser.parse_args(["run", *argv])


def test_options_become_the_engines_settings(tmp_path) -> None:
    (tmp_path / "job.toml").write_text('layers = "top:8"\nq = 4\n')
    config = run.config_from(parse(["--job", str(tmp_path / "job.toml"), "--layers", "top:4", "--agent",
                                    "tok@127.0.0.1:9000", "--agent", "127.0.0.1:9001", "--token", "t",
                                    "--rounds", "3", "--local-steps", "7", "--out", str(tmp_path / "r"),
                                    "--replicas", "--patience-s", "4", "--discover", "--pair-only",
                                    "127.0.0.1:9002", "--pair-only", "agent-id-1"]))
    assert (config.job.layers, config.job.q) == ("top:4", 4)
    assert config.agents == ("tok@127.0.0.1:9000", "127.0.0.1:9001")
    assert (config.rounds, config.local_steps, config.out, config.replicas, config.patience_s) == \
        (3, 7, tmp_path / "r", True, 4.0)
    assert (config.discover, config.pair_only) == (True, ("127.0.0.1:9002", "agent-id-1"))
    assert run.config_from(parse(["--discover", "--rounds", "1", "--local-steps", "1"])).pair_only is None
    config.check()


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0", "--local-steps", "1", "--agent", "h:1"], "--rounds must be at least 1"),
    (["--rounds", "1", "--local-steps", "1"], "no agents"),
    (["--rounds", "1", "--local-steps", "1", "--agent", "nohost"], "expected HOST:PORT"),
    (["--rounds", "1", "--local-steps", "1", "--discover", "--q", "0"], "q must be at least 1"),
])
def test_bad_settings_are_input_errors(argv: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message):
        run.config_from(parse(argv)).check()


def test_the_cli_prints_the_error_without_a_traceback(capsys) -> None:
    assert main(["run", "--rounds", "1", "--local-steps", "1"]) == 2
    assert "no agents" in capsys.readouterr().err
