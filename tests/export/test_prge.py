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
            (program.copy_losses(ids, lengths, labels, b + eps * z[i])
             - program.copy_losses(ids, lengths, labels, b - eps * z[i]))[0] / (2 * eps[0])
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
        before = program.copy_losses(ids, lengths, labels, b)[0]
        for _ in range(30):
            z = torch.randn(program.cfg.q, program.b_size, generator=gen)
            b, _, _ = program.step(ids, lengths, labels, b, z, torch.tensor([0.05]), eps)
        after = program.copy_losses(ids, lengths, labels, b)[0]
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
        raw_loss = program.copy_losses(ids, lengths, labels, b)
        program.class_bias.copy_(torch.tensor([3.0, -3.0]))
        biased_logits = program.class_logits(ids, lengths, b)
        biased_loss = program.copy_losses(ids, lengths, labels, b)
    torch.testing.assert_close(biased_logits, raw_logits + torch.tensor([3.0, -3.0]))
    assert not torch.allclose(raw_loss, biased_loss)


@pytest.mark.parametrize("block", [(1, 1), (2, 2), (3, 3), (2, 3)])
def test_a_block_step_is_the_whole_step_with_z_zero_outside_the_block(tiny_model, block) -> None:
    # prepare: the job trains layers 1-3; a global b with every layer non-zero
    whole = build(tiny_model.model, layers=(1, 2, 3))
    part = PrgeProgram(tiny_model.model, AdapterTensors.build(tiny_model.model, whole.adapter_cfg), whole.cfg,
                       VERBALIZER, block=block)
    ids, lengths, labels, _, _, lr, eps = example_inputs(whole.cfg, whole.b_size, 1000)["step"]
    gen = torch.Generator().manual_seed(2)
    b = torch.randn(whole.b_size, generator=gen) * 0.05
    z = torch.randn(whole.cfg.q, part.block_size, generator=gen)
    z_whole = torch.zeros(whole.cfg.q, whole.b_size)
    z_whole[:, part.block.offset:part.block.stop] = z
    # execute
    with torch.no_grad():
        b_blk, loss, g = part.step(ids, lengths, labels, b, z, lr, eps)
        b_all, loss_all, g_all = whole.step(ids, lengths, labels, b, z_whole, lr, eps)
    # assert: the copies widen at the block's first layer, and the step is the same step
    assert part.expand_at == block[0] and b_blk.shape == (part.block_size,)
    torch.testing.assert_close(loss, loss_all, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_blk, b_all[part.block.offset:part.block.stop], rtol=0, atol=1e-6)
    outside = torch.ones(whole.b_size, dtype=torch.bool)
    outside[part.block.offset:part.block.stop] = False
    assert torch.equal(b_all[outside], b[outside])


def test_the_other_blocks_b_changes_what_a_block_sees(tiny_model) -> None:
    # A block program reads every layer's LoRA from the global b: the loss moves with layer 1's B
    # although the program perturbs layer 3 only.
    part = PrgeProgram(tiny_model.model, AdapterTensors.build(tiny_model.model, LoraFaConfig(layers=(1, 2, 3))),
                       PrgeConfig(seq_len=16), VERBALIZER, block=(3, 3))
    ids, lengths, labels, *_ = example_inputs(part.cfg, part.b_size, 1000)["step"]
    b = torch.zeros(part.b_size)
    moved = b.clone()
    moved[:part.block.offset] = torch.randn(part.block.offset, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(part.copy_losses(ids, lengths, labels, b), part.copy_losses(ids, lengths, labels, moved))


def test_a_block_outside_the_jobs_layers_is_an_input_error(tiny_model) -> None:
    adapter = AdapterTensors.build(tiny_model.model, LoraFaConfig(layers=(2, 3)))
    with pytest.raises(InputError, match="block 1-2: layer 1 is not a trainable layer of this job"):
        PrgeProgram(tiny_model.model, adapter, PrgeConfig(seq_len=16), VERBALIZER, block=(1, 2))
