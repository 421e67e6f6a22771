"""What a projection is: a name, handlers for events, and a reset hook.

    projection = Projection("balances", registry)

    @projection.on
    def deposited(event: Deposited, connection: Connection = Depends(current_connection)):
        connection.execute(...)

    @projection.reset
    def clear(reset: ProjectionReset, connection: Connection = Depends(current_connection)):
        connection.execute(sa.delete(balances))

Handlers are messagebus handlers (`Depends`, sync or `async def`), run in a `Session`
whose transaction also moves the projection's checkpoint; see `pybondi.projection`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from pybondi._annotations import is_function, message_types
from pybondi.exceptions import InvalidHandler, SessionError, callable_name
from pybondi.messagebus import Event, Messagebus
from pybondi.persistence.records import StoredEvent, id_problem
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import MessagingStore
from pybondi.repository import Repository

__all__ = ["Projection", "ProjectionReset", "stored_event"]

F = TypeVar("F", bound=Callable[..., Any])

RepositoryFactory = Callable[[MessagingStore], Repository[Any]]

_current: ContextVar[StoredEvent | None] = ContextVar("pybondi.projection.event", default=None)


@dataclass(frozen=True)
class ProjectionReset(Event):
    """What a rebuild dispatches to the projection's reset hook, before it starts over.

    Attributes:
        projection: the projection's name.
    """

    projection: str


def stored_event() -> StoredEvent:
    """The stored event being projected: `Depends(stored_event)` in a projection's handler.

    Its `stream`, `version`, `position` in the log and `recorded_at`, next to the decoded
    event the handler receives first. Outside a projection's handler, `SessionError`.
    """
    stored = _current.get()
    if stored is None:
        raise SessionError(
            "stored_event() is the stored event a projection's handler is running for; "
            "call it from such a handler, as Depends(stored_event)."
        )
    return stored


class Projection:
    """Handlers that turn the events of a store's log into a view, from a checkpoint.

    Args:
        name: the projection's name, which keeps its checkpoint and its lease: renaming
            it starts it anew, from the first event.
        registry: the `Registry` of the events it handles; only events of those types
            are decoded, the others skipped as stored.
        repository: makes, from the store, the repository the handlers' session uses
            (`Depends(current_session)`, then `session.repository`): a `StateRepository`
            or `TableRepository` on the same store keeps the view as aggregates, which
            commit with the checkpoint on every store, the memory one included. Without
            it, the session has an in-memory `Repository`.

    Attributes:
        messagebus: the bus the handlers are registered on; its `dependency_overrides`
            apply to them.
    """

    def __init__(
        self, name: str, registry: Registry, *, repository: RepositoryFactory | None = None
    ) -> None:
        problem = (
            "a name is a non-empty text"
            if not isinstance(name, str) or not name
            else id_problem(name, "name")
        )
        if problem:
            raise ValueError(f"Cannot name a projection {name!r}: {problem}.")
        if not isinstance(registry, Registry):
            raise TypeError(
                f"Projection() takes the Registry of the events it handles, got "
                f"{type(registry).__name__}: Projection({name!r}, registry)."
            )
        self.name = name
        self.registry = registry
        self.repository = repository
        self.messagebus = Messagebus()
        self._handled: dict[str, bool] = {}  # type name -> whether a handler takes it

    def __repr__(self) -> str:
        return f"<Projection {self.name}>"

    @overload
    def on(self, *event_types: type[Event]) -> Callable[[F], F]: ...
    @overload
    def on(self, handler: F, /) -> F: ...

    def on(self, *event_types: Any) -> Any:
        """Register the decorated function as a handler of these event types.

        As `Messagebus.on`: with no types, they are read from the annotation of the
        first parameter. Each type must be in the registry (or be a base class of
        events that are), since only registered events are decoded from the log.
        """
        if len(event_types) == 1 and is_function(event_types[0]):
            return self._on((), event_types[0])
        return lambda function: self._on(event_types, function)

    def _on(self, event_types: tuple[Any, ...], function: F) -> F:
        # Checked before anything is registered: a refused handler leaves no trace.
        for event_type, _ in message_types(event_types, Event, function, "on"):
            if event_type not in self.registry and not event_type.__subclasses__():
                raise InvalidHandler(
                    f"Projection {self.name!r} cannot handle {event_type.__name__} "
                    f"({callable_name(function)}): its registry does not know it, so it "
                    f"would never be decoded from the log. Register it with "
                    f"registry.register({event_type.__name__}, name=...)."
                )
        self.messagebus.on(*event_types)(function)
        self._handled.clear()
        return function

    def reset(self, function: F) -> F:
        """Register the decorated function as the projection's reset hook.

        A rebuild calls it with a `ProjectionReset`, first, in the transaction that sets
        the checkpoint back to 0, so that it empties the view (through
        `Depends(current_connection)`, `Depends(current_session)`...) and the events are
        then applied to an empty one. Without a hook, a rebuild is refused.
        """
        self.messagebus.on(ProjectionReset)(function)
        return function

    @property
    def resets(self) -> bool:
        """Whether the projection has a reset hook."""
        return self.messagebus.listens(ProjectionReset)

    def handles(self, type_name: str) -> bool:
        """Whether a handler takes events stored under this type name (decided once)."""
        handled = self._handled.get(type_name)
        if handled is None:
            handled = self._handled[type_name] = type_name in self.registry and bool(
                self.messagebus.listens(self.registry.type_of(type_name))
            )
        return handled

    def decode(self, stored: StoredEvent) -> Any:
        """The event a stored one holds, upcast to its registered version."""
        return self.registry.loads(stored.type, stored.schema, stored.data)


def current(stored: StoredEvent | None) -> Any:
    """Make `stored` what `stored_event()` gives; return the token to reset it with."""
    return _current.set(stored)


def restore(token: Any) -> None:
    """Undo `current`."""
    _current.reset(token)
