"""A fleet run's report: ``report.md`` and its plots, read back from the run directory alone.

Plots (PNG, beside the report): loss per device, step latency per device, RSS
per device, the merged adapter's validation accuracy per round, and each
device's predicted against measured round time. The text says what was
trained with which plan, which device was lost in which round (and what that
cost), and where the adapter is. Everything comes from ``metrics.jsonl``,
``plan.json`` and ``state.json``, so a report can be written again for any run.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from desktop.engine.rundir import RunDir
from shared.events import Eval, Round, Step, Test, iter_events

PLOTS = {
    "loss": "loss.png",
    "step_seconds": "step_seconds.png",
    "rss": "rss.png",
    "accuracy": "accuracy.png",
    "round_time": "round_time.png",
}


def _names(run: RunDir) -> dict[str, str]:
    try:
        state = json.loads(run.state_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {d["id"]: d["name"] for d in state.get("devices", []) if isinstance(d, dict) and "id" in d}


def write_report(path: Path) -> Path:
    """Write ``report.md`` and its PNGs into the run directory ``path``; returns the report's path."""
    run = RunDir(Path(path))
    names = _names(run)
    steps: dict[str, list[Step]] = defaultdict(list)
    rounds: list[Round] = []
    tests: list[Test] = []
    zero_shot: Eval | None = None  # the untrained adapter's evaluation (the engine's zero_shot)
    if run.metrics_path.exists():
        for event in iter_events(run.metrics_path):
            if isinstance(event, Step) and event.device is not None:
                steps[event.device].append(event)
            elif isinstance(event, Round):
                rounds.append(event)
            elif isinstance(event, Test):
                tests.append(event)
            elif isinstance(event, Eval) and event.round == 0:
                zero_shot = event
    plans = run.read_plans()
    state = json.loads(run.state_path.read_text()) if run.state_path.exists() else {}
    _plot_all(run.path, steps, rounds, names)

    def name(device: str) -> str:
        return names.get(device, device)

    lines = [f"# Fleet run `{run.path.name}`", ""]
    settings = state.get("settings", {})
    if settings:
        lines += [f"Job `{settings.get('job')}`: {len(rounds)} of {settings.get('rounds')} rounds merged, "
                  f"{settings.get('local_steps')} local steps per device per round, lr {settings.get('lr')}, "
                  f"eps {settings.get('eps')}, plan policy `{settings.get('policy')}`.", ""]
    if rounds:
        best = max(rounds, key=lambda r: r.accuracy if math.isfinite(r.accuracy) else -1)
        lines += [f"Validation accuracy of the merged adapter after the last round: **{rounds[-1].accuracy:.3f}** "
                  f"(round {rounds[-1].round}, {rounds[-1].examples} examples; best {best.accuracy:.3f} in round "
                  f"{best.round})."]
    if zero_shot is not None:
        lines += [f"Before training (round 0) the adapter's validation accuracy was {zero_shot.accuracy:.3f} "
                  f"({zero_shot.examples} examples)."]
    if tests:
        lines += [f"Test accuracy at the end: **{tests[-1].accuracy:.3f}** ({tests[-1].examples} examples)."]
    lines.append("")
    for plan in plans:
        lines += [f"## Plan from round {plan.first_round} ({plan.reason})", "",
                  f"Policy `{plan.policy}`, predicted round latency {plan.round_s:.2f} s "
                  f"(planner {plan.planner_s * 1000:.0f} ms).", "",
                  "| device | block | layers | share | compute s | comm s | round s | profile |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in plan.assignments:
            layers = "-" if a.block is None else f"{a.first_layer}-{a.last_layer}"
            lines.append(f"| {a.name} | {a.block or '(idle)'} | {layers} | {a.share:.3f} | {a.compute_s:.2f} | "
                         f"{a.comm_s:.2f} | {a.round_s:.2f} | {a.profile} |")
        finite = {k: v for k, v in plan.baselines.items() if v is not None}
        if finite:
            lines += ["", "Baselines (predicted round latency): " + ", ".join(
                f"{k.replace('_', ' ')} {v:.2f} s" for k, v in finite.items())]
        lines.append("")
    if rounds:
        lines += ["## Rounds", "", "| round | accuracy | wall s | per device: measured / predicted s | lost |",
                  "|---|---|---|---|---|"]
        for r in rounds:
            per = ", ".join(f"{name(d)} {s:.2f} / {r.predicted_round_s.get(d, math.nan):.2f}"
                            for d, s in r.measured_round_s.items())
            lost = ", ".join(name(d) for d in r.lost) or "-"
            lines.append(f"| {r.round} | {r.accuracy:.3f} | {r.seconds:.1f} | {per} | {lost} |")
        lines.append("")
    losses = state.get("losses", [])
    if losses:
        lines += ["## Devices lost", ""]
        for loss in losses:
            where = f"in round {loss['round']}" if loss.get("round") else "between rounds"
            lines.append(f"- **{loss.get('name', loss['device'])}** {where}: {loss['reason']}. Its unfinished "
                         f"round's block was not merged (its slice of b kept the last merged values); the rest "
                         f"re-planned and went on.")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{key}]({file})" for key, file in PLOTS.items() if (run.path / file).exists()]
    lines += ["", "## Output", "",
              f"- adapter: `{run.adapter_dir}` (a standard PEFT LoRA adapter; `deftly_calibration.json` beside it "
              f"holds the class bias PEFT cannot hold: add it to the verbalizer logits)",
              f"- metrics: `{run.metrics_path}` (every device's steps, tagged with device and round, and one "
              f"`round` line per merged round)", "- plan: `plan.json`, profiles: `profiles.json`", ""]
    report = run.path / "report.md"
    report.write_text("\n".join(lines))
    return report


