"""Objects into JSON-able payloads, and the words of the errors when one cannot be.

An `Encoder` reads an object's fields as its `Shape` says, and turns each value into
JSON: natives as they are, datetime, UUID and Decimal as text, Enums as their value,
sets in a canonical order, nested dataclasses and models as objects. A value it cannot
store raises `Unsupported`, which names the field it sits in on the way up.
"""

from __future__ import annotations

import json
import math
import operator
import typing
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from pybondi.aggregate import Aggregate, Root
from pybondi.exceptions import SerializationError, callable_name, short_repr
from pybondi.persistence.serialization.converters import Convert
from pybondi.persistence.serialization.shapes import Shape, State

__all__ = ["Encoder", "Unsupported", "not_json"]

# The order of a set's items; NaN is allowed here, and refused by dumps, naming its field.
_ORDER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_INT = {int}
_NATIVE = frozenset({str, int, float, bool, type(None)})
_SEQUENCES = (list, tuple, set, frozenset)
_SETS = (set, frozenset)
_NOT_NESTED = (Aggregate, Root)
_isoformat = operator.methodcaller("isoformat")
_AS_TEXT: dict[type, Convert] = {datetime: _isoformat, date: _isoformat, time: _isoformat}
_AS_TEXT |= {UUID: str, Decimal: str}
# Enum comes first, since a str or int Enum is also a str or an int.
_BY_BASE: tuple[tuple[type, Convert], ...] = (
    (Enum, operator.attrgetter("value")),
    *((native, native) for native in (str, int, float)),
    *_AS_TEXT.items(),
)
_SUPPORTED = (
    "use JSON-native values, datetime, date, time, UUID, Decimal, Enum, tuples, sets, "
    "dataclasses or pydantic models, or register its class"
)


