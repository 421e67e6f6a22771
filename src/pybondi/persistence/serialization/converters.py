"""How JSON values become the types their hints name again: datetime, UUID, list[int]...

Each converter raises TypeError or ValueError for a value that does not fit; the
registry turns those into `SerializationError`. None in place of a converter means that
JSON gives the value as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

from pybondi.exceptions import short_repr

__all__ = ["PARSERS", "Convert", "collection", "fixed_tuple", "mapping", "type_name"]

Convert = Callable[[Any], Any]


def text(parse: Callable[[str], Any]) -> Convert:
    """A converter of JSON text, read by `parse`."""

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"expected text, got {type(value).__name__}")
        return parse(value)

    return convert


def decimal(value: Any) -> Decimal:
    """A Decimal from its text, or from a JSON number."""
    # Stored as text; a JSON number is accepted too, through str() so that 0.1 stays 0.1.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"expected text or a number, got {type(value).__name__}")
    return Decimal(str(value))


def native(kind: type) -> Convert:
    """A converter of a JSON native type: str, int, float or bool."""
    # JSON gives these types exactly, so one type() test is the fast path.
    article = "an" if kind is int else "a"

    def convert(value: Any) -> Any:
        if type(value) is kind:
            return value
        # bool is an int to Python, but true is no number, so it is refused for int and float.
        if isinstance(value, kind) and type(value) is not bool:
            return value  # a subclass, such as a str Enum member in a payload given to decode()
        if kind is float and type(value) is int:
            return float(value)  # JSON has one number type: other writers store 2.0 as 2
        raise TypeError(f"expected {article} {kind.__name__}, got {type(value).__name__}")

    return convert


PARSERS: dict[type, Convert] = {kind: native(kind) for kind in (str, int, float, bool)}
PARSERS |= {
    datetime: text(datetime.fromisoformat),
    date: text(date.fromisoformat),
    time: text(time.fromisoformat),
    UUID: text(UUID),
    Decimal: decimal,
}


def expect(value: Any, kind: type, what: str) -> None:
    """Raise TypeError unless `value` is a `kind`: the JSON `what` a hint asks for."""
    if not isinstance(value, kind):
        raise TypeError(f"expected a JSON {what}, got {short_repr(value, 60)}")


def collection(kind: type, inner: Convert | None) -> Convert | None:
    """A JSON list into a `kind` (list, set, tuple...) of `inner` items; None: as it is."""
    if kind is list and inner is None:
        return None  # JSON already gives a list

    def convert(value: Any) -> Any:
        expect(value, list, "list")
        return kind(value if inner is None else map(inner, value))

    return convert


def fixed_tuple(inner: list[Convert | None]) -> Convert:
    """A JSON list into a tuple of as many items, each converted by its own converter."""

    def convert(value: Any) -> Any:
        expect(value, list, "list")
        if len(value) != len(inner):
            raise ValueError(f"expected {len(inner)} items, got {len(value)}")
        return tuple(v if c is None else c(v) for c, v in zip(inner, value, strict=True))

    return convert


def mapping(keys: Convert | None, values: Convert | None) -> Convert | None:
    """A JSON object into a dict, its keys and values converted; None: as it is."""
    if keys is None and values is None:
        return None

    def convert(value: Any) -> Any:
        expect(value, dict, "object")
        return {
            key if keys is None else keys(key): item if values is None else values(item)
            for key, item in value.items()
        }

    return convert


def type_name(hint: Any) -> str:
    """A type hint as error messages name it."""
    # "tuple[int, decimal.Decimal]" reads better as "tuple[int, Decimal]".
    return hint.__name__ if isinstance(hint, type) else re.sub(r"[\w.]+\.(\w+)", r"\1", str(hint))
