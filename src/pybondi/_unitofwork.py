"""What a session decides without I/O, shared by its sync and async drivers.

`UnitOfWork` holds a session's state and every decision: what is queued, what is
announced (`Added`, `Committed`, `RolledBack`), which state allows what, which
transaction the unit of work writes in. `pybondi.session.Session` adds the two drivers,
side by side, that only call or await the I/O steps, in the shape of httpx's `BaseClient`
with `Client` and `AsyncClient`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextvars import Token
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pybondi.aggregate import Aggregate
from pybondi.current import _current
from pybondi.events import Added, AggregateEvent, RolledBack
from pybondi.exceptions import MessageLimitExceeded, SessionError, report_failures, short_repr
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, Publisher
from pybondi.repository import Repository

if TYPE_CHECKING:
    from pybondi.persistence.store import Transaction
    from pybondi.session import Session

__all__ = [
    "ACTIVE",
    "CLOSED",
    "NEW",
    "UnitOfWork",
    "checked_message",
    "committed",
    "not_a_command",
    "publisher_taken_over",
]

T = TypeVar("T")

NEW, ACTIVE, CLOSED = "new", "active", "closed"


class UnitOfWork:
    """A session's state and decisions; see the module docstring and `Session`."""

    def begin(self) -> Any:
        """Begin the unit of work: the drivers (`Session`) do."""
        raise NotImplementedError

    __slots__ = (
        "_announced",
        "_budget",
        "_draining",
        "_given",
        "_on_commit",
        "_owned",
        "_publishing",
        "_state",
        "_then",
        "_token",
        "max_messages",
        "messagebus",
        "publisher",
        "queue",
        "repository",
        "transaction",
    )

    def __init__(
        self,
        messagebus: Messagebus | None = None,
        repository: Repository[Any] | None = None,
        publisher: BasePublisher | None = None,
        *,
        transaction: Transaction[Any] | None = None,
        max_messages: int = 10_000,
    ) -> None:
        # The default classes pass without a call: a session is built per unit of work.
        self.messagebus: Messagebus = (
            messagebus
            if messagebus.__class__ is Messagebus
            else _slot("messagebus", messagebus, Messagebus, Messagebus)
        )
        self.repository: Repository[Any] = (
            repository
            if repository.__class__ is Repository
            else _slot("repository", repository, Repository, Repository)
        )
        self.publisher: BasePublisher = (
            publisher
            if publisher.__class__ is Publisher
            else _slot("publisher", publisher, BasePublisher, Publisher)
        )
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}.")
        self.max_messages = max_messages
        self.queue: deque[Command | Event] = deque()
        self._announced = 0  # how many aggregates of the identity map got their `Added`
        self._draining = False
        # Each drain sets `_budget` (what it may still dispatch) and `_then` (what to
        # announce once the queue is dry), read by `_next` only while it runs.
        self._budget: int
        self._then: type[AggregateEvent[Any]] | None
        self._publishing: object | None = None  # what publisher.begin() returned
        self._given = transaction
        self.transaction = transaction
        self._owned: Transaction[Any] | None = None  # given, and not held by the repository
        self._on_commit: list[Callable[[], Any]] = []
        self._token: Token[Session | None] | None = None  # current_session's, while open
        self._state = NEW

    def add(self, aggregate: Aggregate) -> None:
        """Take an aggregate into the session and queue `Added(aggregate)` for it.

        Aggregates that reach the repository another way (`repository.get(id)`, or
        `repository.add` in a handler) get their `Added` too, before their own events.
        Adding the same object twice is a no-op.
        """
        if self._state is not ACTIVE:
            self.begin()
        self.repository.add(aggregate)
        self._welcome()

    def _welcome(self) -> None:
        """Queue `Added` for the aggregates new to the repository since last time."""
        aggregates, announced = self.repository.aggregates, self._announced
        if len(aggregates) != announced:
            # The identity map only grows during a unit of work, in insertion order.
            # (Appending in a loop costs less than extending with a `map`, by half.)
            if self.messagebus.listens(Added):
                append = self.queue.append
                new = list(aggregates.values())[announced:] if announced else aggregates.values()
                for aggregate in new:
                    append(Added(aggregate))
            self._announced = len(aggregates)

    def _announce(self, event_type: type[AggregateEvent[Any]]) -> bool:
        """Queue `event_type` for each aggregate, if anyone listens; tell if it did."""
        if not self.messagebus.listens(event_type):
            return False
        append = self.queue.append
        for aggregate in self.repository.aggregates.values():
            append(event_type(aggregate))
        return True

    def _nested(self, then: type[AggregateEvent[Any]] | None) -> None:
        """A drain asked for while one is under way: it reaches what is queued now."""
        if then is not None:
            self._announce(then)

    def _rolled_back_events(self) -> list[RolledBack[Any]]:
        if not self.messagebus.listens(RolledBack):
            return []
        return [RolledBack(aggregate) for aggregate in self.repository.aggregates.values()]

    def _forget_pending(self) -> None:
        self.queue.clear()
        self._announced = len(self.repository.aggregates)
        for aggregate in self.repository.aggregates.values():
            aggregate.root.events.clear()

    def _next(self) -> Command | Event | None:
        """The next message to dispatch, or None once there is none: both drains use it.

        First the aggregates new to the identity map get their `Added`, and what each
        aggregate published joins the queue (and its repository's record); once the queue
        is dry, the drain's closing announcement (`_then`) is queued; then the run's budget
        is checked.
        """
        repository, queue = self.repository, self.queue
        aggregates = repository.aggregates
        if len(aggregates) != self._announced:
            self._welcome()
        for aggregate in aggregates.values():
            if events := aggregate.root.events:
                queue.extend(events)
                if "record" in repository._overridden:
                    repository.record(aggregate, events)
                events.clear()
        if not queue and (self._then is None or not self._finish()):
            return None
        self._budget -= 1
        if self._budget < 0:
            raise MessageLimitExceeded(self.max_messages, queue[0])
        return queue.popleft()

    def _finish(self) -> bool:
        """The queue ran dry: queue the drain's closing announcement, if anyone listens.

        `Committed`, on a commit: what its handlers cause is dispatched by the same drain,
        on a budget of its own. Tells whether it queued anything.
        """
        then, self._then = self._then, None  # once per drain
        if then is None or not self._announce(then) or not self.queue:
            return False
        self._budget = self.max_messages
        return True

    def _claim(self) -> None:
        """Check that the session may begin, and take its repository."""
        if self._state is CLOSED:
            raise SessionError(
                "This session is closed; open a new Session for the next unit of work."
            )
        if self._state is ACTIVE:
            raise SessionError("This session has already begun; sessions do not nest.")
        self.repository.claim(self)
        self._state = ACTIVE
        self._token = _current.set(cast("Session", self))  # only Session subclasses it

    def _join(self) -> None:
        """Take the unit of work's transaction, once the repository began; the publisher joins.

        The transaction is the one given, or the repository's own.
        """
        given, held = self._given, self.repository.transaction
        if given is not None or held is not None:  # else both stay None, as built
            self._owned = given if held is not given else None
            self.transaction = held if held is not None else given
        if "join" in self.publisher._overridden:
            self.publisher.join(self.transaction)

    def _owns_publisher(self) -> bool:
        """Whether `publish` still writes to the transaction this session began."""
        return self._publishing is None or self.publisher.current() is self._publishing

    def _check_publisher(self) -> None:
        """Refuse to go on while another session has taken the publisher over."""
        publishing = self._publishing
        if publishing is not None and self.publisher.current() is not publishing:
            raise publisher_taken_over()

    def on_commit(self, action: Callable[[], Any]) -> None:
        """Call `action()` once the unit of work has committed, and only then.

        For what must not happen unless the unit of work did (an e-mail, a cache
        eviction): never on a rollback or a commit that failed. Actions run in the order
        given, after the repository and the publisher committed (the outbox too); on the
        async path an `async def` action is awaited. One that raises does not keep the
        others from running; the first failure is raised after them, with a note that
        the unit of work had committed. Nothing retries an action: for what must happen
        at least once, publish a message through the outbox and act in its consumer.
        """
        if not callable(action):
            raise TypeError(
                f"session.on_commit() takes a function to call after the commit, got "
                f"{short_repr(action)}; wrap a call in a lambda: on_commit(lambda: ...)."
            )
        self._on_commit.append(action)

    def _leave(self) -> None:
        """No longer the current session (the enclosing one, if any, is again)."""
        token, self._token = self._token, None
        if token is None:
            return
        try:
            _current.reset(token)
        except ValueError:  # closed in another context than it began in: that one ends
            _current.set(None)

    def __repr__(self) -> str:
        return (
            f"<Session {self._state}: {len(self.repository.aggregates)} aggregate(s), "
            f"{len(self.queue)} queued>"
        )