class Encoder:
    """Turns registered objects into payloads, with the registry's shapes.

    Args:
        shape_of: the shape of a registered class, or of a dataclass or model nested
            in one; None for any other class.
        converters: the converters of a shape's fields (see `Decoder.converters`), which
            tell whether a field stored through `state=` or `__getstate__` loads back.
    """

    def __init__(
        self,
        shape_of: Callable[[type], Shape | None],
        converters: Callable[[Shape], dict[str, tuple[str, Convert]]],
    ) -> None:
        self._shape_of = shape_of
        self._converters = converters

    def encode(self, shape: Shape, obj: object) -> dict[str, Any]:
        """The payload of `obj`, an instance of `shape`'s class; see `Registry.encode`."""
        try:
            return self._fields_of(shape, obj)
        except Unsupported as exc:
            where = f"field {'.'.join(reversed(exc.path))!r} of " if exc.path else ""
            raise SerializationError(f"Cannot encode {where}{shape.label}: {exc.why}.") from None

    def _fields_of(self, shape: Shape, obj: Any) -> dict[str, Any]:
        kind = shape.kind
        if kind == "pydantic":
            try:
                dumped: dict[str, Any] = obj.model_dump(
                    mode="json", exclude={"root"} if shape.aggregate else None
                )
            except ValueError as exc:
                raise SerializationError(f"Cannot encode {shape.label}: {exc}") from exc
            return dumped
        stated = False  # a state dict from state= or __getstate__, checked below
        if kind == "dataclass":
            items = [(name, getattr(obj, name)) for name in shape.stored]
        else:
            if kind == "plain":
                if (attributes := getattr(obj, "__dict__", None)) is None:
                    raise Unsupported(
                        f"it has no __dict__ to read fields from; make it a dataclass, or say "
                        f"how it is stored: {register_as(type(obj))}"
                    )
                if not shape.open and not attributes.keys() <= shape.loadable:
                    raise not_loadable(shape, attributes)
            else:
                attributes, stated = state_of(shape, obj), True
            items = [(n, v) for n, v in attributes.items() if not (shape.aggregate and n == "root")]
        encoded = {}
        for name, value in items:
            try:
                encoded[name] = value if type(value) in _NATIVE else self._value(value)
            except Unsupported as exc:
                exc.path.append(name)
                raise
        if stated:
            self._check_untyped(shape, items, encoded)
        return encoded

    def _check_untyped(
        self, shape: Shape, items: list[tuple[str, Any]], encoded: dict[str, Any]
    ) -> None:
        """Refuse a field that would load back as another type, for want of a type hint."""
        converters = self._converters(shape)
        for name, value in items:
            stored = encoded[name]
            if (
                name not in converters
                and stored is not value
                and (type(stored) is not type(value) or stored != value)
            ):
                exc = untyped(shape, name, value, stored)
                exc.path.append(name)
                raise exc

    def _value(self, value: Any) -> Any:
        kind = type(value)
        if kind in _NATIVE:
            return value
        if kind in _AS_TEXT:
            return _AS_TEXT[kind](value)
        if isinstance(value, _SEQUENCES):
            items = [item if type(item) in _NATIVE else self._value(item) for item in value]
            return _sorted(items) if isinstance(value, _SETS) else items
        if isinstance(value, dict):
            return {self._key(k): self._value(v) for k, v in value.items()}
        if isinstance(value, _NOT_NESTED):
            raise Unsupported(
                f"{short_repr(value)} is an aggregate or a root, which is not stored inside "
                f"another object; store its id instead"
            )
        for base, encode in _BY_BASE:  # subclasses, such as Enums and datetime subclasses
            if isinstance(value, base):
                return self._value(encode(value))
        if (shape := self._shape_of(kind)) is not None:
            return self._fields_of(shape, value)
        how = ""
        if getattr(value, "__dict__", None) is not None and not callable(value):  # yours
            how = (
                f" (registry.register({kind.__name__}, name=...), with state= and build= if "
                f"its __init__ does not take its attributes by name)"
            )
        raise Unsupported(
            f"a {kind.__name__} value is not supported ({short_repr(value)}); {_SUPPORTED}{how}"
        )

    def _key(self, key: Any) -> str:
        # JSON keys are text: a key must be text, or something stored as text (UUID, date...).
        encoded = key if type(key) is str else self._value(key)
        if not isinstance(encoded, str):
            raise Unsupported(
                f"the dict key {short_repr(key)} is not text; JSON object keys are strings, so use "
                f"str keys, or UUID, date or str Enum keys, which are stored as text"
            )
        return encoded


