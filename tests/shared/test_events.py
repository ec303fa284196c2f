from __future__ import annotations

import math

import pytest

from shared.errors import InputError
from shared.events import (EVENT_TYPES, Eval, Round, Start, Step, Test, append_events, event_from_line,
                           event_from_plain, event_to_line, event_to_plain, read_events)


def _step(step: int = 1, **tags) -> Step:
    return Step(step=step, loss=0.69, g_abs_mean=1.2, seconds=0.25, seq_len=32, rss_mb=120.0, lr=0.1, **tags)


def test_events_round_trip_through_json_lines(tmp_path) -> None:
    events = [
        Start(step=0, steps=3, resumed=False, lr=0.1, eps=0.01, schedule="constant", batches="shuffled",
              average_from=None, train_examples=100),
        _step(1), _step(2, device="pi4", round=1),
        Eval(step=2, split="validation", accuracy=math.nan, examples=0, seconds=0.0),
        Round(round=1, accuracy=0.8, examples=300, seconds=12.5, measured_round_s={"pi4": 11.0},
              predicted_round_s={"pi4": 10.0}, lost=["phone"]),
        Test(step=3, split="test", accuracy=0.78, examples=10, seconds=1.0),
    ]
    path = tmp_path / "metrics.jsonl"
    append_events(path, events[:2])
    append_events(path, events[2:])
    back = read_events(path)
    assert back[:3] + back[4:] == events[:3] + events[4:]
    assert math.isnan(back[3].accuracy)
    assert set(EVENT_TYPES) == {"start", "step", "eval", "checkpoint", "test", "done", "round"}


def test_the_line_carries_the_kind_first_and_omits_unset_tags() -> None:
    plain = event_to_plain(_step())
    assert list(plain)[0] == "kind" and plain["kind"] == "step"
    assert "device" not in plain and "peak_rss_mb" not in plain
    assert event_from_plain(plain) == _step()


@pytest.mark.parametrize("line, message", [
    ('{"kind": "steps", "step": 1}', "unknown event kind 'steps'"),
    ('{"step": 1}', "unknown event kind None"),
    ('{"kind": "step", "step": 1}', "missing field 'loss'"),
    ('[1]', "expected an object"),
    ('{"kind": "step"', "not JSON"),
])
def test_a_bad_line_is_an_input_error_naming_it(line: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        event_from_line(line, where="metrics.jsonl:7")


def test_a_field_of_the_wrong_type_is_named_with_its_file_and_line(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(event_to_line(_step()) + "\n" + event_to_line(_step()).replace('"loss": 0.69', '"loss": "low"') + "\n")
    with pytest.raises(InputError, match=r"metrics.jsonl:2 \(step\)\.loss: expected a number"):
        read_events(path)
