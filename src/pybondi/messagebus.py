"""Commands, events, and the messagebus that routes them to their handlers.

    bus = Messagebus()

    @bus.register(OpenAccount)          # exactly one handler per command
    def open_account(command: OpenAccount, db: Database = Depends(get_db)) -> None: ...

    @bus.on(AccountOpened)              # any number of handlers per event, in order
    def welcome(event: AccountOpened) -> None: ...

    bus.handle(OpenAccount("alice"))             # sync handlers
    await bus.ahandle(OpenAccount("alice"))      # sync and async handlers

Routing is resolved once per concrete message class and cached; registering a handler
or changing `dependency_overrides` clears the cache.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar, overload

from pybondi._annotations import Guard, is_function, message_types
from pybondi._deprecation import deprecated
from pybondi.depends import (
    AnyCallable,
    DependencyOverrides,
    Depends,
    Handler,
    Overridable,
    compile_async,
    compile_sync,
    kind_of,
)
from pybondi.exceptions import (
    AsyncRequired,
    DuplicateHandler,
    HandlerNotFound,
    short_repr,
)
from pybondi.messages import AggregateGuard, Command, Event

__all__ = ["Command", "Depends", "Event", "Messagebus"]

logger = logging.getLogger("pybondi.messagebus")

F = TypeVar("F", bound=AnyCallable)
M = TypeVar("M", Command, Event)
Route = Callable[[Any], Any]
AsyncRoute = Callable[[Any], Awaitable[Any]]

_SYNC_INSTEAD = "`await messagebus.ahandle(...)` (or `async with Session(...)`)"


def _ignore(message: Any) -> None:
    """The route of an event nobody handles."""


async def _aignore(message: Any) -> None:
    """The async route of an event nobody handles."""


class Messagebus(Overridable):
    """Routes each command to its handler and each event to all of its handlers.

    Args:
        raise_on_event_error: when True (the default, as in pybondi 1.2.1) the first event
            handler that raises stops the dispatch and the error propagates, so a session
            rolls back. When False, the failure is logged with the event and the handler's
            name, and the remaining handlers still run.
    """

    def __init__(self, raise_on_event_error: bool = True) -> None:
        self._raise_on_event_error = bool(raise_on_event_error)
        self.command_handlers: dict[type[Command], Handler] = {}
        self.event_handlers: dict[type[Event], list[Registration]] = {}
        self._overrides = DependencyOverrides(self._forget_routes)
        self._sequence = itertools.count()
        self._routes: dict[type, Route] = {}
        self._aroutes: dict[type, AsyncRoute] = {}
        self._listening: dict[type, bool] = {}
        # What a session's drain dispatches with, a call fewer per message than `handle`:
        # the route cache, and what builds a missing route. A subclass that overrides
        # `handle` (or `ahandle`) gets a cache that stays empty and its method as route.
        self._routing: tuple[dict[type, Route], Callable[[Any], Route]] = (
            (self._routes, self._new_route)
            if type(self).handle is Messagebus.handle
            else ({}, lambda message: self.handle)
        )
        self._arouting: tuple[dict[type, AsyncRoute], Callable[[Any], AsyncRoute]] = (
            (self._aroutes, self._new_aroute)
            if type(self).ahandle is Messagebus.ahandle
            else ({}, lambda message: self.ahandle)
        )

    @property
    def raise_on_event_error(self) -> bool:
        """Whether a failing event handler stops the dispatch (True) or is logged (False)."""
        return self._raise_on_event_error

    @raise_on_event_error.setter
    def raise_on_event_error(self, value: bool) -> None:
        self._raise_on_event_error = bool(value)
        self._forget_routes()

    # Registration -----------------------------------------------------------------------

    @overload
    def on(self, *event_types: type[Event]) -> Callable[[F], F]: ...
    @overload
    def on(self, handler: F, /) -> F: ...

    def on(self, *event_types: Any) -> Any:
        """Register the decorated function as a handler of these event types.

        With no types, `@bus.on()` or bare `@bus.on`, the types are read from the first
        parameter's annotation (`event: Deposited | Withdrawn` registers both).
        The function is returned unchanged.
        """
        if len(event_types) == 1 and is_function(event_types[0]):
            return self._on((), event_types[0])
        return lambda handler: self._on(event_types, handler)

    def _on(self, event_types: tuple[Any, ...], function: F) -> F:
        handler = Handler(function)
        for event_type, guard in message_types(event_types, Event, function, "on"):
            self._add_event_handler(event_type, handler, guard)
        return function

    @overload
    def register(self, command_type: type[Command] | None = None, /) -> Callable[[F], F]: ...
    @overload
    def register(self, handler: F, /) -> F: ...

    def register(self, command_type: Any = None, /) -> Any:
        """Register the decorated function as the one handler of a command type.

        With no type, `@bus.register()` or bare `@bus.register`, the type is read from the
        first parameter's annotation. The function is returned unchanged.
        """
        if command_type is not None and is_function(command_type):
            return self._register((), command_type)
        given = () if command_type is None else (command_type,)
        return lambda handler: self._register(given, handler)

    def _register(self, command_types: tuple[Any, ...], function: F) -> F:
        handler = Handler(function)
        types = [t for t, _ in message_types(command_types, Command, function, "register")]
        for command_type in types:  # all checked before any is registered
            existing = self.command_handlers.get(command_type)
            if existing is not None and existing.call is not handler.call:
                raise DuplicateHandler(command_type, existing.call, handler.call)
        for command_type in types:
            self.command_handlers[command_type] = handler
        self._forget_routes()
        return function

    def add_event_handler(self, event_type: type[Event], handler: AnyCallable) -> None:
        """Register `handler` for `event_type`, as `@bus.on(event_type)` does."""
        self._on((event_type,), handler)

    def add_command_handler(self, command_type: type[Command], handler: AnyCallable) -> None:
        """Register `handler` for `command_type`, as `@bus.register(command_type)` does."""
        self._register((command_type,), handler)

    def _add_event_handler(
        self, event_type: type[Event], handler: Handler, guard: Guard | None
    ) -> None:
        registered = self.event_handlers.setdefault(event_type, [])
        for index, existing in enumerate(registered):
            if existing.handler.call is handler.call:
                registered[index] = existing.widened(guard)
                break
        else:
            registered.append(Registration(next(self._sequence), handler, guard))
        self._forget_routes()

    def _forget_routes(self) -> None:
        self._routes.clear()
        self._aroutes.clear()
        self._listening.clear()

    def listens(self, event_type: type[Event]) -> bool:
        """Whether any handler is registered for `event_type` or one of its bases.

        A session asks before creating `Added`, `Committed` or `RolledBack` events, so
        that nobody pays for events nobody listens to.
        """
        listening = self._listening.get(event_type)
        if listening is None:
            listening = self._listening[event_type] = bool(self._event_handlers(event_type))
        return listening

    # Dispatch ---------------------------------------------------------------------------

    def handle(self, message: Command | Event) -> Any:
        """Dispatch a message to its handlers and return the command handler's result.

        Every handler on the route must be sync; for async ones use `ahandle`.
        """
        try:
            route = self._routes[message.__class__]
        except KeyError:
            route = self._new_route(message)
        return route(message)

    async def ahandle(self, message: Command | Event) -> Any:
        """Dispatch a message, awaiting async handlers and dependencies (see `handle`)."""
        try:
            route = self._aroutes[message.__class__]
        except KeyError:
            route = self._new_aroute(message)
        return await route(message)

    def _new_route(self, message: object) -> Route:
        route = self._routes[message.__class__] = self._sync_route(message)
        return route

    def _new_aroute(self, message: object) -> AsyncRoute:
        route = self._aroutes[message.__class__] = self._async_route(message)
        return route

    def handle_command(self, command: Command) -> Any:
        """Deprecated since 2.0 (pybondi 1.2.1's name): `handle` takes commands and events."""
        deprecated("Messagebus.handle_command()", "Messagebus.handle()")
        return self.handle(_legacy_argument("handle_command", Command, command))

    def handle_event(self, event: Event) -> None:
        """Deprecated since 2.0 (pybondi 1.2.1's name): `handle` takes commands and events."""
        deprecated("Messagebus.handle_event()", "Messagebus.handle()")
        self.handle(_legacy_argument("handle_event", Event, event))

    def _sync_route(self, message: object) -> Route:
        if isinstance(message, Command):
            handler = self._command_handler(type(message))
            if handler is None:
                return _execute_route(type(message))
            what = f"the handler of {type(message).__name__}"
            return compile_sync(handler, self._overrides, what=what, instead=_SYNC_INSTEAD)
        registrations = self._event_handlers(type(_checked(message)))
        what, overrides = f"a handler of {type(message).__name__}", self._overrides
        invokers = tuple(
            _guarded(
                compile_sync(registration.handler, overrides, what=what, instead=_SYNC_INSTEAD),
                registration.guard,
            )
            for registration in registrations
        )
        return self._event_route(invokers, tuple(r.handler.name for r in registrations))

    def _async_route(self, message: object) -> AsyncRoute:
        if isinstance(message, Command):
            handler = self._command_handler(type(message))
            if handler is None:
                return _aexecute_route(type(message))
            invoke, awaited = compile_async(handler, self._overrides)
            return invoke if awaited else _as_coroutine(invoke)
        registrations = self._event_handlers(type(_checked(message)))
        compiled = tuple(
            _aguarded(*compile_async(registration.handler, self._overrides), registration.guard)
            for registration in registrations
        )
        return self._aevent_route(compiled, tuple(r.handler.name for r in registrations))

    def _command_handler(self, command_type: type) -> Handler | None:
        for cls in command_type.__mro__:
            handler = self.command_handlers.get(cls)
            if handler is not None:
                return handler
        return None

    def _event_handlers(self, event_type: type) -> list[Registration]:
        """The registrations that apply to `event_type`, in registration order, each once."""
        found: dict[AnyCallable, Registration] = {}
        for cls in event_type.__mro__:
            for registration in self.event_handlers.get(cls, ()):
                call = registration.handler.call
                found[call] = (
                    found[call].widened(registration.guard) if call in found else (registration)
                )
        return sorted(found.values(), key=lambda registration: registration.sequence)

    def _event_route(self, invokers: tuple[Route, ...], names: tuple[str, ...]) -> Route:
        if not invokers:
            return _ignore
        if len(invokers) == 1 and self._raise_on_event_error:
            return invokers[0]
        raising = self._raise_on_event_error
        pairs = tuple(zip(invokers, names, strict=True))

        def route(event: Any) -> None:
            for invoke, name in pairs:
                try:
                    invoke(event)
                except Exception:
                    if raising:
                        raise
                    _log_failure(name, event)

        return route

    def _aevent_route(
        self, compiled: tuple[tuple[Route, bool], ...], names: tuple[str, ...]
    ) -> AsyncRoute:
        if not compiled:
            return _aignore
        raising = self._raise_on_event_error
        triples = tuple(
            (invoke, awaited, name) for (invoke, awaited), name in zip(compiled, names, strict=True)
        )

        async def route(event: Any) -> None:
            for invoke, awaited, name in triples:
                try:
                    result = invoke(event)
                    if awaited:
                        await result
                except Exception:
                    if raising:
                        raise
                    _log_failure(name, event)

        return route


class Registration(NamedTuple):
    """A handler registered for an event class, with the guard its annotation implies."""

    sequence: int
    handler: Handler
    guard: Guard | None

    def widened(self, guard: Guard | None) -> Registration:
        """A copy of the registration that also accepts what `guard` accepts."""
        mine = self.guard
        if mine is None or guard is None:
            return self._replace(guard=None)
        return self._replace(guard=lambda event: mine(event) or guard(event))


def _guarded(invoke: Route, guard: Guard | None) -> Route:
    if guard is None:
        return invoke
    if guard.__class__ is AggregateGuard:
        kind = guard.kind

        def guarded_by_kind(event: Any) -> Any:
            return invoke(event) if isinstance(event.aggregate, kind) else None

        return guarded_by_kind

    def guarded(event: Any) -> Any:
        return invoke(event) if guard(event) else None

    return guarded


def _aguarded(invoke: Route, awaited: bool, guard: Guard | None) -> tuple[Route, bool]:
    if guard is None or not awaited:
        return _guarded(invoke, guard), awaited

    async def guarded(event: Any) -> Any:
        return await invoke(event) if guard(event) else None

    return guarded, True


def _log_failure(handler_name: str, event: object) -> None:
    logger.exception(
        "Event handler %s failed on %s; the remaining handlers still run",
        handler_name,
        short_repr(event),
    )


def _legacy_argument(method: str, expected: type[M], message: object) -> M:
    if not isinstance(message, expected):
        raise TypeError(
            f"Messagebus.{method}() takes a{'n' if expected is Event else ''} "
            f"{expected.__name__}, got {type(message).__name__}: {short_repr(message)}. "
            f"Use messagebus.handle(), which takes both."
        )
    return message


def _checked(message: object) -> Event:
    if not isinstance(message, Event):
        raise TypeError(
            f"Messagebus.handle() takes a Command or an Event, got {type(message).__name__}: "
            f"{short_repr(message)}. Subclass pybondi.Command or pybondi.Event."
        )
    return message


def _executes(command_type: type) -> bool:
    return getattr(command_type, "execute", Command.execute) is not Command.execute


def _execute_route(command_type: type) -> Route:
    if not _executes(command_type):
        raise HandlerNotFound(command_type)
    execute: Route = command_type.execute  # type: ignore[attr-defined]
    if kind_of(execute).is_async:
        raise AsyncRequired(f"command {command_type.__name__}", execute, _SYNC_INSTEAD)
    return execute


def _aexecute_route(command_type: type) -> AsyncRoute:
    if not _executes(command_type):
        raise HandlerNotFound(command_type)
    execute: Route = command_type.execute  # type: ignore[attr-defined]
    return execute if kind_of(execute).is_async else _as_coroutine(execute)


def _as_coroutine(invoke: Route) -> AsyncRoute:
    async def route(message: Any) -> Any:
        return invoke(message)

    return route
