"""The numpy safetensors writer and reader agree with the `safetensors` package both ways."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file as reference_load, save_file as reference_save

from shared.errors import InputError
from shared.safetensors_io import load_file, save_file


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": rng.standard_normal((8, 64), dtype=np.float32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": rng.standard_normal((64, 8), dtype=np.float32),
        "odd": rng.standard_normal((3,), dtype=np.float32),  # 12 bytes: the next tensor starts unaligned
        "ids": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(2.5, dtype=np.float32),
    }


def test_the_safetensors_package_reads_what_we_write(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "adapter_model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = reference_load(str(path))
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_we_read_what_the_safetensors_package_writes(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "reference.safetensors"
    reference_save(tensors, str(path))
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == array.dtype


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_file({"x": np.ones(3, dtype=np.float32)}, tmp_path / "x.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage_header", "missing"])
def test_damaged_files_are_input_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(sample_tensors(), path)
    raw = path.read_bytes()
    if damage == "truncate_data":
        path.write_bytes(raw[:-8])
    elif damage == "truncate_header":
        path.write_bytes(raw[:20])
    elif damage == "garbage_header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        path.unlink()
    with pytest.raises(InputError, match="bad.safetensors"):
        load_file(path)


def test_unsupported_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="complex"):
        save_file({"c": np.zeros(2, dtype=np.complex64)}, tmp_path / "c.safetensors")
