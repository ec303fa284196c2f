"""A run's picture: loss and validation accuracy per step, read back from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from shared.events import Eval, Event, Step, Test, read_events


def read_metrics(path: Path) -> list[Event]:
    """The events of a run's metrics.jsonl, in order.

    Raises:
        InputError: naming the file and line of the first line that is not an event.
    """
    return read_events(path)


def plot_run(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Loss (with a moving average) and validation accuracy against the step.

    Args:
        metrics_path: the run's metrics.jsonl.
        png_path: where the PNG goes.
        title: shown above the plot.

    Returns:
        ``png_path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    events = read_metrics(metrics_path)
    steps = [e.step for e in events if isinstance(e, Step)]
    losses = np.array([e.loss for e in events if isinstance(e, Step)])
    evals = [(e.step, e.accuracy) for e in events if isinstance(e, Eval)]
    tests = [e.accuracy for e in events if isinstance(e, Test)]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="loss per step")
    window = max(1, len(losses) // 20)
    if len(losses) >= window > 1:  # zeroth-order losses are noisy: show the trend too
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        left.plot(steps[window - 1:], smooth, color="C0", lw=2, label=f"moving mean ({window} steps)")
    left.set_xlabel("step")
    left.set_ylabel("loss (verbalizer cross-entropy)")
    left.legend(fontsize=8)
    if evals:
        right.plot(*zip(*evals), "o-", color="C2", label="validation")
    if tests:
        right.axhline(tests[-1], color="C3", ls="--", label=f"test at the end: {tests[-1]:.3f}")
    right.set_xlabel("step")
    right.set_ylabel("accuracy")
    right.set_ylim(0.3, 1.0)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
