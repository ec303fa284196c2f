from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.records import RecordError, from_plain, to_plain


@dataclass(frozen=True)
class Inner:
    name: str
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outer:
    count: int
    rate: float
    ok: bool
    note: str | None
    inner: Inner
    table: dict[str, float] = field(default_factory=dict)
    items: list[Inner] = field(default_factory=list)


def _outer() -> Outer:
    return Outer(count=3, rate=0.5, ok=True, note=None, inner=Inner("a", (1, 2)),
                 table={"x": 1.5}, items=[Inner("b")])


def test_a_record_round_trips_through_plain_values() -> None:
    outer = _outer()
    plain = to_plain(outer)
    assert plain["inner"] == {"name": "a", "sizes": [1, 2]}
    assert from_plain(Outer, plain) == outer


def test_json_numbers_decode_as_floats_but_booleans_are_not_numbers() -> None:
    plain = to_plain(_outer()) | {"rate": 2}
    assert from_plain(Outer, plain).rate == 2.0 and isinstance(from_plain(Outer, plain).rate, float)
    with pytest.raises(RecordError, match=r"Outer\.rate: expected a number, got boolean True"):
        from_plain(Outer, plain | {"rate": True})
    with pytest.raises(RecordError, match=r"Outer\.count: expected an integer, got number 1.5"):
        from_plain(Outer, plain | {"count": 1.5})


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "unknown field 'extra'"),
    ({"inner": {"name": 3}}, r"Outer\.inner\.name: expected a string"),
    ({"items": [{"name": "b", "sizes": ["x"]}]}, r"Outer\.items\[0\]\.sizes\[0\]: expected an integer"),
    ({"table": {"x": "fast"}}, r"Outer\.table\['x'\]: expected a number"),
    ({"note": 5}, r"Outer\.note: expected str or null, got number 5"),
])
def test_every_wrong_value_is_named_where_it_is(change: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        from_plain(Outer, to_plain(_outer()) | change)


def test_a_missing_required_field_is_named_and_defaults_may_be_left_out() -> None:
    plain = to_plain(_outer())
    del plain["count"]
    with pytest.raises(RecordError, match="missing field 'count'"):
        from_plain(Outer, plain)
    plain = to_plain(_outer())
    del plain["table"], plain["items"]
    assert from_plain(Outer, plain).table == {}
    with pytest.raises(RecordError, match="expected an object, got a list"):
        from_plain(Outer, [1, 2])
