"""Screenshots of the dashboard at each step of the demo's flow, from the real window (run it under Xvfb).

    apt-get install xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxkbcommon-x11-0
    xvfb-run -a -s "-screen 0 1600x1000x24" python -m desktop.ui.screenshots --out docs/screenshots

(Qt's xcb plugin needs those xcb libraries; a bare Debian has none of them.)

runs ``deftly demo`` in its window (three real simulated agents, the real engine) and
saves a PNG when each step is first on screen: first the lobby (an agent found by
zeroconf, a wrong token typed on its card, the right one), then the demo's devices paired, their
profiles, the plan, the export (on a cold cache), the shipping, training, a device lost
mid-round (the script kills the Pi's agent) with the re-plan, the results, and the
presenter layout. ``--model``/``--task`` choose another job (a small model makes quick
pictures; the README's come from SmolLM2).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from desktop.demo import DemoSettings, run_demo
from desktop.engine import JobSpec
from desktop.engine.local_agents import LocalAgents
from desktop.ui.window import MainWindow

POLL_MS = 100
SIZE = (1600, 1000)
KILLED = "pi4"  # the agent killed mid-round for the "lost" picture
STEPS = ("devices-paired", "profiles", "plan", "export-progress", "shipping", "training", "device-lost-replanned",
         "results", "presenter")  # file NN-STEP.png, NN its place here (export and shipping only on a cold start)
PAIRING = ("pairing-found", "pairing-wrong-token", "pairing-paired")  # 00a-, 00b-, 00c-: the lobby, before a run


def pairing_pictures(out: Path, work: Path) -> list[Path]:
    """The lobby: an agent found by zeroconf, a wrong token typed on its card, then the right one."""
    from desktop.engine import Engine, EngineConfig
    from desktop.ui.app import Dashboard, application

    app = application()
    taken: list[Path] = []
    with LocalAgents(work / "pairing-agents", token="the-token-it-printed") as agents:
        agents.start([("lab-pi", "pi4-4gb")])
        config = EngineConfig(job=JobSpec(), out=work / "pairing-run", discover=True, mdns_interfaces=("127.0.0.1",),
                              cache_dir=work / "pairing-cache")
        dashboard = Dashboard(lambda: Engine(config), lambda _c, _n: config, title="deftly dashboard")
        window = dashboard.window
        window.resize(*SIZE)
        window.show()
        dashboard.start(lobby=True)

        def wait(condition, seconds: float = 30.0) -> None:
            deadline = time.monotonic() + seconds
            while not condition() and time.monotonic() < deadline:
                app.processEvents()
                time.sleep(0.02)

        def shoot(index: int) -> None:
            window.devices.refresh_all()
            settle()
            path = out / f"00{'abc'[index]}-{PAIRING[index]}.png"
            window.grab().save(str(path))
            taken.append(path)
            print(f"screenshot: {path}", flush=True)

        def settle() -> None:  # the layout reflows the new texts on the next turns of the loop
            for _ in range(5):
                app.processEvents()

        cards = window.devices.cards
        wait(lambda: any(c.error.text() for c in cards.values()))
        shoot(0)
        card = next(iter(cards.values()))
        card.token.setText("not-the-token")
        card.pair_button.click()
        wait(lambda: "check the token" in card.error.text().lower())
        shoot(1)
        card.token.setText("the-token-it-printed")
        card.pair_button.click()
        wait(lambda: window.model.state.devices[card.device].status == "paired")
        shoot(2)
        dashboard.bridge.stop()
        window.close()
    return taken


class Photographer:
    """Watches the window and saves a picture the first time each step of the flow shows."""

    def __init__(self, window: MainWindow, out: Path, lab: LocalAgents | None) -> None:
        self.window, self.out, self.lab = window, out, lab  # lab: the demo's agents, one is killed (None: none)
        self.taken: list[Path] = []
        self._done: set[str] = set()
        self._killed_in: int | None = None
        window.resize(*SIZE)
        self.timer = QTimer(window)
        self.timer.timeout.connect(self.look)
        self.timer.start(POLL_MS)

    def shoot(self, name: str) -> None:
        if name in self._done:
            return
        self._done.add(name)
        self.window.devices.refresh_all()
        self.window.live.redraw()
        for _ in range(5):  # the layout reflows the new texts on the next turns of the loop
            QApplication.processEvents()
        path = self.out / f"{STEPS.index(name) + 1:02d}-{name}.png"
        self.window.grab().save(str(path))
        self.taken.append(path)
        print(f"screenshot: {path}", flush=True)

    def look(self) -> None:
        state = self.window.model.state
        devices = list(state.devices.values())
        if len(devices) >= 3 and all(d.status not in ("seen", "pairing") for d in devices):
            self.shoot("devices-paired")
        if devices and all(d.profile is not None for d in devices):
            self.shoot("profiles")
        if state.plan is not None:
            self.shoot("plan")
        if self.window.export.isVisible() and state.export is not None and state.export.elapsed_s > 5:
            self.shoot("export-progress")
        if any(d.status == "receiving" and (d.fraction or 0) > 0.2 for d in devices):
            self.shoot("shipping")
        training = [d for d in devices if d.status == "training" and d.step >= 2]
        if state.round >= 2 and training:
            self.shoot("training")
            if self.lab is not None and self._killed_in is None:
                self._killed_in = state.round
                self.lab.agents[KILLED].kill()  # a device pulled from the wall mid-round
        if state.lost:
            lost = state.devices.get(state.lost[-1][1])
            if lost is not None and lost.status == "lost" and len(state.plans) > 1:
                self.shoot("device-lost-replanned")
        if state.finished is not None:
            self.shoot("results")
            self.window.enter_presenter()
            QTimer.singleShot(800, self._presenter)
            self.timer.stop()

    def _presenter(self) -> None:
        self.shoot("presenter")
        self.window.leave_presenter()
        self.window.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m desktop.ui.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--model", help="default: SmolLM2 (embedded)")
    parser.add_argument("--task", help="default: Rotten Tomatoes (embedded)")
    parser.add_argument("--layers")
    parser.add_argument("--q", type=int)
    parser.add_argument("--bs", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--run", type=Path, default=Path("runs/screenshots"), help="the demo's run directory")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--agents-dir", type=Path, help="the agents' state (default: the demo's)")
    parser.add_argument("--keep-all-devices", action="store_true", help="do not kill an agent for the lost step")
    args = parser.parse_args(argv)
    if not os.environ.get("DISPLAY") and not os.environ.get("QT_QPA_PLATFORM"):
        print("no display: run it under xvfb-run (Debian's xvfb)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("[0-9][0-9]*-*.png"):
        old.unlink()
    job = JobSpec(model=args.model, task=args.task, layers=args.layers, q=args.q, bs=args.bs, seq=args.seq)
    settings = DemoSettings(job=job, rounds=args.rounds, local_steps=args.local_steps, eval_limit=args.eval_limit,
                            test_limit=args.eval_limit, out=args.run, cache_dir=args.cache_dir, headless=False,
                            **({"agents_dir": args.agents_dir} if args.agents_dir else {}))
    pairing = pairing_pictures(args.out, args.run.parent / (args.run.name + "-work"))
    photographers: list[Photographer] = []
    labs: list[LocalAgents] = []

    def watch(window: MainWindow) -> None:
        photographers.append(Photographer(window, args.out, None if args.keep_all_devices else labs[0]))

    code = run_demo(settings, on_window=watch, on_agents=labs.append)
    taken = photographers[0].taken if photographers else []
    print(f"{len(pairing) + len(taken)} screenshots in {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
