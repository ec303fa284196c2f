"""LoRA-FA adapter tensors: layout, seeded A, PEFT round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from export.lora import LoraFaConfig, attach_lora_fa, b_layout, lora_a_tensors, parse_layers, read_b
from shared.errors import InputError


@pytest.mark.parametrize("text, expected", [
    ("all", tuple(range(4))), ("top:2", (2, 3)), ("1-2", (1, 2)), ("3,0", (0, 3)),
])
def test_parse_layers(text: str, expected: tuple[int, ...]) -> None:
    assert parse_layers(text, 4) == expected


@pytest.mark.parametrize("text", ["top:0", "top:9", "2-7", "x", "", "5"])
def test_parse_layers_rejects_bad_input(text: str) -> None:
    with pytest.raises(InputError, match="--layers"):
        parse_layers(text, 4)


def test_layout_is_contiguous_and_sized_by_out_and_rank(tiny_model) -> None:
    cfg = LoraFaConfig(rank=4, layers=(1, 3), target_modules=("q_proj", "v_proj", "down_proj"))
    layout = b_layout(tiny_model.model, cfg)
    hidden = tiny_model.model.config.hidden_size
    kv = tiny_model.model.config.num_key_value_heads * (hidden // tiny_model.model.config.num_attention_heads)
    assert [(s.layer, s.module) for s in layout] == [(1, "q_proj"), (1, "v_proj"), (1, "down_proj"),
                                                     (3, "q_proj"), (3, "v_proj"), (3, "down_proj")]
    assert [s.shape for s in layout[:3]] == [(hidden, 4), (kv, 4), (hidden, 4)]
    offsets = [s.offset for s in layout]
    assert offsets == [sum(s.size for s in layout[:i]) for i in range(len(layout))]


def test_a_does_not_depend_on_which_layers_a_program_trains(tiny_model) -> None:
    # Devices training different blocks must agree on A.
    one = lora_a_tensors(tiny_model.model, LoraFaConfig(layers=(2,)))
    both = lora_a_tensors(tiny_model.model, LoraFaConfig(layers=(1, 2)))
    key = "model.layers.2.self_attn.q_proj"
    assert torch.equal(one[key], both[key])
    assert not torch.equal(both[key], both["model.layers.1.self_attn.q_proj"])
    in_features = tiny_model.model.config.hidden_size
    assert both[key].abs().max() <= 1 / in_features ** 0.5  # PEFT's kaiming-uniform bound


def test_unknown_target_module_is_an_input_error(tiny_model) -> None:
    with pytest.raises(InputError, match="target module 'qq_proj'"):
        b_layout(tiny_model.model, LoraFaConfig(layers=(1,), target_modules=("qq_proj",)))


def test_peft_model_round_trips_b_and_freezes_a(tiny_model) -> None:
    cfg = LoraFaConfig(layers=(2, 3))
    layout = b_layout(tiny_model.model, cfg)
    b = torch.randn(sum(s.size for s in layout), generator=torch.Generator().manual_seed(3))
    peft_model = attach_lora_fa(copy.deepcopy(tiny_model.model), cfg, b)
    assert torch.equal(read_b(peft_model, layout), b)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_B" in n for n in trainable)
