"""The job spec: a TOML file with the command's option names, strict, paths relative to the file."""
from __future__ import annotations

import pytest

from desktop.engine.job import JobSpec, load_job
from shared.errors import InputError


def test_a_job_file_reads_its_keys_and_resolves_paths_beside_it(tmp_path) -> None:
    (tmp_path / "task.toml").write_text("")
    (tmp_path / "lab.toml").write_text('model = "smollm2"\ntask = "task.toml"\nlayers = "top:8"\nq = 4\n'
                                       'targets = ["q_proj"]\nlr = 1\n')
    spec = load_job(tmp_path / "lab.toml")
    assert spec == JobSpec(model="smollm2", task=str((tmp_path / "task.toml").resolve()), layers="top:8", q=4,
                           targets=("q_proj",), lr=1.0)
    assert spec.export_settings() == {"model": "smollm2", "task": str((tmp_path / "task.toml").resolve()),
                                      "layers": "top:8", "q": 4, "target_modules": ["q_proj"]}


def test_the_command_line_overrides_the_file() -> None:
    merged = JobSpec(model="smollm2", layers="top:8", q=4).merged(JobSpec(layers="0-3", bs=2))
    assert (merged.model, merged.layers, merged.q, merged.bs) == ("smollm2", "0-3", 4, 2)


@pytest.mark.parametrize("text, message", [
    ("lyers = 'top:8'", "unknown key"), ("q = 'four'", "expected an integer"), ("q = 0", "q must be at least 1"),
    ("weights = 'fp16'", "weights 'fp16'"), ("model = ", "not valid TOML")])
def test_bad_job_files_name_the_key(tmp_path, text: str, message: str) -> None:
    (tmp_path / "job.toml").write_text(text + "\n")
    with pytest.raises(InputError, match=message):
        load_job(tmp_path / "job.toml")
