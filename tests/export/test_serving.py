"""Serving the adapter `deftly train` writes with plain transformers + peft and its calibration side-car."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from device_agent.program import Program
from device_agent.trainer import write_adapter
from export.serving import load_adapter, predict, served_accuracy, verbalizer_logits
from shared.calibration import CALIBRATION_FILE
from shared.errors import InputError


@pytest.fixture(scope="module")
def adapter(tiny_program, tmp_path_factory) -> tuple[Program, np.ndarray, Path]:
    """The tiny program's adapter at a b large enough that a wrong key, scale or bias would show."""
    program = Program(tiny_program.pte)
    b = (np.random.default_rng(11).standard_normal(program.b_size) * 0.2).astype(np.float32)
    adapter_dir = tmp_path_factory.mktemp("served") / "adapter"
    write_adapter(program, b, adapter_dir)
    return program, b, adapter_dir


def test_the_peft_adapter_with_its_bias_predicts_what_the_program_predicts(tiny_program, adapter) -> None:
    # prepare
    program, b, adapter_dir = adapter
    validation = program.load_data()["validation"]
    # execute
    served = load_adapter(copy.deepcopy(tiny_program.loaded.model), adapter_dir)
    logits = verbalizer_logits(served, validation.input_ids, validation.lengths)  # [n, C]
    accuracy = served_accuracy(served, validation)
    # assert: with the side-car's bias, PEFT's logits are the program's class logits, row for row
    program_logits = program.class_logits(validation.input_ids, validation.lengths, b)  # bias included
    bias = np.asarray(program.manifest.class_bias, dtype=np.float32)
    assert served.calibration.class_bias == program.manifest.class_bias and np.any(bias)
    np.testing.assert_allclose(logits + bias, program_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(predict(logits, served.calibration.class_bias), program_logits.argmax(axis=1))
    assert accuracy.examples == len(validation)
    assert accuracy.with_bias == program.accuracy(validation, b)
    # without the bias, the argmax of the raw verbalizer logits: what PEFT alone gives
    assert accuracy.without_bias == float(((program_logits - bias).argmax(axis=1) == validation.labels).mean())


def test_the_bias_is_what_tells_the_two_figures_apart(tiny_program, adapter) -> None:
    program, b, adapter_dir = adapter
    served = load_adapter(copy.deepcopy(tiny_program.loaded.model), adapter_dir)
    test = program.load_data()["test"]
    logits = verbalizer_logits(served, test.input_ids, test.lengths)
    # A bias that favours class 1 by far more than any logit gap turns every prediction into class 1.
    assert set(predict(logits, [0.0, 1e4]).tolist()) == {1}
    assert (predict(logits, None) == logits.argmax(axis=1)).all()
    empty = served_accuracy(served, test, limit=0)
    assert empty.examples == 0 and math.isnan(empty.with_bias) and math.isnan(empty.without_bias)


def test_an_adapter_without_its_side_car_is_refused_by_name(tiny_program, adapter, tmp_path) -> None:
    _, _, adapter_dir = adapter
    bare = tmp_path / "adapter"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter_dir / name).read_bytes())
    with pytest.raises(InputError, match=f"{CALIBRATION_FILE}: missing"):
        load_adapter(copy.deepcopy(tiny_program.loaded.model), bare)


@pytest.mark.parametrize("change, message", [
    ({"class_bias": [0.5]}, "one entry per class"),
    ({"class_bias": "0.5"}, r"class_bias: expected a list"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_a_malformed_side_car_is_refused_by_field(tiny_program, adapter, tmp_path, change, message) -> None:
    _, _, adapter_dir = adapter
    calibration = json.loads((adapter_dir / CALIBRATION_FILE).read_text())
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(calibration | change))
    with pytest.raises(InputError, match=message):
        load_adapter(copy.deepcopy(tiny_program.loaded.model), tmp_path)
