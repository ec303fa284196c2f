"""The P-RGE step module in eager PyTorch: forward parity with PEFT, the estimator, prefix sharing."""
from __future__ import annotations

import copy

import pytest
import torch

from export.lora import AdapterTensors, LoraFaConfig, attach_lora_fa
from export.prge import PrgeConfig, PrgeProgram, example_inputs
from shared.errors import InputError

VERBALIZER = [5, 7]


def build(model, layers=(2, 3), targets=("q_proj", "v_proj"), **prge) -> PrgeProgram:
    adapter = AdapterTensors.build(model, LoraFaConfig(layers=layers, target_modules=targets))
    return PrgeProgram(model, adapter, PrgeConfig(seq_len=16, **prge), VERBALIZER)


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Layers (of 4): the last one is computed at the answer position only, so it is covered
# trained, trained alone (where the copies start) and frozen.
@pytest.mark.parametrize("targets,layers", [(("q_proj", "v_proj"), (2, 3)), (ALL_TARGETS, (2, 3)),
                                            (ALL_TARGETS, (3,)), (ALL_TARGETS, (1,))])
def test_class_logits_match_the_peft_model(tiny_model, targets, layers) -> None:
    model = tiny_model.model
    program = build(model, layers=layers, targets=targets)
    ids, lengths, *_ = example_inputs(program.cfg, program.b_size, 1000)["step"]
    b = torch.randn(program.b_size, generator=torch.Generator().manual_seed(1)) * 0.05
    peft_model = attach_lora_fa(copy.deepcopy(model), program.adapter_cfg, b)
    with torch.no_grad():
        ours = program.class_logits(ids, lengths, b)  # [bs, C]
        full = peft_model(input_ids=ids).logits  # [bs, T, V]
    reference = full[torch.arange(ids.shape[0]), lengths - 1][:, VERBALIZER]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [(2, 3), (3,)])
def test_step_is_the_two_sided_estimator(tiny_model, layers) -> None:
    program = build(tiny_model.model, layers=layers)
    ids, lengths, labels, b, z, lr, eps = example_inputs(program.cfg, program.b_size, 1000)["step"]
    with torch.no_grad():
        b_new, loss, g = program.step(ids, lengths, labels, b, z, lr, eps)
        # The same estimate, one copy at a time (what MeZO does sequentially).
        expected_g = torch.stack([
            (program.copy_losses(ids, lengths, labels, (b + eps * z[i]).unsqueeze(0))
             - program.copy_losses(ids, lengths, labels, (b - eps * z[i]).unsqueeze(0)))[0] / (2 * eps[0])
            for i in range(z.shape[0])])
    torch.testing.assert_close(g, expected_g, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(b_new, b - lr * (expected_g[:, None] * z).mean(0), atol=1e-6, rtol=1e-5)
    assert loss.shape == (1,) and loss.item() > 0


def test_prefix_sharing_changes_speed_not_results(tiny_model) -> None:
    shared = build(tiny_model.model, prefix_sharing=True)
    unshared = build(tiny_model.model, prefix_sharing=False)
    assert shared.expand_at == 2 and unshared.expand_at == 0
    args = example_inputs(shared.cfg, shared.b_size, 1000)["step"]
    with torch.no_grad():
        for a, b in zip(shared.step(*args), unshared.step(*args)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_step_with_small_lr_lowers_the_loss_on_its_batch(tiny_model) -> None:
    program = build(tiny_model.model)
    ids, lengths, labels, b, _, _, eps = example_inputs(program.cfg, program.b_size, 1000)["step"]
    gen = torch.Generator().manual_seed(0)
    b = torch.zeros(program.b_size)
    with torch.no_grad():
        before = program.copy_losses(ids, lengths, labels, b.unsqueeze(0))[0]
        for _ in range(30):
            z = torch.randn(program.cfg.q, program.b_size, generator=gen)
            b, _, _ = program.step(ids, lengths, labels, b, z, torch.tensor([0.05]), eps)
        after = program.copy_losses(ids, lengths, labels, b.unsqueeze(0))[0]
    assert after < before


def test_vocab_loss_reads_class_logits_from_the_verbalizer_rows(tiny_model) -> None:
    verbalizer = build(tiny_model.model, loss="verbalizer")
    vocab = build(tiny_model.model, loss="vocab")
    ids, lengths, _, b, *_ = example_inputs(verbalizer.cfg, verbalizer.b_size, 1000)["step"]
    with torch.no_grad():
        torch.testing.assert_close(verbalizer.class_logits(ids, lengths, b), vocab.class_logits(ids, lengths, b))


def test_unknown_loss_is_an_input_error(tiny_model) -> None:
    with pytest.raises(InputError, match="loss 'mse'"):
        build(tiny_model.model, loss="mse")


def test_class_bias_shifts_predictions_and_the_trained_loss(tiny_model) -> None:
    program = build(tiny_model.model)
    ids, lengths, labels, b, *_ = example_inputs(program.cfg, program.b_size, 1000)["step"]
    with torch.no_grad():
        raw_logits = program.class_logits(ids, lengths, b)
        raw_loss = program.copy_losses(ids, lengths, labels, b.unsqueeze(0))
        program.class_bias.copy_(torch.tensor([3.0, -3.0]))
        biased_logits = program.class_logits(ids, lengths, b)
        biased_loss = program.copy_losses(ids, lengths, labels, b.unsqueeze(0))
    torch.testing.assert_close(biased_logits, raw_logits + torch.tensor([3.0, -3.0]))
    assert not torch.allclose(raw_loss, biased_loss)
