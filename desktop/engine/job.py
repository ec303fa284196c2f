"""What a fleet run trains: the job (model, task, adapter, P-RGE shapes) and the run's settings.

A job is one adapter: the model, the task, the trainable layers, the LoRA
targets, rank and alpha, q, bs and T. The planner cuts its trainable layers
into blocks, one per device, and the exporter writes one program per block.
A job is given on the command line (``--model M --task T --layers ...``) or in
a TOML file (``--job JOB.toml``), whose keys are the command's option names::

    # deftly run --job lab.toml --discover --rounds 5 --local-steps 10
    model = "smollm2"            # "smollm2", a Hugging Face directory (relative to this file), a hub id
    task = "rotten_tomatoes"     # an embedded task or a task TOML (relative to this file)
    layers = "top:8"             # all | top:K | a-b | a,b,c
    q = 4
    bs = 4
    seq = 64
    rank = 8
    alpha = 16.0
    targets = ["q_proj", "v_proj"]
    weights = "fp32"             # or "int8"
    lr = 0.1                     # the run's learning rate (default: the program's suggestion)
    eps = 0.01
    calibrate = "none"           # start from the uncalibrated model ("median": the calibrated zero-shot)

Every key is optional; a key left out takes the exporter's default. Unknown
keys and wrong types are an ``InputError`` naming the file and the key. This
module imports nothing heavy: the exporter (torch) runs in its own process.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from shared.errors import InputError
from shared.records import to_plain

WEIGHTS = ("fp32", "int8")
CALIBRATIONS = ("median", "none")  # export.program.ExportConfig.calibrate


@dataclass(frozen=True)
class JobSpec:
    """A job; None fields take the exporter's defaults (``export.program.ExportConfig``)."""

    model: str | None = None
    task: str | None = None
    layers: str | None = None
    q: int | None = None
    bs: int | None = None
    eval_bs: int | None = None
    seq: int | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    weights: str | None = None  # "fp32" or "int8"
    seed: int | None = None  # seeds the LoRA A's
    lr: float | None = None  # the run's learning rate; None: the program's suggestion
    eps: float | None = None  # the run's perturbation scale; None: the program's suggestion
    calibrate: str | None = None  # "median" (start from the calibrated zero-shot) or "none"; None: the exporter's

    def check(self, where: str = "job") -> None:
        """Raises InputError naming the first field out of range."""
        for name in ("q", "bs", "eval_bs", "seq", "rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{where}: {name} must be at least 1, got {value}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise InputError(f"{where}: weights {self.weights!r}, expected one of {', '.join(WEIGHTS)}")
        if self.targets is not None and not self.targets:
            raise InputError(f"{where}: targets is empty")
        if self.eps is not None and not self.eps > 0:
            raise InputError(f"{where}: eps must be positive, got {self.eps}")
        if self.lr is not None and not self.lr >= 0:
            raise InputError(f"{where}: lr must not be negative, got {self.lr}")
        if self.calibrate is not None and self.calibrate not in CALIBRATIONS:
            raise InputError(f"{where}: calibrate {self.calibrate!r}, expected one of {', '.join(CALIBRATIONS)}")

    def export_settings(self) -> dict[str, Any]:
        """The ``ExportConfig`` fields this job sets (the rest keep the exporter's defaults)."""
        names = {"model": "model", "task": "task", "layers": "layers", "q": "q", "bs": "batch_size",
                 "eval_bs": "eval_batch_size", "seq": "seq_len", "rank": "rank", "alpha": "alpha",
                 "targets": "target_modules", "weights": "base_weights", "seed": "seed", "calibrate": "calibrate"}
        out = {target: getattr(self, name) for name, target in names.items() if getattr(self, name) is not None}
        if "target_modules" in out:
            out["target_modules"] = list(out["target_modules"])
        return out

    def merged(self, other: "JobSpec") -> "JobSpec":
        """This job with every field ``other`` sets taken from ``other`` (command line over file)."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other)
                                if getattr(other, f.name) is not None})

    def identity(self) -> str:
        """The name and a hash of every setting: what a resumed run must match."""
        settings = json.dumps(to_plain(replace(self, lr=None, eps=None)), sort_keys=True)
        return f"{self.name}@{hashlib.sha256(settings.encode()).hexdigest()[:12]}"

    @property
    def name(self) -> str:
        model = Path(self.model).name if self.model else "smollm2"
        task = Path(self.task).stem if self.task else "rotten_tomatoes"
        return f"{model}/{task}/{self.layers or 'default layers'}"


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "task": (str,), "layers": (str,), "q": (int,), "bs": (int,), "eval_bs": (int,), "seq": (int,),
    "rank": (int,), "alpha": (int, float), "targets": (list,), "weights": (str,), "seed": (int,),
    "lr": (int, float), "eps": (int, float), "calibrate": (str,),
}


def load_job(path: Path) -> JobSpec:
    """Read a job TOML file; relative model and task paths are taken from the file's folder.

    Raises:
        InputError: an unreadable file, an unknown key, a value of the wrong type.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"--job {path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--job {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - set(_TYPES))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a job file takes "
                         f"{', '.join(_TYPES)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            kinds = {int: "an integer", float: "a number", str: "a string", list: "a list of strings"}
            raise InputError(f"{path}: {key} = {value!r}: expected {kinds[_TYPES[key][-1]]}")
        if key == "targets":
            if not all(isinstance(t, str) and t for t in value):
                raise InputError(f"{path}: targets must be a list of module names, got {value!r}")
            value = tuple(value)
        if key in ("alpha", "lr", "eps"):
            value = float(value)
        if key in ("model", "task"):
            value = _relative_to(value, path.parent)
        values[key] = value
    spec = JobSpec(**values)
    spec.check(str(path))
    return spec


def _relative_to(value: str, folder: Path) -> str:
    """A path relative to the job file's folder, when it names something there; else the value itself."""
    candidate = folder / value
    return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value
