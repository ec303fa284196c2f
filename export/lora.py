"""LoRA-FA: low-rank adapters whose A is frozen and whose B alone is trained.

LoRA (Hu et al., 2021) adds to a frozen linear ``y = x Wᵀ`` a low-rank update

    y = x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ,      A: [r, in], B: [out, r]

LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation")
freezes A at its random initialisation and trains B only, starting at zero, so
the adapter starts as the identity edit.  P-RGE perturbs and updates only B,
which halves the perturbed parameters and lets ``x Aᵀ`` be computed once for all
perturbed copies.

deftly splits one adapter across devices (each trains a block of layers), so A
must be the same wherever it is built: every A is drawn from a generator seeded
by ``(seed, layer, module)``, independent of which layers a given program trains.

The trainable state is one flat float32 vector ``b`` holding every trained B,
laid out by :func:`b_layout`; programs take and return that vector, and the
adapter files name each slice by its PEFT key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.errors import InputError
from shared.manifest import BSlot

# Where each Llama-family target linear lives inside a decoder layer.
MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class LoraFaConfig:
    """Settings of the LoRA-FA adapter.

    Defaults follow what trained best on SmolLM2 + Rotten Tomatoes here (docs/benchmarks.md).
    """

    rank: int = 8  # r; P-RGE's reference code uses 16
    alpha: float = 16.0  # scale is alpha / r
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()  # trainable decoder layers, ascending; () = filled in by the caller
    seed: int = 0  # seeds every A

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Parse ``all``, ``top:K`` or ``a-b`` (inclusive) or ``a,b,c`` into sorted layer indices.

    Raises:
        InputError: when the text is malformed or names a layer outside the model.
    """
    text = text.strip()
    try:
        if text == "all":
            layers = list(range(num_layers))
        elif text.startswith("top:"):
            k = int(text[4:])
            layers = list(range(num_layers - k, num_layers)) if 1 <= k <= num_layers else []
        elif "-" in text:
            a, b = (int(part) for part in text.split("-", 1))
            layers = list(range(a, b + 1))
        else:
            layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}: expected all, top:K, a-b or a,b,c") from None
    if not layers:
        raise InputError(f"--layers {text!r} selects no layer of this model's {num_layers} "
                         f"(top:K takes K from 1 to {num_layers})")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise InputError(f"--layers {text!r}: layers {bad} outside 0..{num_layers - 1} of this model")
    return tuple(sorted(set(layers)))


def module_path(layer: int, module: str) -> str:
    """Dotted path of a target linear inside a ``LlamaForCausalLM``."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


def _linear(model: nn.Module, layer: int, module: str) -> nn.Linear:
    decoder_layer = model.model.layers[layer]
    return getattr(getattr(decoder_layer, MODULE_PARENT[module]), module)


def b_layout(model: nn.Module, cfg: LoraFaConfig) -> list[BSlot]:
    """Where each trained B sits in the flat ``b`` vector: layer-major, then module order."""
    for module in cfg.target_modules:
        if module not in MODULE_PARENT:
            raise InputError(f"target module {module!r} is not one of {sorted(MODULE_PARENT)}")
    slots: list[BSlot] = []
    offset = 0
    for layer in cfg.layers:
        for module in cfg.target_modules:
            out_features = _linear(model, layer, module).out_features
            size = out_features * cfg.rank
            slots.append(BSlot(layer=layer, module=module, path=module_path(layer, module),
                               shape=(out_features, cfg.rank), offset=offset))
            offset += size
    return slots


def init_lora_a(in_features: int, rank: int, seed: int, layer: int, module: str) -> torch.Tensor:
    """A for one target linear: PEFT's default (kaiming-uniform, a=sqrt(5)) from a fixed seed.

    With a = sqrt(5), kaiming-uniform's bound is exactly 1 / sqrt(fan_in).
    The generator is seeded per (seed, layer, module) so every program agrees on A.
    """
    module_index = list(MODULE_PARENT).index(module)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 101 + module_index)
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound  # [r, in]


def lora_a_tensors(model: nn.Module, cfg: LoraFaConfig) -> dict[str, torch.Tensor]:
    """Every A of the adapter, keyed by the target linear's module path."""
    return {
        module_path(layer, module): init_lora_a(_linear(model, layer, module).in_features, cfg.rank,
                                                cfg.seed, layer, module)
        for layer in cfg.layers
        for module in cfg.target_modules
    }


def peft_config(cfg: LoraFaConfig):
    """The adapter as a ``peft.LoraConfig`` (imported lazily: peft is slow to import)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora_fa(model: nn.Module, cfg: LoraFaConfig, b: torch.Tensor | None = None):
    """Wrap ``model`` in a PEFT model holding this adapter: A from the fixed seeds, B from ``b``.

    Args:
        model: a ``LlamaForCausalLM``; it is wrapped, not copied.
        cfg: the adapter settings.
        b: flat B vector laid out by :func:`b_layout`; zeros when None.

    Returns:
        A ``peft.PeftModel`` with A frozen and B trainable.
    """
    from peft import get_peft_model

    layout = b_layout(model, cfg)
    a_by_path = lora_a_tensors(model, cfg)
    peft_model = get_peft_model(model, peft_config(cfg))
    b = torch.zeros(sum(slot.size for slot in layout)) if b is None else b
    base = peft_model.base_model.model
    with torch.no_grad():
        for slot in layout:
            lora_linear = _linear(base, slot.layer, slot.module)
            lora_linear.lora_A["default"].weight.copy_(a_by_path[slot.path])
            lora_linear.lora_A["default"].weight.requires_grad_(False)
            lora_linear.lora_B["default"].weight.copy_(b[slot.offset:slot.offset + slot.size].view(slot.shape))
    return peft_model


def read_b(peft_model, layout: list[BSlot]) -> torch.Tensor:
    """The flat B vector of a PEFT model (inverse of :func:`attach_lora_fa`'s ``b``)."""
    base = peft_model.base_model.model
    parts = [_linear(base, slot.layer, slot.module).lora_B["default"].weight.detach().reshape(-1)
             for slot in layout]
    return torch.cat(parts)


@dataclass
class AdapterTensors:
    """What a P-RGE program needs of the adapter: the frozen A's and the layout of ``b``."""

    cfg: LoraFaConfig
    layout: list[BSlot]
    a_by_path: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def build(cls, model: nn.Module, cfg: LoraFaConfig) -> "AdapterTensors":
        return cls(cfg=cfg, layout=b_layout(model, cfg), a_by_path=lora_a_tensors(model, cfg))

    @property
    def b_size(self) -> int:
        return sum(slot.size for slot in self.layout)
