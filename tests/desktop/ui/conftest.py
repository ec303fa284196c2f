"""Fixtures for the dashboard's tests: a real window offscreen, and a lab's events as the engine emits them.

``lab_events`` are the events of a three-device lab up to its first plan, made
by the engine's own planning (``desktop.engine.planning.make_plan``: the planner
on lab3's profiles for SmolLM2's top 8 layers), so a view is tested on the plan
the engine would send it. The tests that need agents start real ones
(``desktop.engine.local_agents``) and stop them in teardown.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from desktop.engine.events import DeviceProfiled, DeviceSeen, DeviceStatus, PlanMade  # noqa: E402
from desktop.engine.planning import make_plan  # noqa: E402
from shared.fleet_io import load_fleet, load_job  # noqa: E402
from shared.manifest import BSlot  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TOP8 = range(22, 30)  # SmolLM2's 30 layers, the top 8 trainable (the exporter's default)
LAB = {"id-pi4": ("pi4", "pi4-4gb"), "id-phone": ("phone", "midrange-phone"), "id-laptop": ("laptop", "laptop")}


def smollm2_layout() -> list[BSlot]:
    """The adapter layout of SmolLM2's top 8 layers: q_proj [576, 8] and v_proj [192, 8] per layer."""
    slots, offset = [], 0
    for layer in TOP8:
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            slots.append(BSlot(layer, module, f"model.layers.{layer}.self_attn.{module}", (out, 8), offset))
            offset += out * 8
    return slots


def lab_plan(devices: dict[str, str] | None = None, first_round: int = 1, reason: str = "start"):
    """The engine's plan for lab3's devices (id -> name; default all three)."""
    fleet = {p.name: p for p in load_fleet(ROOT / "assets" / "fleets" / "lab3.toml").devices}
    job = replace(load_job(ROOT / "assets" / "jobs" / "smollm2.toml"), trainable_first=TOP8[0],
                  trainable_last=TOP8[-1])
    names = devices or {device: name for device, (name, _cls) in LAB.items()}
    return make_plan({d: fleet[n] for d, n in names.items()}, names, job, smollm2_layout(),
                     first_round=first_round, reason=reason)


@pytest.fixture()
def lab_events() -> list:
    events = []
    fleet = {p.name: p for p in load_fleet(ROOT / "assets" / "fleets" / "lab3.toml").devices}
    for i, (device, (name, cls)) in enumerate(LAB.items()):
        events += [DeviceSeen(device, name, f"127.0.0.1:{9100 + i}", "mdns", cls, arch="aarch64", cores=4,
                              memory_mb=3072.0, runtime="executorch 1.5.1"),
                   DeviceStatus(device, "paired"), DeviceProfiled(device, fleet[name], False, cls)]
    events.append(PlanMade(lab_plan()))
    return events


@pytest.fixture()
def window(qtbot):
    from desktop.ui.window import MainWindow

    win = MainWindow()
    win.resize(1500, 950)
    qtbot.addWidget(win)
    win.show()
    return win
