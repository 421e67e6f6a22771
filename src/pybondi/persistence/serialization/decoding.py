"""Payloads into objects: upcast to the registered version, check, convert, build.

A `Decoder` upgrades a stored payload with the registry's upcasters, checks its fields
against the class's `Shape`, converts each value that a type hint covers back into its
type (see `converters`), and builds the object. What does not fit raises
`SerializationError`, naming the class, the field and what to do.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

from pybondi.exceptions import SerializationError, callable_name, short_repr
from pybondi.persistence.serialization.converters import (
    PARSERS,
    Convert,
    collection,
    fixed_tuple,
    mapping,
    type_name,
)
from pybondi.persistence.serialization.shapes import NotBuilt, Shape, is_pydantic

__all__ = ["Decoder", "Upcaster"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Decoder:
    """Builds objects from payloads, with the registry's shapes and upcasters.

    Args:
        shape_of: the shape of a registered class, or of a dataclass or model nested
            in one; None for any other class.
        registered: the registry's shapes by class, kept up to date by the registry.
        upcasters: the registry's upcasters by (name, version they upgrade from).
    """

    def __init__(
        self,
        shape_of: Callable[[type], Shape | None],
        registered: dict[type, Shape],
        upcasters: dict[tuple[str, int], Upcaster],
    ) -> None:
        self._shape_of = shape_of
        self._by_class = registered
        self._upcasters = upcasters

    def decode(self, shape: Shape, version: int, payload: Any, id: Any, owned: bool) -> Any:
        """Upcast and build; `owned` says the payload is ours (fresh from json.loads)."""
        name = shape.name
        if not isinstance(payload, dict):
            raise SerializationError(
                f"Cannot load {name!r} version {version}: the data must be a JSON object, "
                f"got {short_repr(payload)}. Pass what dumps() or encode() produced."
            )
        return self._build(shape, self._upcast(shape, version, payload, owned), id)

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
        for field, (expected, convert) in self.converters(shape).items():
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

    def converters(self, shape: Shape) -> dict[str, tuple[str, Convert]]:
        """How to rebuild each field of a shape that has a type hint: (its name, converter)."""
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


def _unfit(shape: Shape, payload: Any, problem: str, advice: str = "") -> SerializationError:
    return SerializationError(
        f"Cannot build {shape.label}: {problem}; payload {short_repr(payload)}. {advice}".rstrip()
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
