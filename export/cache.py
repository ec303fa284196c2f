"""The export cache: lowered methods, the shared weights, calibrations, keyed by content.

Layout under the cache root (``export.models.default_cache_dir()``, shared by every
export on the machine and written atomically, so concurrent exports never see half
an entry):

    programs/<unit key>/program.pte   one lowering unit: a method (or, with the weights
                                      embedded, a program's methods together)
    programs/<unit key>/entry.json    its methods, the sha256 of its weights, stage times
    weights/<sha256>.ptd              the frozen base weights, once per content: every
                                      method of a model writes the same bytes
    calibration/<key>.json            the median class bias of a model, task and prompts

A unit's key holds what its graph depends on and nothing else (:func:`unit_key`):
an ``eval`` method does not depend on the block or on q, so the eval program of a
plan, a single-device program and every block program of the job find the same
lowered ``eval``; a block's ``step`` is keyed by its block.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared.files import write_bytes_atomic
from shared.hashing import sha256_file

CALIBRATION_FORMAT = 1  # bump when median_class_bias changes: invalidates cached calibrations
ENTRY_FILE = "entry.json"
PROGRAM_FILE = "program.pte"


def digest(settings: Any, length: int = 24) -> str:
    """A short, stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:length]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's fp32 weights: a strided sample of every tensor, so the same
    model always gives the same value, and a fine-tuned copy almost surely not, without
    hashing 500 MB."""
    fingerprint = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        fingerprint.update(name.encode())
        flat = tensor.detach().reshape(-1)
        fingerprint.update(flat[:: max(1, flat.numel() // 4096)].numpy().tobytes())
    return fingerprint.hexdigest()


def toolchain() -> dict[str, str]:
    """The versions a lowered program depends on besides its inputs."""
    import executorch

    return {"torch": torch.__version__, "executorch": getattr(executorch, "__version__", "?")}


def unit_key(common: dict[str, Any], methods: dict[str, dict[str, Any]]) -> str:
    """Key of one lowering unit: the job-wide settings its graphs read and each method's own shapes."""
    return digest({"common": common, "methods": methods})


@dataclass(frozen=True)
class CachedUnit:
    """A lowered unit in the cache."""

    key: str
    program: Path  # its .pte
    methods: tuple[str, ...]
    weights: Path | None  # the shared .ptd it reads, None when the weights are inside the .pte
    weights_sha256: str | None
    seconds: dict[str, float]  # stage -> seconds it took to lower (as measured when it was built)


class ProgramCache:
    """Lowered units and the shared weights under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: str) -> Path:
        return self.root / "programs" / key

    def weights_path(self, sha256: str) -> Path:
        return self.root / "weights" / f"{sha256}.ptd"

    def find(self, key: str) -> CachedUnit | None:
        """The unit under ``key`` if it is whole: its entry, its program and its weights file."""
        entry_dir = self.entry_dir(key)
        try:
            entry = json.loads((entry_dir / ENTRY_FILE).read_text())
            sha = entry["weights_sha256"]
            methods = tuple(entry["methods"])
            seconds = {str(k): float(v) for k, v in entry.get("seconds", {}).items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: lowered again
        program = entry_dir / PROGRAM_FILE
        weights = None if sha is None else self.weights_path(sha)
        if not program.is_file() or (weights is not None and not weights.is_file()):
            return None
        return CachedUnit(key=key, program=program, methods=methods, weights=weights, weights_sha256=sha,
                          seconds=seconds)

    def store(self, key: str, et_program, methods: tuple[str, ...], external_weights: bool,
              seconds: dict[str, float]) -> CachedUnit:
        """Write a lowered ``ExecutorchProgramManager`` as the unit ``key``, atomically.

        The program and its entry go to a temporary directory that is renamed into
        place; the weights file is renamed to its content's name unless the cache
        already holds those bytes.
        """
        target = self.entry_dir(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{key}.tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            et_program.save(str(tmp / PROGRAM_FILE))
            sha = None
            if external_weights:
                et_program.write_tensor_data_to_file(str(tmp))
                written = sorted(tmp.glob("*.ptd"))
                if len(written) != 1:
                    raise RuntimeError(f"expected one weights file, the exporter wrote {[p.name for p in written]}")
                sha = sha256_file(written[0])
                self._adopt_weights(written[0], sha)
            entry = {"methods": list(methods), "weights_sha256": sha, "seconds": seconds}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=1))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        found = self.find(key)
        if found is None:
            raise RuntimeError(f"the cache entry {target} was written but cannot be read back")
        return found

    def _adopt_weights(self, path: Path, sha256: str) -> None:
        final = self.weights_path(sha256)
        if final.is_file():
            path.unlink()
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)  # same file system: a rename, never half a file under the final name


def weights_entries(path: Path) -> dict[str, str]:
    """The named tensors of a ``.ptd``: key -> sha256 of its bytes.

    Two units that read the same weights may write them in another order (a unit's
    methods add them as they are lowered), so their files differ while every
    key names the same bytes: either file then serves both.
    """
    from executorch.exir._serialize._cord import Cord
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    payload = FlatTensorSerializer().deserialize(Cord(Path(path).read_bytes()))
    return {key: hashlib.sha256(bytes(payload.buffers[entry.buffer_index])).hexdigest()
            for key, entry in payload.named_data.items()}


def place_file(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target``: a hard link when both share a file system, else a copy.

    For the weights file (hundreds of MB, never written after it is made): a link
    costs nothing, and the cache names the file by its content, so the bytes cannot change.
    """
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# -- the calibration -------------------------------------------------------------------


def cached_class_bias(measure: Callable[[], list[float]], root: Path, key_parts: list[Any], input_ids: np.ndarray,
                      lengths: np.ndarray, classes: int) -> tuple[list[float], bool]:
    """The class bias under a key of ``key_parts`` and the prompts, measured once.

    Args:
        measure: computes the bias when the cache has none (or an unreadable one).
        root: the cache root.
        key_parts: what the bias depends on besides the prompts (model, weights, loss, answers).
        input_ids, lengths: the calibration prompts.
        classes: the bias's length (a cached value of another length is measured again).

    Returns:
        (the bias, whether it came from the cache).
    """
    key = hashlib.sha256()
    for part in (CALIBRATION_FORMAT, *key_parts, str(input_ids.shape)):
        key.update(str(part).encode() + b"\0")
    key.update(np.ascontiguousarray(input_ids).tobytes())
    key.update(np.ascontiguousarray(lengths).tobytes())
    path = root / "calibration" / f"{key.hexdigest()[:24]}.json"
    try:
        bias = json.loads(path.read_text())["class_bias"]
        if isinstance(bias, list) and len(bias) == classes:
            return [float(v) for v in bias], True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: measure it again
    bias = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps({"class_bias": bias, "examples": int(input_ids.shape[0])}).encode())
    return bias, False
