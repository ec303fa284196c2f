"""dashboard: a hundred devices streaming into the live view, and the demo's time to its first plotted loss.

Measures, in one run (`deftly bench ui`):

* `worst_frame_ms`, `p99_frame_ms`, `median_frame_ms`: `--devices` simulated metric
  streams at `--rate-hz` each for `--seconds`, through the real engine bridge into the
  real window (offscreen); a frame is the time between two turns of the GUI thread's
  event loop (a probe timer every 5 ms), so it is how long the window could not react
  (target: worst < 50 ms). Everything downstream of the engine's bus is what a run
  uses (desktop.ui.loadtest). `worst_frame_cpu_ms`, `p99_frame_cpu_ms`: the GUI thread's own
  CPU time per frame, its dearest and 99th percentile (what the window's code cost, apart from
  other processes on the cores); `cpu_in_worst_frame_ms`: its CPU in the frame of the worst
  wall time (on a loaded machine the rest of that frame is other processes holding the cores).
* `dropped`: steps sent but not in a device's plotted series (count or value) once the
  stream ended (target 0); `behind_at_end`: steps sent but not drawn yet three redraw
  periods after the last one (the plots stretch their redraw period under load, so they
  may lag; they never lose a point).
* `time_to_first_plot_s`: `--demo` only: `deftly demo` in an offscreen window, from its
  start to the first loss point drawn (target <= 60 s with the SmolLM2 programs in the
  export cache). It starts three agents and trains SmolLM2: run it on a quiet machine.
* `load_average`: the machine's 1-minute load when the run began (the frame times of a
  loaded machine include the time its other processes held the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=100, help="simulated metric streams (default 100)")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="steps a second per stream (default 10)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long they stream (default 30)")
    parser.add_argument("--demo", action="store_true", help="also time `deftly demo` to its first plotted loss "
                        "(SmolLM2, three agents: minutes on a cold export cache)")


def demo_time_to_first_plot(run_dir: Path) -> dict:
    """Start the demo in an offscreen window; the seconds from its start to the first loss point drawn."""
    from desktop.demo import DemoSettings, run_demo
    from desktop.ui.loadtest import watch_first_plot

    started = time.perf_counter()
    seen: dict = {}

    code = run_demo(DemoSettings(out=run_dir, headless=False), on_window=lambda w: watch_first_plot(w, started, seen))
    return {"time_to_first_plot_s": seen.get("first_plot_s"), "demo_exit": code}


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from desktop.ui.loadtest import stream_into_window

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = stream_into_window(args.devices, args.rate_hz, args.seconds, out=Path("runs") / "bench-ui")
    results = {
        "devices": result.devices, "rate_hz": result.rate_hz, "seconds": result.seconds,
        "worst_frame_ms": result.worst_frame_ms, "p99_frame_ms": result.p99_frame_ms,
        "median_frame_ms": result.median_frame_ms, "frames": len(result.frames_ms),
        "worst_frame_cpu_ms": result.worst_frame_cpu_ms, "p99_frame_cpu_ms": result.p99_frame_cpu_ms,
        "cpu_in_worst_frame_ms": result.cpu_in_worst_frame_ms,
        "sent": result.sent, "plotted": result.plotted, "dropped": result.dropped,
        "behind_at_end": result.behind_at_end, "event_batches": result.batches, "plot_redraws": result.redraws,
        "wall_s": result.wall_s, "load_average": load, "cpus": os.cpu_count(),
        "time_to_first_plot_s": None,
        "time_to_first_plot_note": "not measured: run `deftly bench ui --demo` on a quiet machine whose export "
                                   "cache holds the SmolLM2 demo's programs",
    }
    if args.demo:
        results.update(demo_time_to_first_plot(Path("runs") / "bench-ui-demo"))
        results["time_to_first_plot_note"] = "deftly demo in an offscreen window, start to first loss point drawn"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ui.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(result, out_dir / "ui.png")
    return results


def draw(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    ax.plot(result.frame_at_s, result.frames_ms, lw=0.8, color="C0")
    ax.axhline(50, color="C3", ls="--", lw=1, label="target 50 ms")
    ax.set_xlabel("seconds into the stream")
    ax.set_ylabel("frame (ms between two event-loop turns)")
    ax.set_title(f"{result.devices} devices x {result.rate_hz:g} Hz into the live view")
    ax.legend(fontsize=8)
    hist.hist(result.frames_ms, bins=50, color="C0", log=True)
    hist.set_xlabel("frame (ms)")
    hist.set_title("frames")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
