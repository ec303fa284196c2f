"""Tests for device_agent/tokenizer.py: a device encodes its rows exactly as the exporter does, without transformers."""
from __future__ import annotations

import numpy as np
import pytest

from device_agent.tokenizer import DeviceTokenizer
from shared.errors import InputError
from shared.tasks import Example, encode_split, rotten_tomatoes_task, verbalizer_token_ids


def test_device_encoding_matches_the_exporters_on_every_real_position(smollm2_tokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    smollm2_tokenizer.backend_tokenizer.save(str(path))
    device = DeviceTokenizer(path)
    task = rotten_tomatoes_task()
    examples = [Example("A gorgeous, moving film.", "fresh"), Example("Dull.", "rotten"),
                Example(" ".join(["an endless, shapeless and joyless slog"] * 12), "rotten")]  # cut to fit
    ours, theirs = encode_split(examples, task, device, 32), encode_split(examples, task, smollm2_tokenizer, 32)
    np.testing.assert_array_equal(ours.lengths, theirs.lengths)
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert theirs.lengths[2] == 32  # the long review was truncated, keeping the cue words
    for row, length in enumerate(theirs.lengths):
        np.testing.assert_array_equal(ours.input_ids[row, :length], theirs.input_ids[row, :length])
    assert verbalizer_token_ids(task, device) == verbalizer_token_ids(task, smollm2_tokenizer)


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"not": "a tokenizer"}')
    with pytest.raises(InputError, match="not a tokenizer.json"):
        DeviceTokenizer(path)
