"""Turn messages and aggregate states into JSON and back, through a registry of names.

A `Registry` maps stable names and versions to classes. Only registered classes are ever
built from stored data: no pickle, no eval, and no type name from the data is imported.
There is no global registry; an application makes its own.

    registry = Registry()

    @registry.register(name="accounts.Deposited", version=2)
    @dataclass(frozen=True)
    class Deposited(Event):
        account: str
        amount: Decimal

    @registry.upcaster("accounts.Deposited", from_version=1)
    def amount_as_text(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "amount": str(data["amount"])}  # version 1 stored a float

    stored = registry.dumps(Deposited("a-1", Decimal("9.50")))
    # Serialized(name='accounts.Deposited', version=2, data='{"account":"a-1","amount":"9.50"}')
    event = registry.loads(stored.name, stored.version, stored.data)

Registered classes may be dataclasses, pydantic v2 models, or plain classes whose
`__init__` takes their attributes by name. A class whose `__init__` does not (other
parameter names, private attributes) says how it is stored and rebuilt, either way:
- `registry.register(Batch, state=batch_state, build=build_batch)`: `state(obj)` returns
  a dict of what to store, and `build(**fields)` rebuilds the object from it;
- its own `__getstate__` and `__setstate__` (copy and pickle's protocol, stored as JSON):
  the state dict is stored, and the object rebuilt with `cls.__new__(cls)` and
  `__setstate__` (or its `__dict__` updated), without calling `__init__`.

Aggregates of every kind too. Their `root` is never stored: repositories keep the id and
pass it back with `loads(..., id=...)`, and it reaches the object so:
- a dataclass or pydantic aggregate: as its `root` field, `root=Root(id)` (or as a `root`
  attribute set after construction, when `root` is not an init field);
- a plain aggregate: as the first positional parameter of its `__init__`,
  `cls(id, **fields)`; an attribute named as that parameter (`self.sku = sku`) is stored
  and set back after the call;
- `build=`: as its first positional parameter too, `build(id, **fields)`;
- `__setstate__`: `root = Root(id)` is set after it.

Field values may be JSON natives, datetime, date, time, UUID, Decimal, Enum, tuples, sets
and nested dataclasses, pydantic models or registered classes. Type hints say what to
build back: a dataclass's or model's fields, the parameters of a plain class's `__init__`
or of `build=`, the class annotations of a class stored through `__getstate__` (by the
keys of its state). A hint that does not resolve leaves the JSON value as it is; from
`state=` or `__getstate__`, a field that no hint covers must hold a JSON value already,
or dumps refuses it and says which hint to add. Nothing in the data names a class: only
the registered classes, and the classes their hints name, are ever built.
Sets are stored in a canonical order (text and ints sorted, other items by their JSON
text), so the same state gives the same JSON in every process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import reprlib
import types
import typing
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any, NamedTuple, TypeVar, overload
from uuid import UUID

from pybondi.aggregate import Aggregate, Root
from pybondi.exceptions import SerializationError, UnknownMessageType, callable_name, short_repr
from pybondi.persistence.serialization.shapes import (
    PARSERS,
    Build,
    Convert,
    NotBuilt,
    Shape,
    State,
    Unsupported,
    collection,
    fixed_tuple,
    is_pydantic,
    make_shape,
    mapping,
    not_loadable,
    register_as,
    state_of,
    type_name,
    untyped,
)

__all__ = ["Registry", "Serialized"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
C = TypeVar("C", bound=type)
U = TypeVar("U", bound=Upcaster)

# One encoder for every dumps: json.dumps with separators= would build a new one per call.
# allow_nan=False: NaN and Infinity are not JSON, and other readers refuse them.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
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


# A named tuple, not a frozen dataclass: as immutable, and built in half the time, once per
# message stored or sent.
class Serialized(NamedTuple):
    """A stored message or aggregate state: its registered name, version and JSON text."""

    name: str
    version: int
    data: str


class Registry:
    """Classes under stable names and versions, to store their instances as JSON.

    Register each message and aggregate class once, with `register`, under a name that
    outlives refactorings (`"accounts.Deposited"`, not the module path). When a class
    changes shape, raise its version and register an `upcaster` that turns the previous
    version's payload into the new one; stored data is upgraded step by step as it loads.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Shape] = {}
        self._by_class: dict[type, Shape] = {}
        self._nested: dict[type, Shape] = {}  # unregistered dataclasses and models
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    @overload
    def register(
        self,
        cls: C,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        state: State | None = None,
        build: Build | None = None,
    ) -> C: ...
    @overload
    def register(
        self,
        cls: None = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        state: State | None = None,
        build: Build | None = None,
    ) -> Callable[[C], C]: ...
    def register(
        self,
        cls: C | None = None,
        /,
        *,
        name: str | None = None,
        version: int = 1,
        state: State | None = None,
        build: Build | None = None,
    ) -> C | Callable[[C], C]:
        """Register `cls` under `name` (default: its `__name__`) at `version` (default 1).

        Returns the class, so it also works as a decorator: `@registry.register(name=...)`.
        Registering the same class, name, version and functions again does nothing; any
        other reuse of a name or a class is a ValueError.

        `state` and `build` say how a class is stored and rebuilt when its `__init__` does
        not take its attributes by name (private attributes, other parameter names):
        `state(obj)` returns a dict of what to store, and `build(**fields)` (for an
        aggregate, `build(id, **fields)`) rebuilds an object from it. The type hints of
        `build`'s parameters say what each field is built back into; a field without one
        must hold a JSON value (text, numbers, lists, dicts) and is given back as such.
        """
        if cls is None:

            def decorate(cls: C) -> C:
                return self.register(cls, name=name, version=version, state=state, build=build)

            return decorate
        self._add(cls, name, version, state, build)
        return cls

    def upcaster(self, name: str, *, from_version: int) -> Callable[[U], U]:
        """Register a function that upgrades a payload of `name` from `from_version` to the next.

        The function takes the stored payload dict and returns the upgraded one; chain
        one per version (1 to 2, 2 to 3, ...) up to the registered version.
        """
        _check_version(from_version, "from_version")

        def decorate(function: U) -> U:
            shape = self._by_name.get(name)
            if shape is not None and from_version >= shape.version:
                raise _late_upcaster(name, [from_version], shape, function)
            existing = self._upcasters.setdefault((name, from_version), function)
            if existing is not function:
                raise ValueError(
                    f"{name!r} already has an upcaster from version {from_version}, "
                    f"{callable_name(existing)}; cannot also register "
                    f"{callable_name(function)}. Keep one of them."
                )
            return function

        return decorate

    def dumps(self, obj: object) -> Serialized:
        """Store a registered object as compact JSON text, with its name and version."""
        shape = self._registered(type(obj))
        payload = self._encode(shape, obj)
        try:
            data = _JSON.encode(payload)
        except ValueError as exc:  # a NaN or an infinity: encode leaves floats as they are
            raise _not_json(shape, payload, exc) from exc
        return Serialized(shape.name, shape.version, data)

    def loads(self, name: str, version: int, data: str | bytes, *, id: Any = None) -> Any:
        """Build the object that `dumps` stored, upcasting it first if `version` is older.

        `id` is required for aggregates (their root is not part of the data) and ignored
        for other classes.
        """
        shape = self._named(name)  # an unknown name is reported before the data is read
        try:
            payload = json.loads(data)
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"Cannot load {short_repr(name)} version {version}: the data is not valid "
                f"JSON ({exc}): {short_repr(data)}. Pass the text that dumps() produced."
            ) from exc
        except RecursionError as exc:
            raise _too_deep(shape, version, data, exc) from None
        try:
            return self._decode(shape, version, payload, id, owned=True)
        except RecursionError as exc:
            raise _too_deep(shape, version, data, exc) from None

    def encode(self, obj: object) -> dict[str, Any]:
        """The JSON-able payload of a registered object, without its name and version."""
        return self._encode(self._registered(type(obj)), obj)

    def decode(self, name: str, version: int, payload: dict[str, Any], *, id: Any = None) -> Any:
        """Build an object from the payload `encode` produced; see `loads`."""
        shape = self._named(name)
        try:
            return self._decode(shape, version, payload, id, owned=False)
        except RecursionError as exc:
            raise _too_deep(shape, version, payload, exc) from None

    def _decode(self, shape: Shape, version: int, payload: Any, id: Any, owned: bool) -> Any:
        """Upcast and build; `owned` says the payload is ours (fresh from json.loads)."""
        name = shape.name
        if not isinstance(payload, dict):
            raise SerializationError(
                f"Cannot load {name!r} version {version}: the data must be a JSON object, "
                f"got {short_repr(payload)}. Pass what dumps() or encode() produced."
            )
        return self._build(shape, self._upcast(shape, version, payload, owned), id)

    def name_of(self, cls_or_instance: object) -> str:
        """The name a class, or the class of an instance, is registered under."""
        return self._registered(_class_of(cls_or_instance)).name

    def version_of(self, cls_or_instance: object) -> int:
        """The version a class, or the class of an instance, is registered at."""
        return self._registered(_class_of(cls_or_instance)).version

    def type_of(self, name: str) -> type:
        """The class registered under `name`."""
        return self._named(name).cls

    def __contains__(self, item: object) -> bool:
        """Whether a name (str) or a class is registered."""
        if isinstance(item, str):
            return item in self._by_name
        return isinstance(item, type) and item in self._by_class

    def _add(
        self, cls: Any, name: str | None, version: int, state: State | None, build: Build | None
    ) -> None:
        if not isinstance(cls, type):
            raise TypeError(
                f"registry.register() takes a class, got {short_repr(cls)}. Pass the class "
                f"itself, or use @registry.register(name=...) above the class statement."
            )
        name = cls.__name__ if name is None else name
        if not isinstance(name, str) or not name:
            error = ValueError if isinstance(name, str) else TypeError
            raise error(f"A registered name must be non-empty text, got {short_repr(name)}.")
        _check_version(version, "version")
        known = self._by_class.get(cls)
        if known is not None and (known.name, known.version) != (name, version):
            raise ValueError(
                f"{callable_name(cls)} is already registered as {known.name!r} version "
                f"{known.version}; cannot also register it as {name!r} version {version}. "
                f"A class has one name and one current version: keep one registration."
            )
        if known is not None:
            if known.kind != "custom" and state is None and build is None:
                return
            if known.kind == "custom" and (known.state, known.build) == (state, build):
                return
            raise ValueError(
                f"{callable_name(cls)} is already registered as {known.name!r} version "
                f"{known.version}, stored another way; cannot register it again with "
                f"state={short_repr(state, 60)}, build={short_repr(build, 60)}. A class is "
                f"stored one way: keep one registration."
            )
        if (taken := self._by_name.get(name)) is not None:
            raise ValueError(
                f"The name {name!r} is already registered for {callable_name(taken.cls)}; "
                f"cannot also register {callable_name(cls)} under it. Give one of them "
                f"another name: registry.register({cls.__name__}, name=...)."
            )
        shape = make_shape(cls, name, version, state, build)
        if late := sorted(step for n, step in self._upcasters if n == name and step >= version):
            raise _late_upcaster(name, late, shape, self._upcasters[name, late[0]])
        self._by_name[name] = self._by_class[cls] = shape

    def _registered(self, cls: type) -> Shape:
        shape = self._by_class.get(cls)
        if shape is None:
            raise UnknownMessageType(
                f"{cls.__name__} is not registered; register it with "
                f"registry.register({cls.__name__}, name=...)."
            )
        return shape

    def _named(self, name: str) -> Shape:
        shape = self._by_name.get(name) if isinstance(name, str) else None
        if shape is None:
            names = sorted(self._by_name)
            known = ", ".join(map(repr, names[:10])) or "none yet"
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            raise UnknownMessageType(
                f"No class is registered under the name {short_repr(name)} (registered: "
                f"{known}{more}). Register the class with registry.register(cls, "
                f"name={short_repr(name)}), or check where the stored name came from."
            )
        return shape

    def _shape_of(self, cls: type) -> Shape | None:
        """The shape of a registered class, or of a dataclass or model nested in one."""
        shape = self._by_class.get(cls) or self._nested.get(cls)
        if shape is None and (dataclasses.is_dataclass(cls) or is_pydantic(cls)):
            shape = self._nested[cls] = make_shape(cls, cls.__qualname__, 1)
        return shape

    def _encode(self, shape: Shape, obj: object) -> dict[str, Any]:
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

    def _upcast(
        self, shape: Shape, version: int, payload: dict[str, Any], owned: bool
    ) -> dict[str, Any]:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SerializationError(
                f"Cannot load {shape.name!r}: version must be an int >= 1, got "
                f"{short_repr(version)}. Pass the version that dumps() stored."
            )
        if version > shape.version:
            raise SerializationError(
                f"Cannot load {shape.name!r} version {version}: it was stored by newer code; "
                f"this registry has {shape.cls.__name__} at version {shape.version}. Upgrade "
                f"this code before loading that data."
            )
        if version < shape.version and not owned:
            # Upcasters may edit it in place, nested lists and dicts too: never the caller's.
            payload = copy.deepcopy(payload)
        for step in range(version, shape.version):
            upcaster = self._upcasters.get((shape.name, step))
            if upcaster is None:
                raise SerializationError(
                    f"Cannot upcast {shape.name!r} from version {version} to {shape.version}: "
                    f"no upcaster from version {step} to {step + 1}. Register one with "
                    f"@registry.upcaster({shape.name!r}, from_version={step})."
                )
            payload = _run_upcaster(upcaster, shape.name, step, payload)
        return payload

    def _build(self, shape: Shape, payload: Any, id: Any) -> Any:
        if not isinstance(payload, dict):
            raise SerializationError(
                f"Cannot build {shape.label}: its data must be a JSON object, got "
                f"{short_repr(payload)}."
            )
        if shape.aggregate and id is None:
            raise SerializationError(
                f"Cannot build {shape.label} without its id: it is an aggregate, whose root "
                f"is not part of the stored data. Pass it: loads(..., id=...)."
            )
        if shape.kind == "pydantic":
            try:
                return shape.construct(payload, id)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise _unfit(shape, payload, str(exc)) from exc
        self._check_fields(shape, payload)
        values = self._convert(shape, payload)
        try:
            return shape.construct(values, id)
        except NotBuilt as exc:
            advice = "build= must return the object it rebuilt."
            raise _unfit(shape, payload, str(exc), advice) from None
        except RecursionError:
            raise
        except Exception as exc:  # the class's own code, or build=, refused the data
            problem = f"{shape.builder} raised {type(exc).__name__}: {exc}"
            raise _unfit(shape, payload, problem) from exc

    def _check_fields(self, shape: Shape, payload: dict[str, Any]) -> None:
        problems = []
        if missing := sorted(shape.required.difference(payload)):
            problems.append(f"missing field(s) {', '.join(map(repr, missing))}")
        if not shape.open and (unknown := [key for key in payload if key not in shape.stored]):
            problems.append(f"unknown field(s) {short_repr(unknown, 80)[1:-1]}")
        if problems:
            advice = (
                f"If the stored data has an older shape, convert it with an upcaster, "
                f"@registry.upcaster({shape.name!r}, from_version=...), or give new fields "
                f"defaults."
            )
            raise _unfit(shape, payload, " and ".join(problems), advice)

    def _convert(self, shape: Shape, payload: dict[str, Any]) -> dict[str, Any]:
        values = dict(payload)
        for field, (expected, convert) in self._converters(shape).items():
            if field in values:
                try:
                    values[field] = convert(values[field])
                except (TypeError, ValueError, ArithmeticError) as exc:
                    problem = (
                        f"field {field!r} holds {short_repr(values[field], 60)}, which is not "
                        f"a valid {expected} ({exc})"
                    )
                    advice = "Fix the data, or convert it in an upcaster."
                    raise _unfit(shape, payload, problem, advice) from exc
        return values

    def _converters(self, shape: Shape) -> dict[str, tuple[str, Convert]]:
        # Built on first decode, not at registration, so that hints may name classes
        # defined after the decorated one.
        if shape.converters is None:
            try:
                hints = typing.get_type_hints(shape.hinted)
            except Exception as exc:
                # Hints that do not resolve (a class local to a function, under postponed
                # annotations) leave every value as JSON gives it.
                hints, shape.unresolved = {}, f"{type(exc).__name__}: {exc}"
            # An open shape (**kwargs, __setstate__) takes any field: each hint counts.
            shape.converters = {
                field: (type_name(hint), convert)
                for field, hint in hints.items()
                if (field in shape.stored or (shape.open and field != "return"))
                and (convert := self._converter(hint)) is not None
            }
        return shape.converters

    def _converter(self, hint: Any) -> Convert | None:
        """How to rebuild a value of type `hint` from JSON; None when JSON gives it as is."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is None and isinstance(hint, type):
            return self._class_converter(hint)
        if origin is typing.Union or origin is types.UnionType:
            rest = [arg for arg in args if arg is not type(None)]
            inner = self._converter(rest[0]) if len(rest) == 1 else None
            return None if inner is None else lambda value: None if value is None else inner(value)
        if origin in (list, set, frozenset) or (origin is tuple and args[1:] == (...,)):
            return collection(origin, self._converter(args[0]) if args else None)
        if origin is tuple:
            return fixed_tuple([self._converter(arg) for arg in args])
        if origin is dict and len(args) == 2:
            # JSON object keys are always text: str keys need no check, and dict[str, Any]
            # then needs no copy.
            keys = None if args[0] is str else self._converter(args[0])
            return mapping(keys, self._converter(args[1]))
        return None  # Any, Literal, unions of several types...: the JSON value as is

    def _class_converter(self, cls: type) -> Convert | None:
        if cls in PARSERS:
            return PARSERS[cls]
        if issubclass(cls, Enum):
            return cls
        if cls in (tuple, set, frozenset):
            return collection(cls, None)
        # Classes named by the code's own hints, never by the data, so this builds only
        # what the registered class declares.
        if cls in self._by_class or dataclasses.is_dataclass(cls) or is_pydantic(cls):
            return lambda value: self._build(typing.cast(Shape, self._shape_of(cls)), value, None)
        return None


def _class_of(cls_or_instance: object) -> type:
    return cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)


def _check_version(version: object, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        error = ValueError if isinstance(version, int) else TypeError
        raise error(f"{what} must be an int >= 1, got {short_repr(version)}.")


def _unfit(shape: Shape, payload: Any, problem: str, advice: str = "") -> SerializationError:
    return SerializationError(
        f"Cannot build {shape.label}: {problem}; payload {short_repr(payload)}. {advice}".rstrip()
    )


def _late_upcaster(name: str, steps: list[int], shape: Shape, fn: object) -> ValueError:
    return ValueError(
        f"Upcaster {callable_name(fn)} upgrades {name!r} from version {steps[0]}, but "
        f"{shape.cls.__name__} is registered at version {shape.version}: an upcaster "
        f"upgrades an older version, so from_version must be below {shape.version}. Raise "
        f"the version in registry.register(...) or fix from_version."
    )


def _run_upcaster(
    upcaster: Upcaster, name: str, step: int, payload: dict[str, Any]
) -> dict[str, Any]:
    try:
        result = upcaster(payload)
    except Exception as exc:
        raise SerializationError(
            f"Upcaster {callable_name(upcaster)} failed to upgrade {name!r} from version "
            f"{step} to {step + 1} ({exc!r}) on payload {short_repr(payload)}. Fix the upcaster."
        ) from exc
    if not isinstance(result, dict):
        raise SerializationError(
            f"Upcaster {callable_name(upcaster)} returned {short_repr(result)} for {name!r} "
            f"version {step}; an upcaster must return the upgraded payload dict."
        )
    return result


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


def _not_json(shape: Shape, payload: dict[str, Any], exc: ValueError) -> SerializationError:
    found = _non_finite(payload)
    if found is None:
        return SerializationError(f"Cannot encode {shape.label}: {exc}.")
    path, value = found
    return SerializationError(
        f"Cannot encode field {'.'.join(path)!r} of {shape.label}: {value!r} is not valid "
        f"JSON, which has no NaN or infinity; store None for a missing number, or a Decimal, "
        f"which is stored as text."
    )


def _too_deep(shape: Shape, version: int, data: Any, exc: RecursionError) -> SerializationError:
    # reprlib stops at a few levels, where repr() itself would recurse too deeply.
    shown = short_repr(data) if isinstance(data, str | bytes) else reprlib.repr(data)
    return SerializationError(
        f"Cannot load {shape.name!r} version {version}: the data is nested too deeply to "
        f"load ({exc}): {shown}. Store flatter values, or check where the data came from."
    )
