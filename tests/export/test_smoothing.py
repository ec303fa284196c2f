"""SmoothQuant folding: the fp32 function is unchanged, activation outliers shrink, int8 gets closer."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from export.lora import AdapterTensors, LoraFaConfig
from export.prge import PrgeConfig, PrgeProgram
from export.int8 import quantize_base_weights
from export.smoothing import input_ranges, scale_lora_a, smooth_

T = 16


def _prompts(vocab: int, n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 2, T + 1, n)
    ids = rng.integers(0, vocab, (n, T))
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0  # right padding
    return ids, lengths


def _with_outlier_channel(model: torch.nn.Module, channel: int = 5, factor: float = 30.0) -> torch.nn.Module:
    """A copy whose q/k/v and gate/up inputs have one channel ``factor`` times larger,
    as SmolLM2's linears do (max/median channel range 4-8x)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[channel] *= factor
            layer.post_attention_layernorm.weight[channel] *= factor
    return model


def _class_logits(model, adapter, b, ids, lengths) -> torch.Tensor:
    program = PrgeProgram(model, adapter, PrgeConfig(batch_size=len(lengths), seq_len=T), [11, 22])
    with torch.no_grad():
        return program.class_logits(torch.as_tensor(ids), torch.as_tensor(lengths), b)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "gate_proj", "down_proj"), ("up_proj", "o_proj")])
def test_smoothing_with_scaled_a_leaves_the_programs_function_unchanged(tiny_model, targets) -> None:
    # prepare: a trained-looking adapter (b != 0) on two layers, prompts for the ranges
    model = tiny_model.model
    adapter = AdapterTensors.build(model, LoraFaConfig(rank=4, layers=(1, 3), target_modules=targets))
    b = torch.randn(adapter.b_size, generator=torch.Generator().manual_seed(1)) * 0.1
    ids, lengths = _prompts(model.config.vocab_size)
    ranges = input_ranges(model, ids, lengths)
    # execute
    smoothed = copy.deepcopy(model)
    scales = smooth_(smoothed, ranges, alpha=0.5, trained=frozenset((s.layer, s.module) for s in adapter.layout))
    scaled = scale_lora_a(adapter, scales)
    # assert: the same logits; the weights did change; the caller's A's did not
    expected = _class_logits(model, adapter, b, ids[:4], lengths[:4])
    got = _class_logits(smoothed, scaled, b, ids[:4], lengths[:4])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(smoothed.model.layers[1].self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
    assert all(torch.equal(adapter.a_by_path[p], AdapterTensors.build(model, adapter.cfg).a_by_path[p])
               for p in adapter.a_by_path)
    # a trained up_proj keeps its output scale: its layers' down group is not smoothed
    assert ((1, "down") in scales) == ("up_proj" not in targets)


def test_smoothing_shrinks_the_outlier_channel_of_the_activations(tiny_model) -> None:
    model = _with_outlier_channel(tiny_model.model)
    ids, lengths = _prompts(model.config.vocab_size)
    before = input_ranges(model, ids, lengths)
    smoothed = copy.deepcopy(model)
    smooth_(smoothed, before, alpha=0.5)
    after = input_ranges(smoothed, ids, lengths)

    def spread(r: torch.Tensor) -> float:
        return float(r.max() / r.median())

    for key in ((0, "attn"), (2, "mlp")):
        assert spread(before[key]) > 10
        assert spread(after[key]) < spread(before[key]) / 3


def test_smoothing_brings_int8_logits_closer_to_fp32(tiny_model) -> None:
    # prepare: the outlier model in fp32, and int8 copies without and with smoothing
    model = _with_outlier_channel(tiny_model.model)
    adapter = AdapterTensors.build(model, LoraFaConfig(rank=4, layers=(3,)))
    b = torch.zeros(adapter.b_size)
    ids, lengths = _prompts(model.config.vocab_size, n=32, seed=1)
    ranges = input_ranges(model, ids[:24], lengths[:24])
    # execute
    with torch.no_grad():
        plain, _ = quantize_base_weights(model)
        smoothed, scales = quantize_base_weights(model, ranges, alpha=0.5)
    smoothed_adapter = scale_lora_a(adapter, scales)
    fp32 = _class_logits(model, adapter, b, ids[24:], lengths[24:])
    error_plain = (_class_logits(plain, adapter, b, ids[24:], lengths[24:]) - fp32).abs().mean()
    error_smoothed = (_class_logits(smoothed, smoothed_adapter, b, ids[24:], lengths[24:]) - fp32).abs().mean()
    # assert
    assert error_smoothed < 0.8 * error_plain  # measured: 0.68x (0.0086 against 0.0127)


def test_int8_base_without_training_prompts_quantises_without_smoothing(tiny_model) -> None:
    from export.int8 import int8_base
    from shared.task_data import Split

    empty = Split(input_ids=np.zeros((0, T), np.int64), lengths=np.zeros(0, np.int64), labels=np.zeros(0, np.int64))
    adapter = AdapterTensors.build(tiny_model.model, LoraFaConfig(rank=4, layers=(3,)))
    messages: list[str] = []
    _, program_adapter = int8_base(tiny_model.model, adapter, empty, smoothing=0.5, note=messages.append)
    assert any("int8 without smoothing" in m for m in messages)
    assert all(torch.equal(program_adapter.a_by_path[p], adapter.a_by_path[p]) for p in adapter.a_by_path)
