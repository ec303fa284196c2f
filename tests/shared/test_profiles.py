"""Input checks on profiles and jobs: every error names the field."""
from __future__ import annotations

import pytest

from shared.errors import InputError
from shared.profiles import (PROBE_FORMAT, Block, DeviceFacts, DeviceProfile, Fleet, Job, Measurement, ProbeMemory,
                             check_fleet, check_fleet_for_job, check_job, profile_from_plain, profile_to_plain)


def _job(**over) -> Job:
    fields = dict(name="j", layers=4, trainable_first=0, trainable_last=3, layer_payload_bytes=10.0,
                  q=2, bs=2, local_steps=1, memory_base_bytes=0.0, memory_per_wide_layer_bytes=0.0)
    fields.update(over)
    return Job(**fields)


def _dev(**over) -> DeviceProfile:
    fields = dict(name="d", layer_s_bs=(1.0,), layer_s_wide=(2.0,), head_s=0.1,
                  memory_bytes=1e9, link_bytes_per_s=1e6)
    fields.update(over)
    return DeviceProfile(**fields)


@pytest.mark.parametrize("over, field", [
    (dict(layer_s_wide=(0.5,)), "layer_s_wide[0]"),
    (dict(memory_bytes=0.0), "memory_bytes"),
    (dict(link_bytes_per_s=float("nan")), "link_bytes_per_s"),
    (dict(layer_s_bs=()), "layer_s_bs"),
    (dict(head_s=-1.0), "head_s"),
])
def test_bad_device_field_is_named(over: dict, field: str) -> None:
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_fleet(Fleet("f", (_dev(**over),)))


def test_duplicate_device_names_and_empty_fleet() -> None:
    with pytest.raises(InputError, match="used twice"):
        check_fleet(Fleet("f", (_dev(), _dev())))
    with pytest.raises(InputError, match="no devices"):
        check_fleet(Fleet("f", ()))


def test_layer_count_must_match_the_job() -> None:
    with pytest.raises(InputError, match="layer_s_bs has 3 entries.*4 layers"):
        check_fleet_for_job(Fleet("f", (_dev(layer_s_bs=(1.0, 1.0, 1.0), layer_s_wide=(2.0,)),)), _job())


@pytest.mark.parametrize("over, message", [
    (dict(q=0), "'q'"),
    (dict(trainable_last=7), "trainable_last"),
    (dict(blocks=(Block("a", 0, 2, 1.0), Block("b", 2, 3, 1.0))), "block\\[1\\] 'b'.*overlaps"),
    (dict(blocks=(Block("a", 0, 5, 1.0),)), "block\\[0\\] 'a'.*not inside"),
    (dict(blocks=(Block("a", 0, 1, 0.0),)), "payload_bytes"),
    (dict(n_blocks=9), "n_blocks"),
])
def test_bad_job_field_is_named(over: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        check_job(_job(**over))


def test_a_profile_measured_with_an_older_probe_is_refused_with_the_way_out() -> None:
    # prepare: a measured profile as the agent wrote it before probes timed the length
    # buckets (no probe_format in its measurement), and the same measured now
    measurement = Measurement(at="2026-12-01T07:00:00+00:00", probe="p" * 16, model_id="m", repeats=3,
                              method_s={"head": 0.1}, spread={"head": 0.0},
                              memory=ProbeMemory(1.0, 1.0, {"head": 1.0}, {"head": 1.0}),
                              facts=DeviceFacts("cpu", 2, 1e9, "1.5.1", ()), probe_format=PROBE_FORMAT)
    plain = profile_to_plain(_dev(measurement=measurement))
    del plain["measurement"]["probe_format"], plain["at_lengths"]
    # execute + assert: the old record is refused by name and says to re-profile; the current one loads
    with pytest.raises(InputError, match=rf"measured with probe format 1, this deftly reads {PROBE_FORMAT} .*re-profile"):
        profile_from_plain(plain, "old.json")
    assert profile_from_plain(profile_to_plain(_dev(measurement=measurement))).measurement == measurement
