"""Loading fleets and jobs from TOML/JSON; errors name the file and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.errors import InputError
from shared.fleet_io import fleet_from_dict, job_from_dict, load_fleet, load_job
from shared.profiles import LengthTimes, profile_from_plain, profile_to_plain

ROOT = Path(__file__).resolve().parents[2]

DEVICE = {"name": "pi", "layer_s_bs": 0.01, "layer_s_wide": 0.05, "head_s": 0.02,
          "memory_gib": 3.0, "link_mbit_s": 80}
JOB = {"name": "j", "layers": 4, "trainable": [0, 3], "layer_payload_bytes": 100, "q": 2, "bs": 2,
       "local_steps": 3, "memory_base_mib": 10, "memory_per_wide_layer_bytes": 0}


@pytest.mark.parametrize("path", sorted((ROOT / "assets" / "fleets").glob("*.toml")))
def test_example_fleets_load(path: Path) -> None:
    fleet = load_fleet(path)
    assert fleet.devices and path.read_text().startswith("# deftly plan --fleet")


@pytest.mark.parametrize("path", sorted((ROOT / "assets" / "jobs").glob("*.toml")))
def test_example_jobs_load(path: Path) -> None:
    job = load_job(path)
    assert job.layers == 30 and path.read_text().startswith("# deftly plan --fleet")


def test_units_are_converted() -> None:
    fleet = fleet_from_dict({"name": "f", "device": [DEVICE]})
    dev = fleet.devices[0]
    assert dev.memory_bytes == 3 * 2**30 and dev.link_bytes_per_s == 80e6 / 8
    assert dev.layer_s_bs == (0.01,)
    job = job_from_dict(JOB)
    assert job.memory_base_bytes == 10 * 2**20 and job.blocks == ()


def test_block_payload_defaults_to_layer_payload_times_layers() -> None:
    job = job_from_dict({**JOB, "block": [{"name": "a", "layers": [0, 1]}, {"name": "b", "layers": [2, 3],
                                                                        "payload_bytes": 7}]})
    assert [b.payload_bytes for b in job.blocks] == [200.0, 7.0]


@pytest.mark.parametrize("device, message", [
    ({**DEVICE, "head_s": "fast"}, r"device\[0\] 'pi': field 'head_s' must be a number"),
    ({k: v for k, v in DEVICE.items() if k != "layer_s_wide"}, r"missing field 'layer_s_wide'"),
    ({**DEVICE, "memory_bytes": 5}, r"exactly one of 'memory_bytes' or 'memory_gib'"),
    ({**DEVICE, "lnk_mbit_s": 5}, r"unknown field\(s\) 'lnk_mbit_s'"),
    ({**DEVICE, "layer_s_wide": 0.001}, r"layer_s_wide\[0\].*below layer_s_bs"),
])
def test_device_errors_name_the_field(device: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        fleet_from_dict({"name": "f", "device": [device]}, "f.toml")


@pytest.mark.parametrize("job, message", [
    ({**JOB, "trainable": [0]}, r"'trainable' must be \[first, last\]"),
    ({**JOB, "q": 1.5}, r"field 'q' must be an integer"),
    ({**JOB, "block": [{"name": "a", "layers": [3, 9]}]}, r"block\[0\] 'a'.*not inside"),
])
def test_job_errors_name_the_field(job: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        job_from_dict(job, "j.toml")


def test_files_toml_json_and_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text(json.dumps({"name": "f", "device": [DEVICE]}))
    assert load_fleet(tmp_path / "f.json").devices[0].name == "pi"
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(InputError, match="bad.toml"):
        load_fleet(tmp_path / "bad.toml")
    with pytest.raises(InputError, match="cannot read"):
        load_job(tmp_path / "missing.toml")
    (tmp_path / "f.yaml").write_text("")
    with pytest.raises(InputError, match=".toml or .json"):
        load_fleet(tmp_path / "f.yaml")


def test_times_at_shorter_lengths_load_and_round_trip_through_the_record_codec() -> None:
    # prepare: a device timed at T=64 and at T=32, in a fleet file's keys
    device = {**DEVICE, "at_lengths": [{"seq_len": 32, "layer_s_bs": 0.006, "layer_s_wide": [0.03]}]}
    # execute
    loaded = fleet_from_dict({"name": "f", "device": [device]}).devices[0]
    again = fleet_from_dict({"name": "f", "device": [profile_to_plain(loaded)]}).devices[0]
    # assert: the times at 32 are the profile's, the plain record loads back equal, and a
    # fleet without them still loads (no times at a shorter length)
    assert loaded.times_at(32) == LengthTimes(32, (0.006,), (0.03,)) and loaded.times_at(16) is None
    assert again == loaded == profile_from_plain(profile_to_plain(loaded))
    assert fleet_from_dict({"name": "f", "device": [DEVICE]}).devices[0].at_lengths == ()
    with pytest.raises(InputError, match=r"at_lengths\[0\]: missing field 'seq_len'"):
        fleet_from_dict({"name": "f", "device": [{**DEVICE, "at_lengths": [{"layer_s_bs": 1, "layer_s_wide": 1}]}]})
