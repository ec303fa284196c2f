"""Session fixtures shared by the test packages: the real SmolLM2, converted once per session,
and one tiny exported P-RGE program.

The conversion runs into a session temporary directory rather than the user's
`~/.cache/deftly`: the GGUF has to be de-quantised anyway for the parity check
(test_models.py), so converting it here costs nothing extra, a fresh CI clone and
a developer's machine run the same code path, and the tests never read a cache
that an older deftly left behind. Use `smollm2_tokenizer` (or `tiny_model`) rather
than calling `load_tokenizer()` directly, which would convert a second time into
the default cache on a fresh machine.

torch and the exporter are imported inside the fixtures, so that a run of the
planner tests alone does not pay for importing them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from export.models import LoadedModel, convert_gguf, embedded_gguf_path, embedded_model_dir, load_model, load_tokenizer, tiny_llama

if TYPE_CHECKING:
    import torch

    from export.probe import ProbeResult
    from export.program import ExportConfig, ExportResult, PlanExport
    from shared.probe import ProbeManifest

# A short prompt in the task's format; its next-token logits are the parity reference.
PARITY_PROMPT = "A gorgeous, moving film that never puts a foot wrong. It was"


@dataclass
class Conversion:
    cache_dir: Path  # pass as cache_dir= to load_model / load_tokenizer
    seconds: float  # wall time of GGUF load + write
    prompt_ids: torch.Tensor  # [1, T] token ids of PARITY_PROMPT
    gguf_logits: torch.Tensor  # [vocab] next-token logits of the GGUF-loaded model


@pytest.fixture(scope="session")
def smollm2_conversion(tmp_path_factory: pytest.TempPathFactory) -> Conversion:
    """Converts the embedded GGUF once and keeps only the reference logits, not the model."""
    import torch

    cache_dir = tmp_path_factory.mktemp("deftly-cache")
    start = time.perf_counter()
    gguf = convert_gguf(embedded_gguf_path(), embedded_model_dir(cache_dir), progress=lambda _m: None)
    seconds = time.perf_counter() - start
    prompt_ids = gguf.tokenizer(PARITY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = gguf.model(prompt_ids).logits[0, -1].clone()
    return Conversion(cache_dir=cache_dir, seconds=seconds, prompt_ids=prompt_ids, gguf_logits=logits)


@pytest.fixture(scope="session")
def smollm2(smollm2_conversion: Conversion) -> LoadedModel:
    """The real SmolLM2-135M-Instruct, loaded from the session's converted cache."""
    return load_model("smollm2", cache_dir=smollm2_conversion.cache_dir, progress=lambda _m: None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_conversion: Conversion):
    """SmolLM2's tokenizer (vocab 49152), shared by the real and the tiny model."""
    return load_tokenizer("smollm2", cache_dir=smollm2_conversion.cache_dir, progress=lambda _m: None)


@pytest.fixture()
def tiny_model(smollm2_tokenizer) -> LoadedModel:
    """A fresh random 4-layer Llama (hidden 256) with SmolLM2's vocabulary, seed 0."""
    return tiny_llama(seed=0, tokenizer=smollm2_tokenizer)


@dataclass
class TinyProgram:
    export: ExportResult  # paths and manifest of the exported files
    loaded: LoadedModel  # the eager model it was exported from (parity and PEFT references)
    config: ExportConfig
    pte: Path  # the --out it was exported to: names the program (its manifest lies beside it)


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> TinyProgram:
    """A 2-layer, hidden-64 random Llama exported once with layer 1 trainable, T=32, methods step and eval.

    Tests must not modify these files: copy the directory first.
    """
    from export.program import ExportConfig, export_program

    config = ExportConfig(model="tiny", layers="1-1", seq_len=32, methods=("step", "eval"), length_buckets=(16,))
    loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=smollm2_tokenizer)
    out = tmp_path_factory.mktemp("tiny-program") / "step.pte"
    result = export_program(config, out, cache_dir=tmp_path_factory.mktemp("program-cache"), loaded=loaded)
    return TinyProgram(export=result, loaded=loaded, config=config, pte=out)


@dataclass
class TinyPlan:
    plan: PlanExport  # three one-layer block programs (layers 1, 2, 3) and the eval program
    whole: ExportResult  # the single-device program of the same job (every layer, step and eval)
    loaded: LoadedModel
    config: ExportConfig
    events: list  # the plan export's ExportProgress events
    cache_dir: Path  # the export cache both were lowered into


@pytest.fixture(scope="session")
def tiny_plan(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> TinyPlan:
    """A 4-layer, hidden-64 random Llama; the job trains layers 1-3, cut into one block per layer.

    The plan is lowered by two worker processes; the single-device program is exported
    after it into the same cache, so it finds the plan's ``eval`` lowered. Tests must
    not modify these files: copy the directory first.
    """
    from export.program import ExportConfig, export_plan, export_program

    config = ExportConfig(model="tiny", layers="1-3", seq_len=32, length_buckets=(), calibrate="none")
    loaded = tiny_llama(num_layers=4, hidden_size=64, tokenizer=smollm2_tokenizer)
    cache = tmp_path_factory.mktemp("plan-cache")
    events: list = []
    plan = export_plan(config, [(1, 1), (2, 2), (3, 3)], tmp_path_factory.mktemp("tiny-plan"), cache_dir=cache,
                       on_progress=events.append, loaded=loaded, workers=2)
    whole = export_program(config, tmp_path_factory.mktemp("tiny-whole") / "whole.pte", cache_dir=cache, loaded=loaded)
    return TinyPlan(plan=plan, whole=whole, loaded=loaded, config=config, events=events, cache_dir=cache)


@dataclass
class TinyProbe:
    export: ProbeResult  # the probe's manifest and its path
    cache_dir: Path  # the cache it was lowered into

    @property
    def manifest(self) -> ProbeManifest:
        return self.export.manifest

    @property
    def manifest_path(self) -> Path:
        return self.export.manifest_path


@pytest.fixture(scope="session")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory, tiny_program: TinyProgram) -> TinyProbe:
    """The probe for the tiny program's model and shapes (fp32), exported once.

    Tests must not modify these files: copy the directory first.
    """
    from export.probe import export_probe

    cache_dir = tmp_path_factory.mktemp("probe-cache")
    # two units side by side, as on a 2-core machine, whatever this one has: every user of the
    # probe then reads methods from two .pte files
    result = export_probe(tiny_program.config, tmp_path_factory.mktemp("tiny-probe"), cache_dir=cache_dir,
                          loaded=tiny_program.loaded, workers=2)
    return TinyProbe(export=result, cache_dir=cache_dir)