class Unsupported(Exception):
    """A value encode cannot store; each enclosing field adds its name on the way up."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why, self.path = why, list[str]()


def not_loadable(shape: Shape, attributes: dict[str, Any]) -> Unsupported:
    """Attributes of a plain class that its __init__ would not take back."""
    extra = sorted(attributes.keys() - shape.loadable)
    cls = shape.cls.__name__
    return Unsupported(
        f"{cls} has attribute(s) {short_repr(extra, 80)[1:-1]} that its __init__ does not "
        f"take by those names (it takes {_takes(shape)}), so they could be stored but never "
        f"loaded back; say how a {cls} is stored and rebuilt: {register_as(shape.cls)}, or "
        f"define __getstate__ and __setstate__ on {cls}; or make them __init__ parameters, "
        f"or make {cls} a dataclass"
    )


def _takes(shape: Shape) -> str:
    """What an __init__ or build= takes, said so that the id parameter stands apart."""
    fields = ", ".join(shape.fields) or "no field"
    if not shape.aggregate:
        return fields
    # Loading calls build(id, **fields): the first parameter is not a stored field.
    named = f" ({shape.late[0]!r})" if shape.late else ""
    return f"the root id first{named}, then {fields}"


def register_as(cls: type) -> str:
    """How to say at registration how a class is stored and rebuilt."""
    name = cls.__name__
    return (
        f"registry.register({name}, name=..., state=..., build=...), where state(obj) returns "
        f"a dict of what to store and build(**fields) rebuilds a {name} from it"
    )


def state_of(shape: Shape, obj: Any) -> Mapping[str, Any]:
    """The fields `state=` or `__getstate__` gives, checked against what builds it back."""
    cls = shape.cls.__name__
    if shape.kind == "custom":
        source = f"{callable_name(shape.state)}()"
        state = typing.cast(State, shape.state)(obj)
    else:
        source = f"{cls}.__getstate__()"
        state = obj.__getstate__() or {}  # object's own gives None for no attributes
    if not isinstance(state, Mapping):
        raise Unsupported(
            f"{source} returned {short_repr(state, 60)}; it must return a dict of the fields "
            f"to store, by name"
        )
    if names := [key for key in state if type(key) is not str]:
        raise Unsupported(
            f"{source} returned the field name {short_repr(names[0], 60)}; fields are named "
            f"by text (str), as JSON object keys are"
        )
    if shape.kind == "custom":
        problems = []
        if not shape.open and (unknown := [key for key in state if key not in shape.loadable]):
            problems.append(
                f"field(s) {short_repr(unknown, 80)[1:-1]} that {shape.builder} does not take"
            )
        if missing := sorted(shape.required.difference(state)):
            problems.append(f"no {', '.join(map(repr, missing))}, which {shape.builder} needs")
        if problems:
            raise Unsupported(
                f"{source} returned {' and '.join(problems)} ({shape.builder} takes "
                f"{_takes(shape)}); make the keys state= returns the parameter names of build="
            )
    return state


def untyped(shape: Shape, name: str, value: Any, stored: Any) -> Unsupported:
    """A field of a state that would load back as another type, for want of a hint."""
    generic = isinstance(value, (list, tuple, set, frozenset, dict))
    hint = type(value).__name__ + ("[...]" if generic else "")
    if shape.unresolved:
        hinted = callable_name(shape.build) if shape.kind == "custom" else shape.cls.__name__
        where = f"the type hints of {hinted} do not resolve ({shape.unresolved})"
        fix = "define the classes they name where the hints can see them (at module level)"
    elif shape.kind == "custom":
        where = f"{shape.builder} has no type hint for {name!r} that says what to build"
        fix = f"annotate that parameter of {callable_name(shape.build)} ({name}: {hint})"
    else:
        where = f"{shape.cls.__name__} has no annotation for {name!r} that says what to build"
        fix = f"annotate it in the class body ({name}: {hint})"
    return Unsupported(
        f"{short_repr(value, 60)} would load back as a {type(stored).__name__}, since {where}; "
        f"{fix}"
    )


def _sorted(items: list[Any]) -> list[Any]:
    # A set iterates in hash order, which changes from one process to the next: stored in
    # an order of their own, the same set always gives the same JSON, and a repository
    # sees no change where there is none. Text alone, or ints alone, sort as they are
    # (equal ones are the same JSON); anything else (frozen dataclasses, mixed types, sets
    # inside sets) by its JSON text: a total order, where equal keys are written the same.
    if items:
        kind = type(items[0])
        if kind is str:
            try:
                "".join(items)  # only text joins: the cheapest test that every item is text
            except TypeError:
                pass
            else:
                return sorted(items)
        elif kind is int and set(map(type, items)) == _INT:
            return sorted(items)
    return sorted(items, key=_ORDER.encode)


def _non_finite(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], float] | None:
    """The first NaN or infinity in a payload, with the keys that lead to it."""
    if type(value) is float:
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        found = (_non_finite(item, (*path, str(key))) for key, item in value.items())
    elif isinstance(value, list):  # no index in the path: paths name fields, as in encode's
        found = (_non_finite(item, path) for item in value)
    else:
        return None
    return next((where for where in found if where is not None), None)


def not_json(shape: Shape, payload: dict[str, Any], exc: ValueError) -> SerializationError:
    """The error for a payload that JSON refused, naming the field with a NaN or infinity."""
    found = _non_finite(payload)
    if found is None:
        return SerializationError(f"Cannot encode {shape.label}: {exc}.")
    path, value = found
    return SerializationError(
        f"Cannot encode field {'.'.join(path)!r} of {shape.label}: {value!r} is not valid "
        f"JSON, which has no NaN or infinity; store None for a missing number, or a Decimal, "
        f"which is stored as text."
    )