def _slot(name: str, value: T | None, expected: type, default: Callable[[], T]) -> T:
    if value is None:
        return default()
    # The exact default class is checked first: isinstance on an ABC is slow, and a
    # session is built per unit of work.
    if type(value) is not default and not isinstance(value, expected):
        raise TypeError(
            f"Session() argument {name!r} expects a {expected.__module__}.{expected.__name__}, "
            f"got {type(value).__name__}: {short_repr(value)}. The order is "
            f"Session(messagebus, repository, publisher)."
        )
    return value


def publisher_taken_over() -> SessionError:
    return SessionError(
        "Another session began on the same publisher, on this thread or task, after this "
        "one, and is still open: messages published now would join its transaction. Close "
        "the inner session before using this one again."
    )


def committed(failures: list[BaseException]) -> None:
    """Raise the first failure of the `on_commit` actions, saying the commit happened."""
    for failure in failures:
        failure.add_note("The unit of work had committed: this on_commit action failed after.")
    report_failures(failures)


def not_a_command(command: object) -> TypeError:
    return TypeError(
        f"Session.execute() takes a Command, got {type(command).__name__}: "
        f"{short_repr(command)}. Use session.dispatch() for events."
    )


def checked_message(message: object) -> Command | Event:
    """The message, if it is a command or an event, for `Session.dispatch`."""
    if not isinstance(message, (Command, Event)):
        raise TypeError(
            f"Session.dispatch() takes a Command or an Event, got {type(message).__name__}: "
            f"{short_repr(message)}."
        )
    return message
