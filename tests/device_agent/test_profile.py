"""Measuring a device with the probe: a measured profile the planner takes, its record, bad probes."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.profile import device_facts, measure_profile, resolve_probe_path
from shared.errors import InputError
from shared.fleet_io import fleet_from_dict
from shared.planner import PlannerConfig, plan, summary_rows
from shared.probe import call_cost_s, layer_cost_s
from shared.profiles import PROBE_FORMAT, Fleet, profile_from_plain, profile_to_plain


@pytest.fixture(scope="module")
def profile(tiny_probe):
    return measure_profile(tiny_probe.manifest_path.parent, "this-machine", link_bytes_per_s=1.25e7, repeats=5)


def test_profile_lays_out_the_probe_times_per_layer_and_is_marked_measured(profile, tiny_probe) -> None:
    probe, m = tiny_probe.manifest, profile.measurement
    assert profile.measured and profile.source.startswith("measured 20")
    assert m.probe == probe.probe_id and m.model_id == probe.model_id and m.repeats == 5
    assert set(m.method_s) == set(m.spread) == set(probe.methods)
    assert all(t > 0 for t in m.method_s.values()) and all(s >= 0 for s in m.spread.values())
    # the tiny job trains layer 1 of 2: layer 0 is frozen on bs rows, layer 1 is the last layer;
    # each layer costs its chains' slope, layer 0 also the call below the block; the last layer keeps its
    # own call whole; the head keeps its own
    frozen = layer_cost_s(m.method_s, "frozen_bs")
    assert 0 < frozen <= m.method_s["frozen_bs_x8"] / 8 * (1 + 1e-12)  # the slope, never above the long chain's mean
    assert profile.layer_s_bs[0] == pytest.approx(frozen + call_cost_s(m.method_s, "frozen_bs"))
    assert profile.layer_s_wide[1] == m.method_s["last_wide"]
    assert profile.head_s == m.method_s["head"]
    assert all(w >= b for b, w in zip(profile.layer_s_bs, profile.layer_s_wide))
    assert 0 < profile.memory_bytes <= m.facts.ram_bytes


def test_profile_carries_the_layer_times_at_each_shorter_length(profile, tiny_probe) -> None:
    # The tiny job runs T=32 with a bucket at 16: the profile's times at 16 are the
    # probe's ``*_t16`` methods, laid out per layer as the full-length ones.
    m = profile.measurement
    assert [t.seq_len for t in profile.at_lengths] == [16] and profile.times_at(16) is profile.at_lengths[0]
    at16 = profile.times_at(16)
    frozen, wide = layer_cost_s(m.method_s, "frozen_bs", 16), layer_cost_s(m.method_s, "layer_wide", 16)
    last = m.method_s["last_wide_t16"]
    below = frozen + call_cost_s(m.method_s, "frozen_bs", 16)
    assert at16.layer_s_bs[0] == pytest.approx(below)
    assert at16.layer_s_wide == pytest.approx((max(below, wide), last))
    assert m.probe_format == tiny_probe.manifest.format == PROBE_FORMAT
    assert profile_from_plain(profile_to_plain(profile)) == profile


def test_memory_terms_are_read_for_every_method(profile, tiny_probe) -> None:
    memory = profile.measurement.memory
    assert memory.runtime_bytes > 50 * 2**20  # the interpreter, numpy and the runtime are resident
    assert set(memory.load_bytes) == set(memory.run_bytes) == set(tiny_probe.manifest.methods)
    # the widened layer needs at least the workspace of the bs-row layer
    assert memory.run_bytes["layer_wide"] >= memory.run_bytes["layer_bs"] >= 0


def test_facts_describe_this_machine() -> None:
    facts = device_facts()
    assert facts.cores == os.cpu_count() and facts.ram_bytes > 0
    assert facts.executorch[0].isdigit() and facts.system
    if Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text()
        assert all(flag in flags for flag in facts.simd)


def test_profile_travels_as_one_record_and_plans_as_measured(profile) -> None:
    wire = json.loads(json.dumps(profile_to_plain(profile)))
    assert profile_from_plain(wire) == profile
    # a fleet file may hold it beside a hand-written estimate
    estimate = {"name": "estimate", "layer_s_bs": 0.01, "layer_s_wide": 0.05, "head_s": 0.01, "memory_gib": 4,
                "link_mbit_s": 100}
    fleet = fleet_from_dict({"name": "mixed", "device": [wire, estimate]})
    assert fleet.devices[0] == profile
    from shared.profiles import Job
    job = Job("tiny", 2, 1, 1, 4096.0, 4, 4, 2, 1e6, 0.0)
    result = plan(fleet, job, PlannerConfig(baselines=False))
    sources = {row.device: row.profile for row in result.devices}
    assert sources["estimate"] == "estimated" and sources["this-machine"] == profile.source
    assert profile.source in [cell for row in summary_rows(result) for cell in row]


def test_a_profile_record_with_a_bad_field_names_it(profile) -> None:
    wire = profile_to_plain(profile)
    with pytest.raises(InputError, match=r"profile\.measurement\.repeats: expected an integer"):
        profile_from_plain({**wire, "measurement": {**wire["measurement"], "repeats": "five"}})
    with pytest.raises(InputError, match="link_bytes_per_s"):
        profile_from_plain({**wire, "link_bytes_per_s": 0})


def test_a_probe_altered_after_export_or_missing_is_refused(tiny_probe, tmp_path: Path) -> None:
    shutil.copytree(tiny_probe.manifest_path.parent, tmp_path / "probe")
    weights = tmp_path / "probe" / tiny_probe.manifest.files["weights"]
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(InputError, match="does not match the manifest"):
        measure_profile(tmp_path / "probe", "d", 1e6, repeats=1)
    with pytest.raises(InputError, match="no probe manifest"):
        resolve_probe_path(tmp_path / "nowhere")
    with pytest.raises(InputError, match="repeats"):
        measure_profile(tiny_probe.manifest_path, "d", 1e6, repeats=0)
