"""Commands and events: the messages of a pybondi application.

Both are plain base classes: subclass them as plain classes or dataclasses.
`pybondi.messagebus` re-exports them, as pybondi 1.2.1 users import them from there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pybondi.exceptions import HandlerNotFound

__all__ = ["Command", "Event"]


class _Readable:
    """Plain message classes (not dataclasses) get a repr that shows their fields."""

    __slots__ = ()

    def __repr__(self) -> str:
        fields = getattr(self, "__dict__", {})
        body = ", ".join(f"{name}={value!r}" for name, value in fields.items())
        return f"{type(self).__name__}({body})"


class Event(_Readable):
    """A notification that something happened in the domain.

    Subclass it, as a plain class or a dataclass. Any number of handlers, registered with
    `@messagebus.on(...)`, receive it; a handler registered for a base class (even `Event`
    itself) receives its subclasses too.
    """

    @classmethod
    def _guard(cls, arguments: tuple[Any, ...]) -> Callable[[Any], bool] | None:
        """Which events a handler annotated `cls[arguments]` receives; None means all.

        A generic event class overrides this so that, for instance, a handler of
        `Added[User]` receives `Added` events about users only.
        """
        return None


class Command(_Readable):
    """A request to do something.

    It goes to the one handler registered with `@messagebus.register(...)`; a command
    without a handler runs its own `execute()`, which subclasses may override (sync, or
    `async def` for the async path).
    """

    def execute(self) -> Any:
        """Do what the command asks when no handler is registered for it."""
        raise HandlerNotFound(type(self))


class AggregateGuard:
    """A guard that lets an event through if its `.aggregate` is an instance of `kind`.

    `AggregateEvent._guard` makes one for a handler of `Added[User]`; the messagebus,
    seeing the type, checks `kind` in the handler's route itself, a call fewer.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __call__(self, event: Any) -> bool:
        return isinstance(event.aggregate, self.kind)
