"""The verbalizer calibration: a bias from training prompts that splits them evenly."""
from __future__ import annotations

import torch

from export.calibration import median_class_bias
from export.lora import AdapterTensors, LoraFaConfig
from export.prge import PrgeConfig, PrgeProgram, example_inputs


def test_median_bias_splits_predictions_evenly_and_ignores_an_existing_bias(tiny_model) -> None:
    model = tiny_model.model
    program = PrgeProgram(model, AdapterTensors.build(model, LoraFaConfig(layers=(3,))), PrgeConfig(seq_len=16), [5, 7])

    class Split:  # 64 random prompts
        input_ids, lengths, labels = example_inputs(PrgeConfig(batch_size=64, seq_len=16), program.b_size, 1000)["step"][:3]

    program.class_bias.copy_(torch.tensor([10.0, -10.0]))  # must not leak into the measurement
    bias = median_class_bias(program, Split, limit=64, batch_size=16)
    assert torch.equal(program.class_bias, torch.tensor([10.0, -10.0]))
    program.class_bias.copy_(bias)
    with torch.no_grad():
        predicted = program.class_logits(Split.input_ids, Split.lengths, torch.zeros(program.b_size)).argmax(1)
    assert abs(float(predicted.float().mean()) - 0.5) <= 1 / 64 + 1e-9
    torch.testing.assert_close(bias.sum(), torch.tensor(0.0), atol=1e-5, rtol=0)
