"""Read and write the safetensors format with numpy alone.

The device side writes the trained PEFT adapter without torch, peft or the
`safetensors` package, so the format is spelled out here. A file is:

    8 bytes      N, the header length, unsigned little-endian
    N bytes      a JSON object: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
                 plus an optional "__metadata__": {str: str}; padded with spaces
    the rest     the tensors' raw little-endian bytes; offsets are relative to here

Tensors are stored back to back in the order written, with no gaps: the
`safetensors` reader rejects a file whose offsets leave holes or overlap.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from shared.errors import InputError

# safetensors dtype names for the numpy dtypes deftly writes.
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The safetensors reader refuses headers larger than this; so do we.
MAX_HEADER_BYTES = 100_000_000


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file, then rename).

    Args:
        tensors: name -> array; float32 unless another dtype in ``DTYPES`` is wanted.
        path: the ``.safetensors`` file to write.
        metadata: optional string -> string pairs stored as ``__metadata__``.

    Raises:
        ValueError: an array has a dtype the format table above does not hold.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        array = np.asarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be written (supported: {sorted(DTYPES)})")
        blob = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # Pad to 8 bytes so the data starts aligned, as the reference writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_file(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file.

    Returns:
        name -> array (a copy, writable), in file order.

    Raises:
        InputError: the file is missing, truncated, or its header is malformed
            (the message names the file and the fault).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) < 8:
        raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > min(MAX_HEADER_BYTES, len(raw) - 8):
        raise InputError(f"{path}: header length {header_len} exceeds the file")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    data = memoryview(raw)[8 + header_len:]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
            raise InputError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not fit shape {list(shape)} "
                             f"{info['dtype']} in {len(data)} data bytes")
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors

