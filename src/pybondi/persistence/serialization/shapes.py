"""What the registry does with each class: its `Shape`, worked out once, at registration.

A shape says which fields are stored, which are required, and how the class is built
again from them (a closure per shape, made once, so that loading does no dispatch).

How a class is stored and rebuilt, by kind:
- "pydantic": `model_dump(mode="json")` and `model_validate`.
- "dataclass": its fields, and the class called with its init fields.
- "custom": the `state=` and `build=` functions given at registration.
- "setstate": the class's own `__getstate__` and `__setstate__` (copy and pickle's
  protocol, but JSON), rebuilt with `cls.__new__` and no `__init__`.
- "plain": its attributes (`__dict__`), and the class called with them by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pybondi.aggregate import Aggregate, Root
from pybondi.exceptions import callable_name, short_repr
from pybondi.persistence.serialization.converters import Convert

__all__ = [
    "Build",
    "Construct",
    "NotBuilt",
    "Shape",
    "State",
    "has_state_protocol",
    "is_pydantic",
    "make_shape",
]

State = Callable[[Any], Mapping[str, Any]]  # state=: what to store of an instance
Build = Callable[..., Any]  # build=: rebuilds an instance from its stored fields
Construct = Callable[[dict[str, Any], Any], Any]  # an instance from its fields and its id
Kind = Literal["dataclass", "pydantic", "plain", "custom", "setstate"]
# object has its own __getstate__ since Python 3.11: only a class's own one counts.
_DEFAULT_GETSTATE = getattr(object, "__getstate__", None)


@dataclasses.dataclass(slots=True)
class Shape:
    """What encode and decode do with one class, worked out once, when it is registered."""

    cls: type[Any]
    name: str  # the registered name, or the qualname of a nested unregistered class
    version: int
    kind: Kind
    aggregate: bool
    # dataclass: its init fields; plain and custom: the parameters of __init__ or build=,
    # after the one that takes an aggregate's id.
    fields: tuple[str, ...] = ()
    # Set after construction: a dataclass's init=False fields; for a plain aggregate, an
    # attribute named as the __init__ parameter that takes the id (self.sku = sku).
    late: tuple[str, ...] = ()
    required: frozenset[str] = frozenset()
    root_init: bool = False  # a dataclass aggregate whose __init__ takes root=
    open: bool = False  # an __init__ or build= with **kwargs, or __setstate__: any field
    state: State | None = None  # custom: what to store of an instance
    build: Build | None = None  # plain: the class; custom: build=
    converters: dict[str, tuple[str, Convert]] | None = None  # built on first use
    unresolved: str | None = None  # why the type hints did not resolve, if they did not
    stored: tuple[str, ...] = dataclasses.field(init=False)  # what encode reads
    loadable: frozenset[str] = dataclasses.field(init=False)  # attributes decode can set
    construct: Construct = dataclasses.field(init=False)  # builds one from converted fields

    def __post_init__(self) -> None:
        self.stored = (*self.fields, *self.late)
        self.loadable = frozenset(self.stored) | ({"root"} if self.aggregate else set())
        self.construct = _CONSTRUCTORS[self.kind](self)

    @property
    def label(self) -> str:
        """The class and its registered name, as error messages name them."""
        return f"{self.cls.__name__} ({self.name!r})"

    @property
    def builder(self) -> str:
        """What builds an instance, as error messages name it."""
        if self.kind == "custom":
            return f"{callable_name(self.build)}()"
        if self.kind == "setstate":
            return f"{self.cls.__name__}.__setstate__()"
        return f"{self.cls.__name__}()"

    @property
    def hinted(self) -> Any:
        """What the type hints of the stored fields are read from."""
        if self.kind in ("plain", "custom"):
            if isinstance(self.build, type):
                built: type[Any] = self.build  # a class: its __init__ takes the fields
                return built.__init__
            return self.build
        return self.cls


def is_pydantic(cls: type) -> bool:
    """Whether `cls` is a pydantic v2 model."""
    # Duck-typed, so that pydantic stays an optional dependency.
    return hasattr(cls, "model_dump") and hasattr(cls, "model_validate")


def make_shape(
    cls: type,
    name: str,
    version: int,
    state: State | None = None,
    build: Build | None = None,
) -> Shape:
    """Work out how `cls` is stored and rebuilt; raise TypeError if `state=`/`build=` are wrong."""
    aggregate = issubclass(cls, Aggregate)
    if state is not None or build is not None:
        return _custom_shape(cls, name, version, aggregate, state=state, build=build)
    if is_pydantic(cls):
        return Shape(cls, name, version, "pydantic", aggregate)
    if dataclasses.is_dataclass(cls):
        every = dataclasses.fields(cls)
        # An aggregate's root is never stored: repositories keep its id apart.
        stored = [field for field in every if not (aggregate and field.name == "root")]
        return Shape(
            cls,
            name,
            version,
            "dataclass",
            aggregate,
            fields=tuple(field.name for field in stored if field.init),
            late=tuple(field.name for field in stored if not field.init),
            required=frozenset(
                field.name
                for field in stored
                if field.init
                and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ),
            root_init=aggregate and any(field.name == "root" and field.init for field in every),
        )
    if has_state_protocol(cls):
        return Shape(cls, name, version, "setstate", aggregate, open=True)
    return _called_shape(cls, name, version, aggregate, kind="plain", build=cls)


def has_state_protocol(cls: type) -> bool:
    """Whether the class, or a base other than object, has copy and pickle's protocol."""
    return hasattr(cls, "__setstate__") or getattr(cls, "__getstate__", None) is not (
        _DEFAULT_GETSTATE
    )


