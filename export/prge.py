"""The P-RGE training step as one exportable module.

P-RGE (Gao et al., "Enabling Efficient On-Device Fine-Tuning of LLMs Using Only
Inference Engines", arXiv 2409.15520; later MobiZO, EMNLP 2025) estimates the
gradient of the loss with respect to the LoRA-FA B tensors from forward passes
only, so a whole training step is an inference program:

A program trains one *block* of the job's adapter (``shared.blocks``): a
contiguous range of the job's trainable layers, one contiguous slice
``b_blk = b[offset:offset + P_blk]`` of the job's flat vector ``b`` [P]. Every
layer of the job carries its LoRA-FA term, read from the global ``b`` (after a
round of cooperative training the other devices' blocks are not zero, and the
hidden states this block sees depend on them); only the block's slice is
perturbed and updated. A single-device program is the block of every trainable
layer (P_blk = P).

1. draw ``z_i ~ N(0, I)`` shaped like ``b_blk`` for i = 1..q (here ``z`` is an
   input so that runs are reproducible and resumable: the host draws it from a
   seeded generator; ``PrgeStepInGraphNoise`` draws it in the graph instead);
2. perturbed copies ``b_i+ = b_blk + eps·z_i`` and ``b_i- = b_blk − eps·z_i``:
   2q copies of the block's slice;
3. prefix sharing: the layers below the block's shallowest layer see no
   perturbation (they carry the other blocks' unperturbed LoRA terms), so they
   run once on bs rows; the hidden state is expanded to 2q·bs rows at the
   block's first layer. The shallower the block, the more layers run widened:
   the monotone cost the planner assumes;
4. multi-perturbed LoRA inside the block:
   ``y = x Wᵀ + (alpha/r) · bmm(view(x Aᵀ, [2q, bs·T, r]), B_copyᵀ)``
   (outer-loop parallelism over the q directions and inner-loop over ±eps are
   both folded into the batch dimension, so one forward does the whole step);
   layers deeper than the block carry one unperturbed B, shared by all 2q·bs
   rows;
5. loss per copy at the answer position only: the last decoder layer computes
   its queries, attention output and MLP at that position alone (its keys and
   values still span the sequence), the LM head is applied to one
   hidden state per row, a calibration bias (export.calibration) is added, and
   by default the cross-entropy is taken over the
   task's verbalizer tokens only (classification-style, as MeZO's
   ``train_as_classification``: with a full-vocabulary cross-entropy the loss
   fell while accuracy stayed at chance, because mass moved onto both answers);
6. ``g_i = (L_i+ − L_i−) / (2·eps)`` and ``b_blk ← b_blk − lr · mean_i(g_i · z_i)``;
7. outputs: the block's new slice ``b_blk`` [P_blk], the mean loss over the 2q
   copies, and ``g``.

``lr`` and ``eps`` are tensor inputs: a Python float would be baked into the
exported graph as a constant.

The forward is a plain re-statement of the Llama decoder that reads the wrapped
Hugging Face model's weights (the model itself is never edited): one code path
that exports cleanly, batches the copies, and gathers the answer position before
the head.  Sequences are right-padded, so causal attention already keeps real
tokens from seeing padding and no padding mask is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from export.lora import AdapterTensors
from shared.blocks import BlockSpan, block_span, whole_span
from shared.errors import InputError

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class PrgeConfig:
    """Shapes and choices baked into one program."""

    q: int = 4  # random directions per step (outer loop)
    batch_size: int = 4  # examples per step
    seq_len: int = 64  # T: tokens per example, right-padded
    loss: str = "verbalizer"  # "verbalizer": CE over the answer words; "vocab": CE over the whole vocabulary
    prefix_sharing: bool = True  # run layers below the shallowest trainable one once


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PrgeProgram(nn.Module):
    """The Llama forward with the job's LoRA-FA terms and 1 or 2q copies of one block's B's.

    Holds the frozen weights (by reference to the wrapped model's modules), the
    frozen A's, the rotary tables and the verbalizer rows of the LM head.
    """

    def __init__(self, model: nn.Module, adapter: AdapterTensors, cfg: PrgeConfig,
                 verbalizer_ids: list[int], block: tuple[int, int] | None = None) -> None:
        """Args:
            model: the Hugging Face Llama, wrapped (never edited).
            adapter: the job's adapter: its A's and the layout of ``b`` [P].
            cfg: shapes and choices.
            verbalizer_ids: the answer words' token ids, in class order.
            block: (first_layer, last_layer) of the trainable layers this program
                perturbs and updates; None: every trainable layer.

        Raises:
            InputError: an unsupported model or loss, no trainable layer, or a block
                that is not a range of the job's trainable layers.
        """
        super().__init__()
        config = model.config
        if getattr(config, "hidden_act", "silu") not in SUPPORTED_ACTIVATIONS:
            raise InputError(f"activation {config.hidden_act!r} is not supported (supported: {SUPPORTED_ACTIVATIONS})")
        if cfg.loss not in ("verbalizer", "vocab"):
            raise InputError(f"loss {cfg.loss!r}: expected 'verbalizer' or 'vocab'")
        if not adapter.cfg.layers:
            raise InputError("no trainable layer")
        self.cfg = cfg
        # Kept out of the module tree (a plain attribute in a tuple) so that the
        # export sees only what the forward uses; used by `like`.
        self._sources = (model, adapter)
        self.adapter_cfg = adapter.cfg
        self.layout = adapter.layout
        self.scale = adapter.cfg.scale
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.norm_eps = config.rms_norm_eps
        self.num_layers = config.num_hidden_layers
        self.block: BlockSpan = whole_span(self.layout) if block is None else block_span(self.layout, *block)
        # The copies only differ from the block's shallowest layer on: expand there.
        self.expand_at = self.block.first_layer if cfg.prefix_sharing else 0

        # Frozen weights, shared with the wrapped model (no copy).
        self.embed_tokens = model.model.embed_tokens
        self.layers = model.model.layers
        self.norm = model.model.norm
        lm_head = model.get_output_embeddings().weight  # [V, H]
        self.register_buffer("verbalizer_ids", torch.tensor(verbalizer_ids, dtype=torch.long), persistent=False)
        # Calibration bias on the class logits (export.calibration); zero until set.
        self.register_buffer("class_bias", torch.zeros(len(verbalizer_ids)), persistent=False)  # [C]
        if cfg.loss == "verbalizer":
            # Only the answer words' rows of the head are ever needed: [C, H].
            self.register_buffer("head", lm_head.detach()[verbalizer_ids].clone(), persistent=False)
        else:
            self.register_buffer("head", lm_head.detach(), persistent=False)  # [V, H]

        # Frozen A's, one buffer per target linear; names must be valid attribute names.
        self._a_name: dict[tuple[int, str], str] = {}
        for slot in self.layout:
            name = f"lora_a_{slot.layer}_{slot.module}"
            self.register_buffer(name, adapter.a_by_path[slot.path].clone(), persistent=False)  # [r, in]
            self._a_name[(slot.layer, slot.module)] = name
        self._slot = {(slot.layer, slot.module): slot for slot in self.layout}

        # Rotary tables for positions 0..T-1 from the model's own rotary module
        # (honours its rope scaling), and the causal mask.
        T = cfg.seq_len
        positions = torch.arange(T).unsqueeze(0)  # [1, T]
        probe = torch.zeros(1, T, self.head_dim)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(probe, positions)  # [1, T, hd] each
        self.register_buffer("rope_cos", cos[0].clone(), persistent=False)  # [T, hd]
        self.register_buffer("rope_sin", sin[0].clone(), persistent=False)  # [T, hd]
        # Causal mask, repeated for the query heads stacked along time (see _decoder_layer).
        rep = self.num_heads // self.num_kv_heads
        mask = torch.full((T, T), float("-inf")).triu(1).repeat(rep, 1)  # [rep·T, T]: -inf above the diagonal
        self.register_buffer("causal_mask", mask, persistent=False)
        hidden = config.hidden_size
        self.register_buffer("mean_row", torch.full((1, hidden), 1.0 / hidden), persistent=False)  # [1, H]

    @classmethod
    def like(cls, other: "PrgeProgram", cfg: PrgeConfig, block: tuple[int, int] | None = None) -> "PrgeProgram":
        """A program over the same model and adapter with other shapes (e.g. a shorter T)
        or another ``block`` (default: ``other``'s)."""
        model, adapter = other._sources
        program = cls(model, adapter, cfg, other.verbalizer_ids.tolist(),
                      (other.block.first_layer, other.block.last_layer) if block is None else block)
        program.class_bias.copy_(other.class_bias)
        return program

    @property
    def b_size(self) -> int:
        """P, the length of the job's global ``b``."""
        return sum(slot.size for slot in self.layout)

    @property
    def block_size(self) -> int:
        """P_blk, the length of the block's slice of ``b`` (what z and the update span)."""
        return self.block.size

    # -- pieces ---------------------------------------------------------------

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The mean of squares as a matmul with a constant [1, H] row of 1/H: XNNPACK
        # delegates a linear but not a mean over the last dim of a 3-D tensor, and
        # every op left outside the delegate splits it and runs single-threaded.
        variance = F.linear(x * x, self.mean_row)  # [..., 1]
        return weight * (x * torch.rsqrt(variance + self.norm_eps))

    def _linear(self, x: torch.Tensor, linear: nn.Linear, layer: int, module: str,
                lora: _LayerB | None) -> torch.Tensor:
        """Frozen linear plus, if (layer, module) is trained, its LoRA term with ``lora``'s B's.

        ``lora.rows`` [c, width] holds c versions of a stretch of ``b`` that starts at
        ``lora.offset``: the c rows of x's batch are split into c equal groups, group i
        using version i (c = 1: one B shared by every row).
        """
        y = F.linear(x, linear.weight, linear.bias)  # [N, T, out]
        slot = self._slot.get((layer, module))
        if slot is None or lora is None:
            return y
        copies = lora.rows.shape[0]
        N, T, _ = x.shape
        a = getattr(self, self._a_name[(layer, module)])  # [r, in]
        xa = F.linear(x, a).reshape(copies, (N // copies) * T, a.shape[0])  # [c, N/c·T, r]
        start = slot.offset - lora.offset
        b = lora.rows[:, start:start + slot.size].reshape(copies, slot.shape[0], slot.shape[1])  # [c, out, r]
        # bmm also for c = 1: XNNPACK takes a bmm with a runtime operand, a linear
        # only with a constant weight.
        delta = torch.bmm(xa, b.transpose(1, 2))  # [c, N/c·T, out]
        return y + self.scale * delta.reshape(y.shape)

    def _decoder_layer(self, h: torch.Tensor, index: int, lora: _LayerB | None) -> torch.Tensor:
        layer = self.layers[index]
        N, T, _ = h.shape
        hd, nkv = self.head_dim, self.num_kv_heads
        rep = self.num_heads // nkv

        x = self._rms_norm(h, layer.input_layernorm.weight)  # [N, T, H]
        q = self._linear(x, layer.self_attn.q_proj, index, "q_proj", lora).view(N, T, self.num_heads, hd).transpose(1, 2)
        q = q * self.rope_cos + _rotate_half(q) * self.rope_sin  # [N, nh, T, hd]
        k, v = self._keys_values(x, index, lora)  # [N·nkv, T, hd] each
        # Grouped-query attention without materialising repeated k/v: the `rep` query
        # heads that share a kv head are stacked along the time axis instead.
        attn_out = self._attend(q.reshape(N * nkv, rep * T, hd), k, v, self.causal_mask)  # [N·nkv, rep·T, hd]
        attn_out = attn_out.reshape(N, self.num_heads, T, hd).transpose(1, 2).reshape(N, T, self.num_heads * hd)  # [N, T, nh·hd]
        h = h + self._linear(attn_out, layer.self_attn.o_proj, index, "o_proj", lora)
        return self._mlp_residual(h, index, lora)

    def _last_layer_at(self, h: torch.Tensor, positions: torch.Tensor, index: int,
                       lora: _LayerB | None) -> torch.Tensor:
        """A decoder layer's output at one position per row: what ``_decoder_layer`` gives
        there, for 1/T of the query, output-projection and MLP work.

        Args:
            h: [N, T, H] the layer's input.
            positions: [N] the position to compute in each row.

        Returns:
            [N, H] the layer's output at ``positions``.
        """
        layer = self.layers[index]
        N, T, H = h.shape
        hd, nkv = self.head_dim, self.num_kv_heads
        rep = self.num_heads // nkv
        flat_index = torch.arange(N, dtype=torch.long) * T + positions  # [N]

        x = self._rms_norm(h, layer.input_layernorm.weight)  # [N, T, H]
        k, v = self._keys_values(x, index, lora)  # [N·nkv, T, hd] each: every position is a key

        h_at = torch.index_select(h.reshape(N * T, H), 0, flat_index).unsqueeze(1)  # [N, 1, H]
        x_at = torch.index_select(x.reshape(N * T, H), 0, flat_index).unsqueeze(1)  # [N, 1, H]
        q = self._linear(x_at, layer.self_attn.q_proj, index, "q_proj", lora).view(N, self.num_heads, hd)  # [N, nh, hd]
        cos = torch.index_select(self.rope_cos, 0, positions).unsqueeze(1)  # [N, 1, hd]
        sin = torch.index_select(self.rope_sin, 0, positions).unsqueeze(1)  # [N, 1, hd]
        q = q * cos + _rotate_half(q) * sin  # [N, nh, hd]
        # Causal at one position: keys after it are masked out.
        after = (torch.arange(T).unsqueeze(0) > positions.unsqueeze(1)).to(h.dtype)  # [N, T]: 1 where masked
        mask = (after * -1e9).repeat_interleave(nkv, dim=0).unsqueeze(1)  # [N·nkv, 1, T]
        # As in _decoder_layer, with one query position: the rep heads of a kv head stacked.
        attn_out = self._attend(q.reshape(N * nkv, rep, hd), k, v, mask).reshape(N, 1, self.num_heads * hd)  # [N, 1, nh·hd]
        h_at = h_at + self._linear(attn_out, layer.self_attn.o_proj, index, "o_proj", lora)
        return self._mlp_residual(h_at, index, lora).squeeze(1)  # [N, H]

    def _keys_values(self, x: torch.Tensor, index: int, lora: _LayerB | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's rotated keys and its values over all T positions: [N·nkv, T, hd] each."""
        attn = self.layers[index].self_attn
        N, T, _ = x.shape
        hd, nkv = self.head_dim, self.num_kv_heads
        k = self._linear(x, attn.k_proj, index, "k_proj", lora).view(N, T, nkv, hd).transpose(1, 2)
        v = self._linear(x, attn.v_proj, index, "v_proj", lora).view(N, T, nkv, hd).transpose(1, 2)
        k = k * self.rope_cos + _rotate_half(k) * self.rope_sin  # [N, nkv, T, hd]
        return k.reshape(N * nkv, T, hd), v.reshape(N * nkv, T, hd)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention as explicit 3-D bmm (a 4-D matmul decomposes into expand copies
        that XNNPACK does not take): q [B, Q, hd], k and v [B, T, hd], mask added to the
        [B, Q, T] scores -> [B, Q, hd]."""
        scores = torch.bmm(q, k.transpose(1, 2)) * (self.head_dim ** -0.5) + mask  # [B, Q, T]
        return torch.bmm(torch.softmax(scores, dim=-1), v)  # [B, Q, hd]

    def _mlp_residual(self, h: torch.Tensor, index: int, lora: _LayerB | None) -> torch.Tensor:
        """``h`` plus the layer's MLP of its normed ``h``: [N, T, H] -> [N, T, H]."""
        layer = self.layers[index]
        mlp = layer.mlp
        x = self._rms_norm(h, layer.post_attention_layernorm.weight)
        gate = self._linear(x, mlp.gate_proj, index, "gate_proj", lora)  # [N, T, I]
        up = self._linear(x, mlp.up_proj, index, "up_proj", lora)  # [N, T, I]
        return h + self._linear(F.silu(gate) * up, mlp.down_proj, index, "down_proj", lora)

    # -- the forward with copies ------------------------------------------------

    def _layer_b(self, index: int, b_row: torch.Tensor, block_copies: torch.Tensor | None) -> _LayerB:
        """The B's layer ``index`` reads: the block's copies inside the block, else the one global b."""
        if block_copies is not None and self.block.first_layer <= index <= self.block.last_layer:
            return _LayerB(block_copies, self.block.offset)
        return _LayerB(b_row, 0)

    def answer_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, b: torch.Tensor,
                      block_copies: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits at each row's answer position, for every copy of the block's slice.

        Args:
            input_ids: [bs, T] right-padded token ids.
            lengths: [bs] real tokens per row; the answer follows position lengths-1.
            b: [P] the job's global b: the B's of every layer outside the block
                (and inside it when ``block_copies`` is None).
            block_copies: [c, P_blk] c versions of the block's slice; None: ``b``'s own.

        Returns:
            [c·bs, C] logits (C = verbalizer size, or the vocabulary for loss="vocab");
            row i·bs + j is copy i of example j (c = 1 without ``block_copies``).
        """
        copies = 1 if block_copies is None else block_copies.shape[0]
        bs, T = input_ids.shape
        b_row = b.unsqueeze(0)  # [1, P]: one B shared by every row
        h = self.embed_tokens(input_ids)  # [bs, T, H]
        last = self.num_layers - 1
        for index in range(last):
            if index == self.expand_at and copies > 1:
                h = h.repeat(copies, 1, 1)  # [c·bs, T, H]: copy i holds rows i·bs..i·bs+bs-1
            h = self._decoder_layer(h, index, self._layer_b(index, b_row, block_copies))
        if last == self.expand_at and copies > 1:
            h = h.repeat(copies, 1, 1)
        N = h.shape[0]
        answer_pos = (lengths - 1).repeat(N // bs)  # [N]
        # The last layer only at each row's last real token: its keys and values still span
        # all T tokens, but nothing reads its output anywhere else.
        h_answer = self._last_layer_at(h, answer_pos, last, self._layer_b(last, b_row, block_copies))  # [N, H]
        h_answer = self._rms_norm(h_answer, self.norm.weight)
        return F.linear(h_answer, self.head)  # [N, C]

    def copy_losses(self, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                    b: torch.Tensor, block_copies: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy per copy of the block's slice: [c] (c = 1 without ``block_copies``).

        Args: as :meth:`answer_logits`, with labels [bs] class indices.
        """
        copies = 1 if block_copies is None else block_copies.shape[0]
        bs = input_ids.shape[0]
        logits = self.answer_logits(input_ids, lengths, b, block_copies)  # [c·bs, C]
        if self.cfg.loss == "verbalizer":
            logits = logits + self.class_bias  # the calibrated classifier is the one trained
        targets = labels if self.cfg.loss == "verbalizer" else self.verbalizer_ids[labels]  # [bs]
        log_probs = torch.log_softmax(logits, dim=-1)  # [c·bs, C]
        picked = torch.gather(log_probs, 1, targets.repeat(copies).unsqueeze(1))  # [c·bs, 1]
        return -picked.reshape(copies, bs).mean(dim=1)  # [c]

    def class_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Logits over the task's classes for one (unperturbed) global ``b`` [P]: [bs, C]."""
        logits = self.answer_logits(input_ids, lengths, b)  # [bs, C or V]
        if self.cfg.loss == "vocab":
            logits = logits[:, self.verbalizer_ids]  # [bs, C]
        return logits + self.class_bias  # [bs, C]

    def step(self, input_ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, b: torch.Tensor,
             z: torch.Tensor, lr: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One P-RGE step on the block (steps 2-7 of the module docstring).

        Args:
            b: [P] the job's global b. z: [q, P_blk] directions on the block. lr, eps: [1].

        Returns:
            (b_blk_new [P_blk], mean loss over the 2q copies [1], g [q]).
        """
        q = z.shape[0]
        b_blk = b[self.block.offset:self.block.stop]  # [P_blk]
        block_copies = torch.cat([b_blk + eps * z, b_blk - eps * z], dim=0)  # [2q, P_blk]: +eps copies, then -eps
        losses = self.copy_losses(input_ids, lengths, labels, b, block_copies)  # [2q]
        g = (losses[:q] - losses[q:]) / (2 * eps)  # [q] projected gradients
        b_blk_new = b_blk - lr * (g.unsqueeze(1) * z).mean(dim=0)  # [P_blk]
        return b_blk_new, losses.mean().reshape(1), g


class _LayerB(NamedTuple):
    """The B's one layer reads: ``rows`` [c, width] versions of ``b[offset:offset + width]``."""

    rows: torch.Tensor
    offset: int


class PrgeStep(nn.Module):
    """Method ``step``: (input_ids, lengths, labels, b [P], z [q, P_blk], lr, eps) -> (b_blk_new, loss, g)."""

    def __init__(self, program: PrgeProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, input_ids, lengths, labels, b, z, lr, eps):
        return self.program.step(input_ids, lengths, labels, b, z, lr, eps)


class PrgeStepInGraphNoise(nn.Module):
    """Method ``step_rng``: as ``step`` but z is drawn in the graph (unseeded on device)."""

    def __init__(self, program: PrgeProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, input_ids, lengths, labels, b, lr, eps):
        z = torch.randn(self.program.cfg.q, self.program.block_size)  # [q, P_blk]
        return self.program.step(input_ids, lengths, labels, b, z, lr, eps)


class PrgeLoss(nn.Module):
    """Method ``loss``: (input_ids, lengths, labels, b) -> mean loss [1] for one ``b``.

    One unperturbed forward: what a sequential (MeZO-style) step calls 2q times.
    """

    def __init__(self, program: PrgeProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, input_ids, lengths, labels, b):
        return self.program.copy_losses(input_ids, lengths, labels, b)


class PrgeEval(nn.Module):
    """Method ``eval``: (input_ids, lengths, b) -> class_logits [bs, C]."""

    def __init__(self, program: PrgeProgram) -> None:
        super().__init__()
        self.program = program

    def forward(self, input_ids, lengths, b):
        return self.program.class_logits(input_ids, lengths, b)


def example_inputs(cfg: PrgeConfig, b_size: int, vocab_size: int, seed: int = 0,
                   block_size: int | None = None) -> dict[str, tuple]:
    """Inputs of the right shapes and dtypes for each method (for export and tests).

    ``b_size`` is P (the global b), ``block_size`` P_blk (z's width; default P).
    """
    gen = torch.Generator().manual_seed(seed)
    bs, T, q = cfg.batch_size, cfg.seq_len, cfg.q
    input_ids = torch.randint(0, vocab_size, (bs, T), generator=gen)
    lengths = torch.randint(T // 2, T + 1, (bs,), generator=gen)
    labels = torch.randint(0, 2, (bs,), generator=gen)
    b = torch.randn(b_size, generator=gen) * 1e-3
    z = torch.randn(q, b_size if block_size is None else block_size, generator=gen)
    lr = torch.tensor([1e-3])
    eps = torch.tensor([1e-2])
    return {
        "step": (input_ids, lengths, labels, b, z, lr, eps),
        "step_rng": (input_ids, lengths, labels, b, lr, eps),
        "eval": (input_ids, lengths, b),
        "loss": (input_ids, lengths, labels, b),
    }
