"""Read fleets and jobs from TOML or JSON into `shared.profiles` types.

The same keys work in both formats (JSON is what agents and `--json` speak;
TOML is what people write).  Every problem raises `InputError` naming the
file and the field, e.g. ``lab3.toml: device[1] 'phone': field 'head_s' ...``.
Unknown keys are errors too: a typo must not silently fall back to a default.

Fleet keys: ``name``; ``[[device]]`` tables with ``name``, ``layer_s_bs`` and
``layer_s_wide`` (a number for every layer, or a list with one per layer),
``head_s``, ``memory_bytes`` or ``memory_gib``, ``link_bytes_per_s`` or
``link_mbit_s``, and for a measured profile its ``measurement`` (a
`shared.profiles.Measurement` record, as `device_agent.profile` writes it);
a device without one is an estimate, and the plan says so.  Optional
``[[device.at_lengths]]`` tables (``seq_len``, ``layer_s_bs``, ``layer_s_wide``)
give the layer times at shorter length buckets; without them a job's short
steps are costed at the full-length times.

Job keys: ``name``, ``layers``, ``trainable = [first, last]``,
``layer_payload_bytes``, ``q``, ``bs``, ``local_steps``, ``memory_base_bytes``
or ``memory_base_mib``, ``memory_per_wide_layer_bytes`` or
``memory_per_wide_layer_mib``; then either ``[[block]]`` tables (``name``,
``layers = [first, last]``, optional ``payload_bytes``, default the layer
payload times the layer count), or optional ``n_blocks``, or neither (the
planner chooses the split).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from shared.errors import InputError
from shared.profiles import Block, DeviceProfile, Fleet, Job, LengthTimes, Measurement, check_fleet, check_job
from shared.records import from_plain

_FLEET_KEYS = {"name", "device"}
_DEVICE_KEYS = {"name", "layer_s_bs", "layer_s_wide", "head_s", "memory_bytes", "memory_gib",
                "link_bytes_per_s", "link_mbit_s", "measurement", "at_lengths"}
_LENGTH_KEYS = {"seq_len", "layer_s_bs", "layer_s_wide"}
_JOB_KEYS = {"name", "layers", "trainable", "layer_payload_bytes", "q", "bs", "local_steps",
             "memory_base_bytes", "memory_base_mib", "memory_per_wide_layer_bytes",
             "memory_per_wide_layer_mib", "block", "n_blocks"}
_BLOCK_KEYS = {"name", "layers", "payload_bytes"}


def read_data(path: Path) -> dict[str, Any]:
    """Parse a .toml or .json file into a dict.

    Raises:
        InputError: missing file, unknown suffix or a syntax error (with its position).
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text.decode())
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise InputError(f"{path}: expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: the top level must be a table/object")
    return data


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}; "
                         f"expected some of {', '.join(sorted(allowed))}")


def _number(table: dict, key: str, where: str) -> float:
    if key not in table:
        raise InputError(f"{where}: missing field '{key}'")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: field '{key}' must be a number, got {value!r}")
    return float(value)


def _integer(table: dict, key: str, where: str) -> int:
    if key not in table:
        raise InputError(f"{where}: missing field '{key}'")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return value


def _scaled(table: dict, units: dict[str, float], where: str) -> float:
    """One of several spellings of a quantity (e.g. memory_bytes or memory_gib), in base units."""
    present = [k for k in units if k in table]
    if len(present) != 1:
        names = " or ".join(repr(k) for k in units)
        raise InputError(f"{where}: give exactly one of {names}" + (f" (got {present})" if present else ""))
    return _number(table, present[0], where) * units[present[0]]


def _times(table: dict, key: str, where: str) -> tuple[float, ...]:
    if key not in table:
        raise InputError(f"{where}: missing field '{key}'")
    value = table[key]
    values = value if isinstance(value, list) else [value]
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{where}: {key}[{i}] must be a number of seconds, got {v!r}")
    return tuple(float(v) for v in values)


def _pair(table: dict, key: str, where: str) -> tuple[int, int]:
    value = table.get(key)
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise InputError(f"{where}: field '{key}' must be [first, last] layer indices, got {value!r}")
    return value[0], value[1]