def _called_shape(
    cls: type,
    name: str,
    version: int,
    aggregate: bool,
    *,
    kind: Kind,
    build: Build,
    state: State | None = None,
) -> Shape:
    """The shape of a class rebuilt by calling `build` with the stored fields by name."""
    try:
        parameters = list(inspect.signature(build).parameters.values())
    except (TypeError, ValueError):  # a signature Python cannot read: let the call decide
        return Shape(cls, name, version, kind, aggregate, open=True, state=state, build=build)
    late: tuple[str, ...] = ()
    if aggregate:
        # The id, passed positionally. A plain aggregate may keep it under the
        # parameter's name too (self.sku = sku): that attribute is stored, and set again.
        first, parameters = parameters[:1], parameters[1:]
        if kind == "plain" and first and first[0].kind is first[0].POSITIONAL_OR_KEYWORD:
            late = (first[0].name,)
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return Shape(
        cls,
        name,
        version,
        kind,
        aggregate,
        fields=tuple(p.name for p in named),
        late=late,
        required=frozenset(p.name for p in named if p.default is p.empty),
        open=any(p.kind is p.VAR_KEYWORD for p in parameters),
        state=state,
        build=build,
    )


def _custom_shape(
    cls: type,
    name: str,
    version: int,
    aggregate: bool,
    *,
    state: State | None,
    build: Build | None,
) -> Shape:
    call = f"registry.register({cls.__name__}, name=..., state=..., build=...)"
    if state is None or build is None:
        given, missing = ("state", "build") if build is None else ("build", "state")
        raise TypeError(
            f"registry.register({cls.__name__}, {given}=...) needs {missing}= too: state= "
            f"says what is stored of a {cls.__name__}, build= how one is rebuilt from it. "
            f"Give both: {call}."
        )
    for option, function, role in (
        ("state", state, f"takes a {cls.__name__} and returns a dict of what to store"),
        ("build", build, f"takes the stored fields by name and returns a {cls.__name__}"),
    ):
        if not callable(function):
            raise TypeError(
                f"{option}= of {cls.__name__} must be a function that {role}, got "
                f"{short_repr(function)}."
            )
    shape = _called_shape(cls, name, version, aggregate, kind="custom", build=build, state=state)
    if aggregate and not _takes_an_id(build):
        raise TypeError(
            f"build= of the aggregate {cls.__name__}, {callable_name(build)}, must take the "
            f"root id as its first positional parameter, then the stored fields by name: "
            f"def build(id, **fields) -> {cls.__name__}."
        )
    return shape


def _takes_an_id(build: Build) -> bool:
    try:
        parameters = list(inspect.signature(build).parameters.values())
    except (TypeError, ValueError):
        return True  # a signature Python cannot read: let the call decide
    return bool(parameters) and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )


class NotBuilt(Exception):
    """build= returned something else than an instance of the registered class."""


# How each kind of class is built from its converted fields and its id: a closure per
# shape, made once, so that loading does no dispatch on the kind.


def _pydantic(shape: Shape) -> Construct:
    cls, aggregate = shape.cls, shape.aggregate

    def construct(values: dict[str, Any], id: Any) -> Any:
        return cls.model_validate({**values, "root": Root(id)} if aggregate else values)

    return construct


def _dataclass(shape: Shape) -> Construct:
    cls, fields, late = shape.cls, shape.fields, shape.late
    root_init, root_late = shape.root_init, shape.aggregate and not shape.root_init

    def construct(values: dict[str, Any], id: Any) -> Any:
        init = {name: values[name] for name in fields if name in values}
        if root_init:
            init["root"] = Root(id)
        obj = cls(**init)
        for name in late:  # object.__setattr__ also works on frozen dataclasses
            if name in values:
                object.__setattr__(obj, name, values[name])
        if root_late and not hasattr(obj, "root"):
            object.__setattr__(obj, "root", Root(id))
        return obj

    return construct


def _setstate(shape: Shape) -> Construct:
    cls: Any = shape.cls
    aggregate = shape.aggregate

    def construct(values: dict[str, Any], id: Any) -> Any:
        # As copy and pickle rebuild an object: without calling __init__.
        obj = cls.__new__(cls)
        if (setstate := getattr(obj, "__setstate__", None)) is not None:
            setstate(values)
        else:
            obj.__dict__.update(values)
        if aggregate:
            object.__setattr__(obj, "root", Root(id))
        return obj

    return construct


def _custom(shape: Shape) -> Construct:
    cls, build, aggregate = shape.cls, typing.cast(Build, shape.build), shape.aggregate

    def construct(values: dict[str, Any], id: Any) -> Any:
        obj = build(id, **values) if aggregate else build(**values)
        if not isinstance(obj, cls):
            raise NotBuilt(f"{shape.builder} returned {short_repr(obj, 60)}, not a {cls.__name__}")
        return obj

    return construct


def _plain(shape: Shape) -> Construct:
    cls = shape.cls
    if not shape.aggregate:
        return lambda values, id: cls(**values)
    if not shape.late:
        return lambda values, id: cls(id, **values)
    name = shape.late[0]

    def construct(values: dict[str, Any], id: Any) -> Any:
        if name not in values:
            return cls(id, **values)
        # An attribute named as the id parameter (self.sku = sku): stored with the others,
        # it is set back after the call.
        kept = values.pop(name)
        obj = cls(id, **values)
        object.__setattr__(obj, name, kept)
        return obj

    return construct


_CONSTRUCTORS: dict[str, Callable[[Shape], Construct]] = {
    "pydantic": _pydantic,
    "dataclass": _dataclass,
    "setstate": _setstate,
    "custom": _custom,
    "plain": _plain,
}
