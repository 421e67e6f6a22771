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

The registry's parts: `shapes` (what is stored of each class, and how it is built),
`encoding` (objects into payloads), `decoding` (upcasting, checking and building) and
`converters` (JSON values back into the types their hints name).
"""

from __future__ import annotations

import dataclasses
import json
import reprlib
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, overload

from pybondi.exceptions import SerializationError, UnknownMessageType, callable_name, short_repr
from pybondi.persistence.serialization.decoding import Decoder, Upcaster
from pybondi.persistence.serialization.encoding import Encoder, not_json
from pybondi.persistence.serialization.shapes import Build, Shape, State, is_pydantic, make_shape

__all__ = ["Registry", "Serialized"]

C = TypeVar("C", bound=type)
U = TypeVar("U", bound=Upcaster)

# One encoder for every dumps: json.dumps with separators= would build a new one per call.
# allow_nan=False: NaN and Infinity are not JSON, and other readers refuse them.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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
        self._decoder = Decoder(self._shape_of, self._by_class, self._upcasters)
        self._encoder = Encoder(self._shape_of, self._decoder.converters)

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
        payload = self._encoder.encode(shape, obj)
        try:
            data = _JSON.encode(payload)
        except ValueError as exc:  # a NaN or an infinity: encode leaves floats as they are
            raise not_json(shape, payload, exc) from exc
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
            return self._decoder.decode(shape, version, payload, id, owned=True)
        except RecursionError as exc:
            raise _too_deep(shape, version, data, exc) from None

    def encode(self, obj: object) -> dict[str, Any]:
        """The JSON-able payload of a registered object, without its name and version."""
        return self._encoder.encode(self._registered(type(obj)), obj)

    def decode(self, name: str, version: int, payload: dict[str, Any], *, id: Any = None) -> Any:
        """Build an object from the payload `encode` produced; see `loads`."""
        shape = self._named(name)
        try:
            return self._decoder.decode(shape, version, payload, id, owned=False)
        except RecursionError as exc:
            raise _too_deep(shape, version, payload, exc) from None

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


def _class_of(cls_or_instance: object) -> type:
    return cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)


def _check_version(version: object, what: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        error = ValueError if isinstance(version, int) else TypeError
        raise error(f"{what} must be an int >= 1, got {short_repr(version)}.")


def _late_upcaster(name: str, steps: list[int], shape: Shape, fn: object) -> ValueError:
    return ValueError(
        f"Upcaster {callable_name(fn)} upgrades {name!r} from version {steps[0]}, but "
        f"{shape.cls.__name__} is registered at version {shape.version}: an upcaster "
        f"upgrades an older version, so from_version must be below {shape.version}. Raise "
        f"the version in registry.register(...) or fix from_version."
    )


def _too_deep(shape: Shape, version: int, data: Any, exc: RecursionError) -> SerializationError:
    # reprlib stops at a few levels, where repr() itself would recurse too deeply.
    shown = short_repr(data) if isinstance(data, str | bytes) else reprlib.repr(data)
    return SerializationError(
        f"Cannot load {shape.name!r} version {version}: the data is nested too deeply to "
        f"load ({exc}): {shown}. Store flatter values, or check where the data came from."
    )
