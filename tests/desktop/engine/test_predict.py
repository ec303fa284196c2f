"""Each round's prediction: prices at the round's own lengths, a calibration from the steps seen."""
from __future__ import annotations

import numpy as np
import pytest

from desktop.engine.predict import (
    Calibration, TrainerPosition, lengths_of_round, predicted_round_s, round_compute_s,
)


def test_a_round_is_priced_at_each_of_its_steps_lengths() -> None:
    prices = {32: 1.0, 64: 2.5}
    assert round_compute_s([32, 64, 64, 32], prices, full_length_s=9.0) == pytest.approx(7.0)
    # a length without a price (a profile measured at the full length only) costs the full length's step
    assert round_compute_s([16, 64], prices, full_length_s=2.5) == pytest.approx(5.0)


def test_the_calibration_is_measured_over_priced_leaving_out_each_lengths_first_step() -> None:
    calibration = Calibration()
    assert calibration.factor == 1.0
    calibration.observe("p", 32, seconds=3.0, priced_s=1.0)  # loads step_t32: left out
    assert calibration.factor == 1.0
    calibration.observe("p", 32, seconds=1.2, priced_s=1.0)
    calibration.observe("p", 64, seconds=9.0, priced_s=2.0)  # loads step: left out
    calibration.observe("p", 64, seconds=2.4, priced_s=2.0)
    assert calibration.factor == pytest.approx((1.2 + 2.4) / (1.0 + 2.0))
    calibration.observe("q", 32, seconds=5.0, priced_s=1.0)  # another program loads its own method
    assert calibration.factor == pytest.approx(3.6 / 3.0)
    calibration.observe("q", 32, seconds=1.0, priced_s=None)  # no price: nothing to compare with
    assert calibration.factor == pytest.approx(3.6 / 3.0)
    assert predicted_round_s(comm_s=2.0, compute_s=10.0, calibration=calibration) == pytest.approx(2.0 + 12.0)


def test_a_trainer_position_counts_steps_per_program_and_restarts_on_a_new_one() -> None:
    position = TrainerPosition()
    assert position.at("a", assumed=20) == 20  # a resumed desktop: the rounds before were run on it
    position.ran("a", 10)
    assert position.at("a", assumed=0) == 30
    assert position.at("b", assumed=99) == 0  # a new program is a fresh trainer
    position.ran("b", 10)
    assert position.at("b", assumed=0) == 10


def test_a_rounds_lengths_are_its_slice_of_the_trainers_order() -> None:
    lengths = np.array([32, 32, 64, 64, 32, 64])
    np.testing.assert_array_equal(lengths_of_round(lengths, 2, 3), [64, 64, 32])
    with pytest.raises(ValueError, match="past the 6 lengths"):
        lengths_of_round(lengths, 4, 3)
