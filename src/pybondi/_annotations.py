"""Which message types a decorator registers a handler for.

Read from the decorator's arguments, or from the annotation of the handler's first
parameter (`event: Deposited | Withdrawn`). A parametrized generic event (`Added[User]`),
given or annotated, also yields a guard that narrows the handler to matching events.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from pybondi.exceptions import InvalidHandler, callable_name, short_repr
from pybondi.messages import Command, Event

AnyCallable = Callable[..., Any]
Guard = Callable[[Any], bool]


def is_function(value: object) -> bool:
    """A bare decorator receives the function itself instead of message types."""
    return callable(value) and not isinstance(value, type) and typing.get_origin(value) is None


def message_types(
    given: tuple[Any, ...], base: type, function: AnyCallable, decorator: str
) -> list[tuple[type, Guard | None]]:
    """Check the types given to a decorator, or read them from the handler's annotation.

    Each comes with its guard: `Added[User]`, given or annotated, means Added events
    about users only (see `Event._guard`).
    """
    parametrized = _parametrized_annotation(function) if given else {}
    result = []
    for message_type in given or _annotated_types(function, base, decorator):
        cls = typing.get_origin(message_type) or message_type
        if not (isinstance(cls, type) and issubclass(cls, base)):
            hint = (
                " Commands go to @messagebus.register(...)."
                if base is Event
                else (" Events go to @messagebus.on(...)." if base is Command else "")
            )
            raise InvalidHandler(
                f"@messagebus.{decorator}() takes {base.__name__} subclasses, got "
                f"{short_repr(message_type)} for {callable_name(function)}.{hint}"
            )
        given_arguments = typing.get_args(message_type)
        argument_sets = [given_arguments] if given_arguments else parametrized.get(cls, [])
        result.append((cls, _guard_for(cls, argument_sets)))
    return result


def _guard_for(cls: type, argument_sets: list[tuple[Any, ...]]) -> Guard | None:
    """The guard of `cls[a] | cls[b] | ...`: an event passes if any of them takes it."""
    if not argument_sets or not issubclass(cls, Event):
        return None
    guards = [cls._guard(arguments) for arguments in argument_sets]
    if any(guard is None for guard in guards):
        return None
    if len(guards) == 1:
        return guards[0]
    checks = typing.cast(list[Guard], guards)
    return lambda event: any(check(event) for check in checks)


def _parametrized_annotation(function: AnyCallable) -> dict[type, list[tuple[Any, ...]]]:
    """`{Added: [(User,), (Admin,)]}` for `event: Added[User] | Added[Admin]`; best effort."""
    try:
        members = _first_annotation_members(function)
    except Exception:
        return {}
    found: dict[type, list[tuple[Any, ...]]] = {}
    for member in members:
        if origin := typing.get_origin(member):
            found.setdefault(origin, []).append(typing.get_args(member))
    return found


def _first_annotation_members(function: AnyCallable) -> tuple[Any, ...]:
    hints = typing.get_type_hints(function)
    first = next(iter(inspect.signature(function).parameters), None)
    annotation = hints.get(first) if first else None
    if annotation is None:
        return ()
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _annotated_types(function: AnyCallable, base: type, decorator: str) -> tuple[Any, ...]:
    example = f"@messagebus.{decorator}({'MyEvent' if base is Event else 'MyCommand'})"
    try:
        members = _first_annotation_members(function)
    except Exception as error:
        raise InvalidHandler(
            f"Cannot read the annotations of {callable_name(function)} ({error}); name the "
            f"message types in the decorator instead: {example}."
        ) from error
    if not members:
        raise InvalidHandler(
            f"Cannot tell which messages {callable_name(function)} handles: its first "
            f"parameter has no annotation. Annotate it, or name the types: {example}."
        )
    return members
