"""The manifest that travels with every P-RGE program.

It says what the program computes and how to call it, so the device agent can
run its methods with nothing but the ExecuTorch runtime and numpy: input and output
order, shapes, the layout of the job's flat trainable vector ``b``, the block this
program trains, the job it belongs to, the model and task it was built for,
hyperparameters, and the sha256 of every file it needs.

A *job* is one adapter; ``b_layout`` is its whole layout and ``b_size`` = P its
length; ``block`` (``shared.blocks.BlockSpan.to_dict``) is the contiguous slice
``b[offset:offset + size]`` (P_blk = size) this program perturbs and updates, and
``job_key`` is equal for every program of one job (its block programs and its eval
program), so a coordinator can refuse a manifest from another job.

Method signatures (all float tensors float32, all index tensors int64):

* ``step``:  (input_ids [bs, T], lengths [bs], labels [bs], b [P] the global b,
             z [q, P_blk], lr [1], eps [1]) -> (b_blk_new [P_blk], loss [1], g [q])
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

# 2: block programs (z and the update on the block's slice; block and job_key always
# written), one .pte per method (method_files). Older manifests are refused: re-export.
MANIFEST_VERSION = 2
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
    # the job's trainable layers and its slice of ``b``; always written (every layer for a
    # single-device or an eval program). None only in hand-made manifests: every trainable layer.
    block: dict[str, int] | None = None
    # Equal for every program of one job (model, weights, task, adapter, calibration, q, bs, T).
    job_key: str = ""
    # method -> the .pte beside the manifest that holds it (several methods may share one file).
    method_files: dict[str, str] = field(default_factory=dict)
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
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version < MANIFEST_VERSION:
            raise InputError(f"{source}: manifest version {version}, written by an older deftly; this deftly reads "
                             f"version {MANIFEST_VERSION} (block programs): export the program again with "
                             f"`deftly export`")
        if version != MANIFEST_VERSION:
            raise InputError(f"{source}: manifest version {version!r}, this deftly reads {MANIFEST_VERSION}")
        if data.get("batches", "shuffled") not in BATCH_ORDERS:
            raise InputError(f"{source}: batches {data['batches']!r}, expected one of {', '.join(BATCH_ORDERS)}")
        try:
            data["b_layout"] = [BSlot(**{**slot, "shape": tuple(slot["shape"])}) for slot in data["b_layout"]]
            manifest = cls(**data)
        except (TypeError, KeyError) as exc:
            raise InputError(f"{source}: malformed manifest ({exc})") from None
        unknown = sorted(set(manifest.method_files) - set(manifest.methods))
        if unknown:
            raise InputError(f"{source}: method_files names {unknown}, which are not among its methods {manifest.methods}")
        return manifest

    def check_job(self, job_key: str, where: str = "manifest") -> None:
        """Refuse a program of another job than ``job_key`` (e.g. a block program for another adapter).

        Raises:
            InputError: naming both jobs.
        """
        if self.job_key != job_key:
            raise InputError(f"{where}: the program belongs to job {self.job_key[:12] or '(none)'}, not to job "
                             f"{job_key[:12]} (another model, task, adapter or calibration): export the job's "
                             f"programs together")

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Manifest":
        if not path.exists():
            raise InputError(f"{path}: no such manifest")
        return cls.from_json(path.read_text(), source=str(path))

    def file(self, role: str, manifest_path: Path) -> Path:
        """Absolute path of a file the manifest names by role ("data", "weights", "lora_a", ...)."""
        if role not in self.files:
            raise InputError(f"{manifest_path}: manifest names no {role!r} file")
        return manifest_path.parent / self.files[role]

    def method_file(self, method: str, manifest_path: Path) -> Path:
        """Absolute path of the ``.pte`` that holds ``method``."""
        if method not in self.method_files:
            raise InputError(f"{manifest_path}: manifest names no file for method {method!r} "
                             f"(it has {sorted(self.method_files)})")
        return manifest_path.parent / self.method_files[method]
