"""Fixtures shared by the desktop's tests (the engine's and the dashboard's): a tiny model, a small task.

The tiny model is saved as a Hugging Face directory so that the engine's export
worker loads it the way it loads any local model; the export cache is one per
session, so each tiny program is lowered once for all the tests that run it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from export.models import tiny_llama

POSITIVE = ["warm", "funny", "sharp", "moving", "bright", "gripping", "tender", "clever"]
NEGATIVE = ["flat", "dull", "tired", "clumsy", "hollow", "grating", "limp", "muddled"]
THINGS = ["film", "script", "cast", "ending", "score", "story"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer, hidden-64 random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    folder = tmp_path_factory.mktemp("tiny-model")
    loaded = tiny_llama(num_layers=2, hidden_size=64, tokenizer=smollm2_tokenizer)
    loaded.model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """A small review task (240 rows, two classes) as a task TOML beside its CSV."""
    folder = tmp_path_factory.mktemp("tiny-task")
    rows = ["review,sentiment"]
    for i in range(240):
        words, label = (POSITIVE, "positive") if i % 2 else (NEGATIVE, "negative")
        rows.append(f'"A {words[i % 8]} {THINGS[i % 6]}, {words[(i // 8) % 8]} from start to end.",{label}')
    (folder / "reviews.csv").write_text("\n".join(rows) + "\n")
    (folder / "task.toml").write_text(
        'name = "tiny_reviews"\ndata = "reviews.csv"\ntext_column = "review"\nlabel_column = "sentiment"\n'
        'template = "Review: {text} Sentiment:"\nsplit_fractions = [0.6, 0.2, 0.2]\n\n'
        '[verbalizer]\nnegative = " negative"\npositive = " positive"\n')
    return folder / "task.toml"


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory) -> Path:
    """One export cache for the session: each program is lowered once, then found there."""
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="session")
def tiny_job(tiny_model_dir, tiny_task, export_cache, tmp_path_factory):
    """The tiny model's job, once the engine's export worker has exported its eval program and probe.

    Tests of whole runs (the dashboard's, the demo's) need the engine to export: when it cannot,
    they fail at once with the exporter's error instead of each waiting out its timeout.
    """
    import asyncio

    from desktop.engine.exports import ExportRequest, run_export
    from desktop.engine.job import JobSpec

    job = JobSpec(model=str(tiny_model_dir), task=str(tiny_task), layers="0-1", seq=32, q=2, bs=4, eval_bs=8)
    out = tmp_path_factory.mktemp("tiny-job-programs")
    try:
        asyncio.run(run_export(ExportRequest(job=job, out_dir=str(out), cache_dir=str(export_cache), eval=True,
                                             probe=True), lambda _update: None, log_path=out / "export.log"))
    except (RuntimeError, ValueError) as exc:  # ValueError: the exporter's InputError
        log = (out / "export.log").read_text(errors="replace").strip().splitlines()
        pytest.fail(f"the engine cannot export the tiny job: {exc}; {log[-1] if log else ''}")
    return job
