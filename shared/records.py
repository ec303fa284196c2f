"""Typed records to and from plain JSON values: the one codec under events and messages.

A record is a frozen dataclass whose fields are annotated with JSON-shaped types:
``int``, ``float``, ``str``, ``bool``, ``None``, unions of those (``int | None``),
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]`` and nested records. Encoding is
``dataclasses.asdict`` with tuples as lists; decoding is strict, because these
values cross process and network boundaries and a mistake must surface where it
enters, named, not as a ``KeyError`` deep inside a consumer:

* a missing required field, an unknown field, or a value of the wrong type is a
  :class:`RecordError` naming the record, the field and what was expected;
* ``int`` accepts no ``bool`` and ``float`` accepts an ``int`` (JSON has one
  number type) but no ``bool``; non-finite floats pass (an accuracy on an empty
  split is ``nan``).

Pure: values in, values out; no I/O. Written here rather than taken from pydantic,
cattrs or dacite because ``shared/`` imports only the standard library and numpy:
an agent on a board installs it, and this is all of such a library it needs.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping, TypeVar

from shared.errors import InputError

R = TypeVar("R")


class RecordError(InputError):
    """A value that does not decode into the record it claims to be."""


def to_plain(record: Any) -> dict[str, Any]:
    """A record as a dict of JSON values (tuples become lists, nested records dicts)."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"{record!r} is not a record")
    return {f.name: _plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_plain(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_plain(cls: type[R], data: Any, where: str | None = None, ignore: frozenset[str] = frozenset()) -> R:
    """Decode ``data`` into the record type ``cls``, checking every field.

    Args:
        cls: a dataclass whose fields use the types listed in the module docstring.
        data: a dict of JSON values (e.g. from ``json.loads``).
        where: how to name the value in errors (default: the class name).
        ignore: keys of ``data`` that are not fields and are not errors (e.g. a
            discriminator like ``"kind"`` that the caller has already read).

    Raises:
        RecordError: naming the field at fault.
    """
    at = where or cls.__name__
    if not isinstance(data, Mapping):
        raise RecordError(f"{at}: expected an object, got {_type_name(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields) - set(ignore))
    if unknown:
        raise RecordError(f"{at}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(expected {', '.join(fields) or 'none'})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{at}: missing field {name!r}")
            continue
        values[name] = _decode(hints[name], data[name], f"{at}.{name}")
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(tp: Any, value: Any, at: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(option, value, at)
            except RecordError as exc:
                errors.append(exc)
        if len(errors) == 1 and isinstance(value, Mapping):
            raise errors[0]  # one record it could be (``R | None``): say which of its fields is wrong
        raise RecordError(f"{at}: expected {_tp_name(tp)}, got {_type_name(value)}")
    if tp is type(None) or tp is None:
        if value is not None:
            raise RecordError(f"{at}: expected null, got {_type_name(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{at}: expected a boolean, got {_type_name(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecordError(f"{at}: expected an integer, got {_type_name(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecordError(f"{at}: expected a number, got {_type_name(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecordError(f"{at}: expected a string, got {_type_name(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{at}: expected a list, got {_type_name(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise RecordError(f"{at}: expected {len(args)} items, got {len(value)}")
            return tuple(_decode(a, v, f"{at}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_decode(item, v, f"{at}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise RecordError(f"{at}: expected an object, got {_type_name(value)}")
        key_tp, value_tp = typing.get_args(tp) or (str, Any)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecordError(f"{at}: keys must be strings, got {_type_name(key)}")
            out[key] = _decode(value_tp, item, f"{at}[{key!r}]")
        return out
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, at)
    raise TypeError(f"{at}: a record field of type {tp!r} is not supported by shared.records")


def _tp_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_tp_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
