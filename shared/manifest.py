"""The manifest that travels with every P-RGE program.

It says what the program computes and how to call it, so the device agent can
run a `.pte` with nothing but the ExecuTorch runtime and numpy: input and output
order, shapes, the layout of the flat trainable vector ``b``, the model and task
it was built for, hyperparameters, and the sha256 of every file it needs.

Method signatures (all float tensors float32, all index tensors int64):

* ``step``:  (input_ids [bs, T], lengths [bs], labels [bs], b [P], z [q, P], lr [1], eps [1])
             -> (b_new [P], loss [1], g [q])
* ``eval``:  (input_ids [eval_bs, T], lengths [eval_bs], b [P]) -> (class_logits [eval_bs, C])
* ``loss``:  (input_ids [bs, T], lengths [bs], labels [bs], b [P]) -> (loss [1])   (optional)
* ``step_rng``: as ``step`` without ``z``, drawn in the graph (optional)
* ``step_t<T>``: as ``step`` at a shorter length T (``step_buckets``): a batch whose
  longest row fits in T tokens runs there with ``input_ids[:, :T]``
* ``eval_t<T>``: as ``eval`` at a shorter length T (``eval_buckets``), likewise
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InputError

MANIFEST_VERSION = 1
BATCH_ORDERS = ("shuffled", "stratified")  # the trainer's batch orders a manifest may suggest


@dataclass(frozen=True)
class BSlot:
    """One trained B inside the flat vector ``b``: ``b[offset:offset+size].view(shape)``."""

    layer: int
    module: str  # e.g. "q_proj"
    path: str  # module path in the Hugging Face model, e.g. "model.layers.22.self_attn.q_proj"
    shape: tuple[int, int]  # [out, r]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def peft_b_key(self) -> str:
        """The key PEFT's ``save_pretrained`` writes for this B."""
        return f"base_model.model.{self.path}.lora_B.weight"

    @property
    def peft_a_key(self) -> str:
        return f"base_model.model.{self.path}.lora_A.weight"


@dataclass
class Manifest:
    """Everything a runtime needs to know about one exported program."""

    model_id: str
    task: str
    num_layers: int
    trainable_layers: list[int]
    target_modules: list[str]
    rank: int
    alpha: float
    q: int
    batch_size: int
    eval_batch_size: int
    seq_len: int
    labels: list[str]  # class order of labels / class_logits
    verbalizer_token_ids: list[int]
    class_bias: list[float]  # added to the class logits in the loss and in `eval` (calibration)
    loss: str  # "verbalizer" or "vocab"
    prefix_sharing: bool
    b_size: int
    b_layout: list[BSlot]
    methods: list[str]  # method names inside the .pte
    # sequence length (as a string: JSON keys) -> step method; the full seq_len maps to "step"
    step_buckets: dict[str, str]
    lr: float  # suggested defaults; the program takes lr and eps as inputs
    eps: float
    files: dict[str, str] = field(default_factory=dict)  # role -> file name beside the manifest
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    peft_config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json content
    export_seconds: float = 0.0
    cache_key: str = ""
    # Frozen decoder linears as stored in the program: "fp32", or "int8" (per-output-channel
    # weights, activations quantised per token at run time; the embedding as int8 rows; the head stays fp32).
    base_weights: str = "fp32"
    # As step_buckets, for eval; empty in manifests written before eval had buckets: "eval" only.
    eval_buckets: dict[str, str] = field(default_factory=dict)
    # The batch order suggested to the trainer: "shuffled", or "stratified" (each batch at
    # the training split's class shares); manifests written before it was suggested: shuffled.
    batches: str = "shuffled"
    # The block this program trains (``shared.blocks.BlockSpan.to_dict``): a contiguous range of
    # the job's trainable layers and its slice of ``b``; None: every trainable layer.
    block: dict[str, int] | None = None
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object")
        if data.get("version") != MANIFEST_VERSION:
            raise InputError(f"{source}: manifest version {data.get('version')!r}, this deftly reads {MANIFEST_VERSION}")
        if data.get("batches", "shuffled") not in BATCH_ORDERS:
            raise InputError(f"{source}: batches {data['batches']!r}, expected one of {', '.join(BATCH_ORDERS)}")
        try:
            data["b_layout"] = [BSlot(**{**slot, "shape": tuple(slot["shape"])}) for slot in data["b_layout"]]
            return cls(**data)
        except (TypeError, KeyError) as exc:
            raise InputError(f"{source}: malformed manifest ({exc})") from None

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        if not path.exists():
            raise InputError(f"{path}: no such manifest")
        return cls.from_json(path.read_text(), source=str(path))

    def file(self, role: str, manifest_path: Path) -> Path:
        """Absolute path of a file the manifest names by role ("program", "data", "weights", ...)."""
        if role not in self.files:
            raise InputError(f"{manifest_path}: manifest names no {role!r} file")
        return manifest_path.parent / self.files[role]
