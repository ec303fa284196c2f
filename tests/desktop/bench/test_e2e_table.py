"""bench e2e's prediction table: the cost model's compute for the steps each round actually ran."""
from __future__ import annotations

import math

import pytest

from desktop.bench.e2e import add_compute_at_round_mix, worst_error_at_round_mix
from desktop.engine.events import Assignment, PlanView
from shared.profiles import DeviceProfile, LengthTimes


def _assignment(name: str, first: int | None) -> Assignment:
    return Assignment(name, name, None if first is None else f"L{first}-1", first, None if first is None else 1,
                      0, 10, 0.5, 9.9, 0.1, 10.0, 1.0, 2.0, "measured 2026-12-01")


def test_a_round_is_priced_at_the_lengths_its_steps_ran() -> None:
    # prepare: 2 layers; "fast" timed at 64 and 32, "old" at 64 only; a re-plan from round 2 moves fast's block
    fast = DeviceProfile("fast", (1.0, 2.0), (3.0, 4.0), 0.5, 1e9, 1e6,
                         at_lengths=(LengthTimes(32, (0.5, 1.0), (1.5, 2.0)),))
    old = DeviceProfile("old", (1.0,), (2.0,), 0.0, 1e9, 1e6)
    plans = [PlanView(1, "start", "planned", 10.0, (_assignment("fast", 0), _assignment("old", 1)), {}, 0.0, "j", 2),
             PlanView(2, "old lost", "planned", 10.0, (_assignment("fast", 1), _assignment("old", None)), {}, 0.0,
                      "j", 2)]
    compute = [{"round": 1, "device": "fast", "steps_by_seq_len": {"32": 3, "64": 1}},
               {"round": 1, "device": "old", "steps_by_seq_len": {"32": 2}},
               {"round": 2, "device": "fast", "steps_by_seq_len": {"64": 2}}]
    table = [{"round": 1, "device": "fast"}, {"round": 1, "device": "old"}, {"round": 2, "device": "fast"},
             {"round": 2, "device": "old"}]
    # execute
    add_compute_at_round_mix(table, compute, plans, {"fast": fast, "old": old})
    # assert, by hand: fast from layer 0 runs both layers wide: 3 steps at 32 (1.5 + 2 + 0.5) and
    # 1 at 64 (3 + 4 + 0.5); old from layer 1 at 32 falls back to 64 (1 + 2); in round 2 fast's
    # block starts at layer 1 (1 + 4 + 0.5 at 64); old had no round 2
    got = [row["predicted_compute_at_round_mix_s"] for row in table]
    assert got[:3] == pytest.approx([3 * 4.0 + 7.5, 2 * 3.0, 2 * 5.5])
    assert got[3] is None


def test_the_error_at_the_round_mix_takes_comm_plus_that_compute() -> None:
    # prepare: two rows priced at their round's mix, one not priced (its plan had no block for it)
    table = [{"measured_s": 10.0, "predicted_comm_s": 2.0, "predicted_compute_at_round_mix_s": 7.0},
             {"measured_s": 4.0, "predicted_comm_s": 1.0, "predicted_compute_at_round_mix_s": 4.0},
             {"measured_s": 3.0, "predicted_comm_s": 1.0, "predicted_compute_at_round_mix_s": None}]
    # execute / assert: |10 - 9| / 10 = 0.1 and |4 - 5| / 4 = 0.25; the unpriced row is left out
    assert worst_error_at_round_mix(table) == pytest.approx(0.25)
    assert math.isnan(worst_error_at_round_mix(table[2:]))
