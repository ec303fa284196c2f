"""The engine end to end, on real agents over loopback: discovery, rounds, a lost device, a resumed desktop.

Every agent is a real ``deftly-agent`` process (see conftest.py), found by
zeroconf on 127.0.0.1 or named by address; the programs are the tiny model's,
exported once per session into a shared cache.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from desktop.engine import Engine, EngineConfig, JobSpec
from desktop.engine.engine import LEFT_ALONE
from desktop.engine.events import (
    DeviceError, DeviceLost, DeviceRoundDone, DeviceSeen, DeviceStatus, Notice, PlanMade, StepReceived,
)
from shared.blocks import block_span, check_cover
from shared.costmodel import length_step_times
from shared.events import Round, Step, read_events
from shared.protocol import encode_f32
from tests.desktop.engine.conftest import TOKEN

ROOT = Path(__file__).resolve().parents[3]
ROUNDS, K = 2, 3


def job(tiny_model_dir: Path, tiny_task: Path) -> JobSpec:
    return JobSpec(model=str(tiny_model_dir), task=str(tiny_task), layers="0-1", seq=32, q=2, bs=4, eval_bs=8)


def config(tiny_model_dir, tiny_task, export_cache, out: Path, **overrides) -> EngineConfig:
    settings = dict(job=job(tiny_model_dir, tiny_task), out=out, rounds=ROUNDS, local_steps=K,
                    cache_dir=export_cache, token=TOKEN, mdns_interfaces=("127.0.0.1",), wait_s=120.0)
    return EngineConfig(**{**settings, **overrides})


def steps_in(path: Path) -> list[tuple[str, int, int]]:
    return [(e.device, e.round, e.step) for e in read_events(path) if isinstance(e, Step)]


def steps_per_round(path: Path) -> dict[tuple[str, int], int]:
    """(device, round) -> how many distinct steps metrics.jsonl holds for it (an agent numbers its steps on
    across rounds, so a round's steps are counted, not named)."""
    counts: dict[tuple[str, int], int] = {}
    for device, round_, _ in set(steps_in(path)):
        counts[(device, round_)] = counts.get((device, round_), 0) + 1
    return counts


def rounds_in(path: Path) -> list[Round]:
    return [e for e in read_events(path) if isinstance(e, Round)]


def test_two_agents_found_by_zeroconf_train_rounds_and_the_adapter_loads_in_peft(
        agents, tiny_model_dir, tiny_task, export_cache, tmp_path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from device_agent.program import Program

    # prepare: two simulated devices of different classes, advertised on loopback
    laptop = agents.start("lab-laptop", simulate="laptop")
    phone = agents.start("lab-phone", simulate="midrange-phone")
    # pair_only: another test run on this machine advertises its own lab-laptop and lab-phone on loopback
    engine = Engine(config(tiny_model_dir, tiny_task, export_cache, tmp_path / "run", discover=True, devices=2,
                           pair_only=(laptop.address, phone.address)))
    events = []
    engine.subscribe(events.append)
    # execute
    result = asyncio.run(engine.run())
    # assert: found by mDNS, two rounds, every step of both devices, blocks that tile b
    assert (result.rounds_done, result.stopped) == (ROUNDS, False)
    assert {e.name for e in events if isinstance(e, DeviceSeen) and e.via == "mdns"} >= {"lab-laptop", "lab-phone"}
    run = tmp_path / "run"
    labels = {d.label for d in engine._devices.values() if d.agent_id}
    assert labels == {"lab-laptop", "lab-phone"}
    steps = steps_in(run / "metrics.jsonl")
    assert len(steps) == len(set(steps)) == len(labels) * ROUNDS * K
    assert steps_per_round(run / "metrics.jsonl") == {(d, r): K for d in labels for r in range(1, ROUNDS + 1)}
    merged = rounds_in(run / "metrics.jsonl")
    assert [r.round for r in merged] == [1, 2]
    assert all(set(r.measured_round_s) == labels and not r.lost for r in merged)
    plan = [e.plan for e in events if isinstance(e, PlanMade)][-1]
    layout = engine.manifest.b_layout
    check_cover(layout, [block_span(layout, a.first_layer, a.last_layer) for a in plan.active()])
    assert len(plan.active()) == 2
    assert all(a.profile.startswith("measured") for a in plan.assignments)
    # each StartRound went at the device's share of the link it was profiled with: the agent could not take
    # the round before that pace had carried b (a lower bound on one clock; no upper bound on a shared machine)
    b_bytes = len(encode_f32(np.zeros(engine.manifest.b_size, np.float32)))
    done = [e for e in events if isinstance(e, DeviceRoundDone)]
    assert len(done) == len(labels) * ROUNDS
    for e in done:
        share = next(a.share for a in plan.assignments if a.device == e.device)
        assert 0 < share < 1
        assert e.download_s >= b_bytes / (share * engine._devices[e.device].profile.link_bytes_per_s)
        assert e.download_s + e.seconds + e.upload_s == pytest.approx(e.measured_round_s)
    # each round was predicted as it started: at the lengths its steps then ran, priced by the device's profile,
    # and from round 2 on scaled by what its earlier steps measured over their prices (a length's first step,
    # which loads that length's method, left out); the plan's one figure is kept beside it
    full = engine.manifest.seq_len
    for label in labels:
        device = next(d for d in engine._devices.values() if d.label == label)
        part = next(a for a in plan.assignments if a.name == label)

        def price(t: int) -> float:
            return float(length_step_times(device.profile, plan.layers, None if t == full else t)[part.first_layer])

        ran = sorted((e for e in read_events(run / "metrics.jsonl") if isinstance(e, Step) and e.device == label),
                     key=lambda e: e.step)
        measured = priced = 0.0
        loaded: set[int] = set()
        for r in merged:
            this_round = [e for e in ran if e.round == r.round]
            factor = measured / priced if priced > 0 else 1.0
            assert r.planned_round_s[label] == pytest.approx(part.round_s)
            assert r.predicted_round_s[label] == pytest.approx(
                part.comm_s + factor * sum(price(e.seq_len) for e in this_round))
            for e in this_round:
                if e.seq_len in loaded:
                    measured, priced = measured + e.seconds, priced + price(e.seq_len)
                loaded.add(e.seq_len)
    assert {e.predicted_s for e in done} == {r.predicted_round_s[d] for r in merged for d in r.predicted_round_s}
    saved = json.loads((run / "plan.json").read_text())
    assert saved["current"]["round_s"] == pytest.approx(plan.round_s)
    assert set(json.loads((run / "profiles.json").read_text())) == {d.key for d in engine._devices.values()
                                                                      if d.agent_id}
    report = (run / "report.md").read_text()
    assert "lab-phone" in report and "Validation accuracy" in report
    for png in ("loss.png", "step_seconds.png", "rss.png", "accuracy.png", "round_time.png"):
        assert (run / png).stat().st_size > 5_000
    # the adapter: PEFT's verbalizer logits plus the calibration bias are the coordinator's eval logits
    assert np.abs(result.b).sum() > 0
    program = Program(engine.eval_manifest_path)
    validation = program.load_data()["validation"]
    ids, lengths = validation.input_ids[:8], validation.lengths[:8]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, result.adapter)
    with torch.no_grad():
        logits = peft_model(input_ids=torch.from_numpy(ids)).logits  # [n, T, V]
    answer = logits[torch.arange(len(ids)), torch.from_numpy(lengths) - 1][:, program.manifest.verbalizer_token_ids]
    calibration = json.loads((result.adapter / "deftly_calibration.json").read_text())
    np.testing.assert_allclose(answer.numpy() + np.array(calibration["class_bias"], dtype=np.float32),
                               program.class_logits(ids, lengths, result.b), atol=1e-4, rtol=1e-4)


def test_an_engine_told_its_agents_pairs_only_them_and_leaves_a_foreign_one_alone(
        agents, tiny_model_dir, tiny_task, export_cache, tmp_path) -> None:
    # prepare: two agents advertised on loopback, one of another fleet (another token); the engine is told
    # the first one's address (as the demo is told its own agents'), and holds its run until both were seen
    ours = agents.start("ours-laptop", simulate="laptop")
    foreign = agents.start("foreign-phone", simulate="midrange-phone", token="another-fleets-token")
    engine = Engine(config(tiny_model_dir, tiny_task, export_cache, tmp_path / "run", rounds=1, discover=True,
                           devices=1, pair_only=(ours.address,)))
    events = []
    engine.subscribe(events.append)

    def left_alone() -> list:  # the foreign agent's (another test run's agents may be left alone too)
        return [e for e in events if isinstance(e, DeviceStatus) and e.detail == LEFT_ALONE
                and engine.state.device(e.device).address == foreign.address]

    async def scenario():
        both = asyncio.Event()
        engine.subscribe(lambda _e: left_alone() and any(
            isinstance(e, DeviceStatus) and e.status == "paired" for e in events) and both.set())
        await engine.open()
        try:
            await asyncio.wait_for(both.wait(), 60)
        except BaseException:
            await engine.close()
            raise
        return await engine.run()

    # execute
    result = asyncio.run(scenario())
    # assert: the foreign agent was seen (a card) and never paired or errored; the run trained on ours alone
    assert result.rounds_done == 1
    foreign_key = left_alone()[0].device
    assert engine.state.device(foreign_key).address == foreign.address
    assert engine.state.device(foreign_key).status == "seen"
    assert not [e for e in events if isinstance(e, DeviceError)]
    assert not [e for e in events if isinstance(e, DeviceStatus) and e.device == foreign_key and e.status != "seen"]
    assert [d.address for d in engine._devices.values()] == [ours.address]  # nothing else was even tried
    plan = [e.plan for e in events if isinstance(e, PlanMade)][-1]
    assert [a.name for a in plan.assignments] == ["ours-laptop"]
    said = [e.message for e in events if isinstance(e, Notice) and "other agent(s) seen and left alone" in e.message]
    assert len(said) == 1 and f"foreign-phone ({foreign.address})" in said[0]
    # the same two agents to an engine told nothing: it tries the foreign one too, and its token is wrong
    unrestricted = Engine(config(tiny_model_dir, tiny_task, export_cache, tmp_path / "lobby", discover=True, hold=True))
    errors = []
    unrestricted.subscribe(lambda e: isinstance(e, DeviceError) and errors.append(e))

    def about_foreign(error: DeviceError) -> bool:
        return error.message.startswith(f"foreign-phone ({foreign.address})")

    async def lobby() -> None:
        failed = asyncio.Event()
        unrestricted.subscribe(lambda e: isinstance(e, DeviceError) and about_foreign(e) and failed.set())
        await unrestricted.open()
        try:
            await asyncio.wait_for(failed.wait(), 60)
        finally:
            await unrestricted.close()

    asyncio.run(lobby())
    assert [e for e in errors if about_foreign(e)]


def test_a_device_killed_mid_round_is_lost_and_the_run_completes_with_the_other(
        agents, tiny_model_dir, tiny_task, export_cache, tmp_path) -> None:
    # prepare: two agents by address; the phone is killed at its first step of round 2
    laptop = agents.start("k-laptop", simulate="laptop", advertise=False)
    phone = agents.start("k-phone", simulate="midrange-phone", advertise=False)
    engine = Engine(config(tiny_model_dir, tiny_task, export_cache, tmp_path / "run", rounds=3,
                           agents=(laptop.address, phone.address), patience_s=1.0))

    def kill_phone(event) -> None:
        if isinstance(event, StepReceived) and event.step.device == "k-phone" and event.step.round == 2:
            phone.kill()

    engine.subscribe(kill_phone)
    events = []
    engine.subscribe(events.append)
    # execute
    result = asyncio.run(engine.run())
    # assert: three rounds merged, round 2 lost the phone, the rest re-planned without it
    assert (result.rounds_done, result.stopped) == (3, False)
    run = tmp_path / "run"
    merged = rounds_in(run / "metrics.jsonl")
    assert [(r.round, r.lost) for r in merged] == [(1, []), (2, ["k-phone"]), (3, [])]
    assert set(merged[2].measured_round_s) == {"k-laptop"}
    assert [e.round for e in events if isinstance(e, DeviceLost)] == [2]
    plans = [e.plan for e in events if isinstance(e, PlanMade)]
    assert plans[-1].first_round == 3 and "k-phone lost" in plans[-1].reason
    assert [a.name for a in plans[-1].active()] == ["k-laptop"]
    assert steps_per_round(run / "metrics.jsonl")[("k-laptop", 3)] == K
    report = (run / "report.md").read_text()
    assert "k-phone" in report and "in round 2" in report


def test_a_second_run_on_the_same_agent_trains_as_the_first_did(
        agents, tiny_model_dir, tiny_task, export_cache, tmp_path) -> None:
    # prepare: one agent kept between two runs of the same job and seed (as the demo keeps its agents)
    laptop = agents.start("r-laptop", simulate="laptop", advertise=False)

    def one_run(out: Path) -> tuple[np.ndarray, list[float]]:
        result = asyncio.run(Engine(config(tiny_model_dir, tiny_task, export_cache, out,
                                           agents=(laptop.address,))).run())
        assert result.rounds_done == ROUNDS
        losses = [e.loss for e in read_events(out / "metrics.jsonl") if isinstance(e, Step)]
        return np.load(out / "b.npy"), losses

    # execute
    first_b, first_losses = one_run(tmp_path / "first")
    second_b, second_losses = one_run(tmp_path / "second")
    # assert: the agent did not carry on the first run's batch order and directions into the second
    assert len(first_losses) == ROUNDS * K
    assert second_losses == first_losses
    np.testing.assert_array_equal(second_b, first_b)


def test_a_desktop_killed_mid_run_resumes_from_the_last_merged_round_losing_nothing(
        agents, tiny_model_dir, tiny_task, export_cache, tmp_path) -> None:
    # prepare: the desktop is a `deftly run` process, killed once round 1 is merged and round 2 has begun
    one = agents.start("r-laptop", simulate="laptop", advertise=False)
    two = agents.start("r-pi", simulate="pi4-4gb", advertise=False)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "desktop.cli", "run", "--model", str(tiny_model_dir), "--task", str(tiny_task),
               "--layers", "0-1", "--seq", "32", "--q", "2", "--bs", "4", "--agent", one.address,
               "--agent", two.address, "--token", TOKEN, "--rounds", "3", "--local-steps", "60",
               "--out", str(run), "--cache-dir", str(export_cache)]
    # 60 tiny steps a round, so round 2 lasts long enough for the kill to land in it: with 6, round 2
    # was sometimes merged in the 50 ms between two looks at the file (a clean-clone run saw [1, 2])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CI": "1"}
    with open(tmp_path / "desktop.log", "wb") as log:
        desktop = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and desktop.poll() is None:
                metrics = run / "metrics.jsonl"
                lines = metrics.read_text().splitlines() if metrics.exists() else []
                if any('"kind": "round"' in line for line in lines) and \
                        any('"round": 2' in line and '"kind": "step"' in line for line in lines):
                    break
                time.sleep(0.05)
            desktop.send_signal(signal.SIGKILL)
            desktop.wait(timeout=30)
        finally:
            if desktop.poll() is None:
                desktop.kill()
                desktop.wait()
    before = (run / "metrics.jsonl").read_text().splitlines()
    kept = [(e.device, e.round, e.step) for e in read_events(run / "metrics.jsonl") if isinstance(e, Step)]
    assert [r.round for r in rounds_in(run / "metrics.jsonl")] == [1]
    assert any(r == 2 for _, r, _ in kept)
    # execute: the same command with --resume, to the end
    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # assert: it went on from round 1; every step of every round is there exactly once; the
    # lines written before the kill are still the file's first lines
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before
    steps = steps_in(run / "metrics.jsonl")
    assert len(steps) == len(set(steps))
    assert steps_per_round(run / "metrics.jsonl") == {(d, r): 60 for d in ("r-laptop", "r-pi") for r in (1, 2, 3)}
    assert [r.round for r in rounds_in(run / "metrics.jsonl")] == [1, 2, 3]
    assert "resuming" in resumed.stdout and (run / "adapter" / "adapter_model.safetensors").exists()
