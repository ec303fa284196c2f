"""The run picture: read back metrics.jsonl and draw it."""
from __future__ import annotations

import pytest

from desktop.report import plot_run, read_metrics
from shared.errors import InputError
from shared.events import Eval, Step, Test, append_events


def test_plot_run_draws_loss_and_accuracy(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    events = [Eval(step=0, split="validation", accuracy=0.55, examples=16, seconds=0.2)]
    events += [Step(step=s, loss=0.7 - 0.001 * s, g_abs_mean=1.0, seconds=0.1, seq_len=32, rss_mb=100.0, lr=0.01,
                    peak_rss_mb=120.0) for s in range(1, 101)]
    events += [Eval(step=100, split="validation", accuracy=0.7, examples=16, seconds=0.2),
               Test(step=100, split="test", accuracy=0.69, examples=16, seconds=0.2)]
    append_events(metrics, events)

    png = plot_run(metrics, tmp_path / "curves.png", title="t")

    assert read_metrics(metrics) == events
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_metrics_file_of_another_shape_is_an_input_error_naming_the_line(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "eval", "step": 0, "split": "validation", "accuracy": 0.55}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl:1 \(eval\): missing field 'examples'"):
        plot_run(metrics, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()