def _length_times(tables: Any, where: str) -> tuple[LengthTimes, ...]:
    """A device's ``at_lengths`` tables: its layer times at each shorter length bucket."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"{where}: field 'at_lengths' must be a list of tables (seq_len, layer_s_bs, layer_s_wide)")
    out = []
    for i, table in enumerate(tables):
        at = f"{where}: at_lengths[{i}]"
        _unknown(table, _LENGTH_KEYS, at)
        out.append(LengthTimes(_integer(table, "seq_len", at), _times(table, "layer_s_bs", at),
                               _times(table, "layer_s_wide", at)))
    return tuple(out)


def fleet_from_dict(data: dict[str, Any], source: str = "fleet") -> Fleet:
    """Build and check a `Fleet` from parsed data.

    Raises:
        InputError: naming `source`, the device and the field.
    """
    _unknown(data, _FLEET_KEYS, source)
    devices_data = data.get("device")
    if not isinstance(devices_data, list) or not devices_data:
        raise InputError(f"{source}: field 'device' must be a non-empty list of device tables")
    devices = []
    for i, table in enumerate(devices_data):
        if not isinstance(table, dict):
            raise InputError(f"{source}: device[{i}] must be a table")
        where = f"{source}: device[{i}]" + (f" {table['name']!r}" if "name" in table else "")
        _unknown(table, _DEVICE_KEYS, where)
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: field 'name' must be a non-empty string")
        devices.append(DeviceProfile(
            name=name,
            layer_s_bs=_times(table, "layer_s_bs", where),
            layer_s_wide=_times(table, "layer_s_wide", where),
            head_s=_number(table, "head_s", where),
            memory_bytes=_scaled(table, {"memory_bytes": 1.0, "memory_gib": 2.0**30}, where),
            link_bytes_per_s=_scaled(table, {"link_bytes_per_s": 1.0, "link_mbit_s": 1e6 / 8}, where),
            measurement=(from_plain(Measurement, table["measurement"], f"{where}: measurement")
                         if table.get("measurement") is not None else None),
            at_lengths=_length_times(table.get("at_lengths", []), where),
        ))
    fleet = Fleet(name=str(data.get("name", source)), devices=tuple(devices))
    try:
        check_fleet(fleet)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from exc
    return fleet


def job_from_dict(data: dict[str, Any], source: str = "job") -> Job:
    """Build and check a `Job` from parsed data.

    Raises:
        InputError: naming `source`, the block and the field.
    """
    _unknown(data, _JOB_KEYS, source)
    first, last = _pair(data, "trainable", source)
    payload = _number(data, "layer_payload_bytes", source)
    blocks = []
    block_data = data.get("block", [])
    if not isinstance(block_data, list):
        raise InputError(f"{source}: field 'block' must be a list of block tables")
    for i, table in enumerate(block_data):
        if not isinstance(table, dict):
            raise InputError(f"{source}: block[{i}] must be a table")
        where = f"{source}: block[{i}]" + (f" {table['name']!r}" if "name" in table else "")
        _unknown(table, _BLOCK_KEYS, where)
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: field 'name' must be a non-empty string")
        lo, hi = _pair(table, "layers", where)
        size = _number(table, "payload_bytes", where) if "payload_bytes" in table else payload * (hi - lo + 1)
        blocks.append(Block(name=name, first_layer=lo, last_layer=hi, payload_bytes=size))
    n_blocks = _integer(data, "n_blocks", source) if "n_blocks" in data else None
    mib = 2.0**20
    job = Job(
        name=str(data.get("name", source)),
        layers=_integer(data, "layers", source),
        trainable_first=first,
        trainable_last=last,
        layer_payload_bytes=payload,
        q=_integer(data, "q", source),
        bs=_integer(data, "bs", source),
        local_steps=_integer(data, "local_steps", source),
        memory_base_bytes=_scaled(data, {"memory_base_bytes": 1.0, "memory_base_mib": mib}, source),
        memory_per_wide_layer_bytes=_scaled(
            data, {"memory_per_wide_layer_bytes": 1.0, "memory_per_wide_layer_mib": mib}, source),
        blocks=tuple(blocks),
        n_blocks=n_blocks,
    )
    try:
        check_job(job)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from exc
    return job


def load_fleet(path: Path) -> Fleet:
    """Read a fleet file (.toml or .json).

    Raises:
        InputError: naming the file and the field.
    """
    return fleet_from_dict(read_data(path), Path(path).name)


def load_job(path: Path) -> Job:
    """Read a job file (.toml or .json).

    Raises:
        InputError: naming the file and the field.
    """
    return job_from_dict(read_data(path), Path(path).name)