def _plot_all(folder: Path, steps: dict[str, list[Step]], rounds: list[Round], names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def per_device(file: str, value, ylabel: str, title: str) -> None:
        if not steps:
            return
        fig, ax = plt.subplots(figsize=(8, 4))
        for device, series in sorted(steps.items()):
            xs = list(range(1, len(series) + 1))
            ax.plot(xs, [value(s) for s in series], lw=1, label=names.get(device, device))
        ax.set_xlabel("step on the device (all rounds)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / file, dpi=100)
        plt.close(fig)

    per_device(PLOTS["loss"], lambda s: s.loss, "loss (mean over the 2q copies)", "loss per device")
    per_device(PLOTS["step_seconds"], lambda s: s.seconds, "seconds per step (device clock)", "step latency")
    per_device(PLOTS["rss"], lambda s: s.rss_mb, "resident memory (MB)", "memory per device")
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r.round for r in rounds], [r.accuracy for r in rounds], "o-", color="C2")
        for r in rounds:
            if r.lost:
                ax.annotate("lost: " + ", ".join(names.get(d, d) for d in r.lost), (r.round, r.accuracy),
                            fontsize=7, color="C3")
        ax.set_xlabel("round")
        ax.set_ylabel("validation accuracy of the merged adapter")
        ax.set_title("global accuracy per round")
        fig.tight_layout()
        fig.savefig(folder / PLOTS["accuracy"], dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4))
        devices = sorted({d for r in rounds for d in r.measured_round_s})
        for i, device in enumerate(devices):
            xs = [r.round for r in rounds if device in r.measured_round_s]
            ax.plot(xs, [rounds_by(r, device, "measured") for r in rounds if device in r.measured_round_s], "o-",
                    color=f"C{i}", label=f"{names.get(device, device)} measured")
            ax.plot(xs, [rounds_by(r, device, "predicted") for r in rounds if device in r.measured_round_s], "x--",
                    color=f"C{i}", label=f"{names.get(device, device)} predicted")
        ax.set_xlabel("round")
        ax.set_ylabel("round time (s)")
        ax.set_title("predicted vs measured round time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / PLOTS["round_time"], dpi=100)
        plt.close(fig)


def rounds_by(r: Round, device: str, which: str) -> float:
    source = r.measured_round_s if which == "measured" else r.predicted_round_s
    return source.get(device, math.nan)
