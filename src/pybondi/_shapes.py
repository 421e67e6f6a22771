"""What the registry does with each class, and how JSON values become typed ones again.

A `Shape` is worked out once per class, when it is registered: which fields are stored,
which are required, how the class is built. The converters turn a JSON value back into
the type a hint names (datetime, UUID, list[int], ...), raising TypeError or ValueError
for a value that does not fit; the registry turns those into `SerializationError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from pybondi.aggregate import Aggregate
from pybondi.exceptions import short_repr

__all__ = [
    "PARSERS",
    "Convert",
    "Shape",
    "collection",
    "fixed_tuple",
    "is_pydantic",
    "make_shape",
    "mapping",
    "type_name",
]

Convert = Callable[[Any], Any]


@dataclasses.dataclass(slots=True)
class Shape:
    """What encode and decode do with one class, worked out once, when it is registered."""

    cls: type[Any]
    name: str  # the registered name, or the qualname of a nested unregistered class
    version: int
    kind: Literal["dataclass", "pydantic", "plain"]
    aggregate: bool
    fields: tuple[str, ...] = ()  # dataclass: its init fields; plain: its __init__ parameters
    late: tuple[str, ...] = ()  # dataclass fields with init=False, set after construction
    required: frozenset[str] = frozenset()
    root_init: bool = False  # a dataclass aggregate whose __init__ takes root=
    open: bool = False  # a plain __init__ with **kwargs accepts any field
    converters: dict[str, tuple[str, Convert]] | None = None  # built on first decode
    stored: tuple[str, ...] = dataclasses.field(init=False)  # what encode reads
    loadable: frozenset[str] = dataclasses.field(init=False)  # attributes decode can set

    def __post_init__(self) -> None:
        self.stored = (*self.fields, *self.late)
        self.loadable = frozenset(self.stored) | ({"root"} if self.aggregate else set())

    @property
    def label(self) -> str:
        return f"{self.cls.__name__} ({self.name!r})"


def is_pydantic(cls: type) -> bool:
    # Duck-typed, so that pydantic stays an optional dependency.
    return hasattr(cls, "model_dump") and hasattr(cls, "model_validate")


def make_shape(cls: type, name: str, version: int) -> Shape:
    aggregate = issubclass(cls, Aggregate)
    if is_pydantic(cls):
        return Shape(cls, name, version, "pydantic", aggregate)
    if dataclasses.is_dataclass(cls):
        every = dataclasses.fields(cls)
        # An aggregate's root is never stored: repositories keep its id apart.
        stored = [f for f in every if not (aggregate and f.name == "root")]
        return Shape(
            cls,
            name,
            version,
            "dataclass",
            aggregate,
            fields=tuple(f.name for f in stored if f.init),
            late=tuple(f.name for f in stored if not f.init),
            required=frozenset(
                f.name
                for f in stored
                if f.init
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ),
            root_init=aggregate and any(f.name == "root" and f.init for f in every),
        )
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # a signature Python cannot read: let the call decide
        return Shape(cls, name, version, "plain", aggregate, open=True)
    if aggregate:
        parameters = parameters[1:]  # the id, passed positionally
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return Shape(
        cls,
        name,
        version,
        "plain",
        aggregate,
        fields=tuple(p.name for p in named),
        required=frozenset(p.name for p in named if p.default is p.empty),
        open=any(p.kind is p.VAR_KEYWORD for p in parameters),
    )


def text(parse: Callable[[str], Any]) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"expected text, got {type(value).__name__}")
        return parse(value)

    return convert


def decimal(value: Any) -> Decimal:
    # Stored as text; a JSON number is accepted too, through str() so that 0.1 stays 0.1.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"expected text or a number, got {type(value).__name__}")
    return Decimal(str(value))


def native(kind: type) -> Convert:
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
    if not isinstance(value, kind):
        raise TypeError(f"expected a JSON {what}, got {short_repr(value, 60)}")


def collection(kind: type, inner: Convert | None) -> Convert | None:
    if kind is list and inner is None:
        return None  # JSON already gives a list

    def convert(value: Any) -> Any:
        expect(value, list, "list")
        return kind(value if inner is None else map(inner, value))

    return convert


def fixed_tuple(inner: list[Convert | None]) -> Convert:
    def convert(value: Any) -> Any:
        expect(value, list, "list")
        if len(value) != len(inner):
            raise ValueError(f"expected {len(inner)} items, got {len(value)}")
        return tuple(v if c is None else c(v) for c, v in zip(inner, value, strict=True))

    return convert


def mapping(keys: Convert | None, values: Convert | None) -> Convert | None:
    if keys is None and values is None:
        return None

    def convert(value: Any) -> Any:
        expect(value, dict, "object")
        return {
            k if keys is None else keys(k): v if values is None else values(v)
            for k, v in value.items()
        }

    return convert


def type_name(hint: Any) -> str:
    # "tuple[int, decimal.Decimal]" reads better as "tuple[int, Decimal]".
    return hint.__name__ if isinstance(hint, type) else re.sub(r"[\w.]+\.(\w+)", r"\1", str(hint))
