"""`deftly demo` end to end on the tiny model: three real agents, headless and in an offscreen window.

The demo starts its own agents (``deftly-agent --simulate`` for a Pi 4, a mid-range
phone and a laptop); each test checks that none is left running when it returns.
"""
from __future__ import annotations

from pathlib import Path

import psutil

from desktop.demo import LAB, DemoSettings, has_display, run_demo
from desktop.engine import JobSpec
from desktop.engine.engine import LEFT_ALONE
from desktop.engine.local_agents import LocalAgents
from shared.events import Round, Step, read_events


def demo_settings(tiny_job: JobSpec, export_cache: Path, tmp_path: Path, **overrides):
    base = dict(job=tiny_job, rounds=1, local_steps=2, eval_limit=16, test_limit=16, out=tmp_path / "demo",
                cache_dir=export_cache, agents_dir=tmp_path / "agents")
    return DemoSettings(**{**base, **overrides})


def agents_left(agents_dir: Path) -> list[psutil.Process]:
    left = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "device_agent.cli" in " ".join(process.cmdline()) and str(agents_dir) in " ".join(process.cmdline()):
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    return left


def test_without_a_display_the_demo_runs_headless_and_says_so(monkeypatch) -> None:
    for name in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    assert not has_display()
    monkeypatch.setenv("DISPLAY", ":99")
    assert has_display()


def test_the_demo_runs_headless_writes_its_report_with_a_dashboard_picture_and_stops_its_agents(
        tiny_job, export_cache, tmp_path, capsys) -> None:
    settings = demo_settings(tiny_job, export_cache, tmp_path, headless=True)
    # another fleet's agent advertised here too (another demo, a test run): the demo must leave it alone
    with LocalAgents(tmp_path / "foreign", token="another-fleets-token") as foreign:
        foreign.start([("foreign-laptop", "laptop")])
        assert run_demo(settings) == 0
    out = capsys.readouterr().out
    assert "starting 3 simulated agents" in out and "stopped the 3 agents the demo started" in out
    assert not agents_left(settings.agents_dir)
    assert "seen and left alone (not this run's)" in out and "foreign-laptop (127.0.0.1:" in out
    assert not [line for line in out.splitlines() if line.strip().startswith("error")]
    run = settings.out
    events = read_events(run / "metrics.jsonl")
    devices = {e.device for e in events if isinstance(e, Step)}
    assert devices and devices <= {name for name, _cls in LAB}
    assert [e.round for e in events if isinstance(e, Round)] == [1]
    report = (run / "report.md").read_text()
    assert "![dashboard](dashboard.png)" in report and "Before training (round 0)" in report
    assert (run / "dashboard.png").stat().st_size > 20_000 and (run / "loss.png").stat().st_size > 5_000
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # A second demo moves the first aside instead of refusing the folder.
    assert run_demo(settings) == 0
    assert (tmp_path / "demo.previous" / "report.md").exists() and (run / "report.md").exists()


def test_the_demo_runs_in_an_offscreen_window_and_closing_it_stops_its_agents(
        qapp, tiny_job, export_cache, tmp_path) -> None:
    from PySide6.QtCore import QTimer

    settings = demo_settings(tiny_job, export_cache, tmp_path, headless=False)
    seen = {}

    def watch(window) -> None:  # the audience watches until the run ends, then closes the window
        timer = QTimer(window)

        def check() -> None:
            state = window.model.state
            if state.finished is not None:
                seen["plotted"] = {d: len(window.live.plotted(d)[1]) for d in state.devices}
                seen["cards"] = sorted(c.name.text().split("<b style='font-size:13px'>")[1].split("</b>")[0]
                                       for c in window.devices.cards.values())
                seen["own"] = sorted(view.name for view in state.devices.values() if view.detail != LEFT_ALONE)
                seen["trained"] = {view.name for view in state.devices.values() if view.steps_total}
                timer.stop()
                window.close()

        timer.timeout.connect(check)
        timer.start(100)

    assert run_demo(settings, on_window=watch) == 0
    assert not agents_left(settings.agents_dir)
    # its three agents have cards; another demo's agents advertising on this machine (the same names) get
    # cards too, seen and left alone; the tiny job's two blocks went to two of its own
    assert seen["own"] == sorted(name for name, _cls in LAB)
    assert set(seen["cards"]) >= {name for name, _cls in LAB}
    assert len(seen["trained"]) == 2 and seen["trained"] <= {name for name, _cls in LAB}
    assert sum(seen["plotted"].values()) == sum(1 for e in read_events(settings.out / "metrics.jsonl")
                                                if isinstance(e, Step))


def test_a_headless_demo_stopped_before_any_step_says_so_instead_of_drawing_a_picture(
        monkeypatch, tmp_path, capsys) -> None:
    # prepare: a run that Ctrl-C stopped during the export: a report, no metrics.jsonl
    import desktop.demo as demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# stopped\n")

    async def stopped_run(engine, plain):
        return 130

    monkeypatch.setattr(demo, "Engine", lambda config: None)
    monkeypatch.setattr("desktop.cli.run.drive", stopped_run)
    # execute
    code = demo._headless(demo.EngineConfig(job=JobSpec(), out=out))
    # assert: the run's own exit code, a plain line, no picture, and the report left as it was
    assert code == 130
    assert "the run stopped before anything was trained" in capsys.readouterr().out
    assert not (out / "dashboard.png").exists() and (out / "report.md").read_text() == "# stopped\n"


def test_the_caption_says_what_the_curves_show_and_quotes_a_measurement_only_for_the_job_it_was_made_on() -> None:
    from desktop.demo import caption
    from desktop.engine import JobSpec

    default = caption(JobSpec())
    assert "calibrated zero-shot" in default and "five rounds add 1-3 points" in default
    raw = caption(JobSpec(calibrate="none"))
    assert "raw model" in raw and "five rounds add 1-3 points" in raw
    assert "points of validation accuracy" not in caption(JobSpec(model="/models/other", task="/tasks/sst2.toml"))
