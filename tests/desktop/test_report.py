"""The run picture: read back metrics.jsonl and draw it."""
from __future__ import annotations

import json

from desktop.report import plot_run, read_metrics


def test_plot_run_draws_loss_and_accuracy(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    events = [{"kind": "eval", "step": 0, "split": "validation", "accuracy": 0.55}]
    events += [{"kind": "step", "step": s, "loss": 0.7 - 0.001 * s, "g_abs_mean": 1.0, "seconds": 0.1,
                "rss_mb": 100.0, "lr": 0.01} for s in range(1, 101)]
    events += [{"kind": "eval", "step": 100, "split": "validation", "accuracy": 0.7},
               {"kind": "test", "step": 100, "split": "test", "accuracy": 0.69}]
    metrics.write_text("".join(json.dumps(e) + "\n" for e in events))

    png = plot_run(metrics, tmp_path / "curves.png", title="t")

    assert read_metrics(metrics) == events
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
