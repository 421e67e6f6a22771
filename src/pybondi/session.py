"""The session: one unit of work over a messagebus, a repository and a publisher.

    with Session(messagebus, repository, publisher) as session:
        session.add(account)                   # Added(account) is queued
        session.execute(Deposit(account, 10))  # handled now, with every event it causes

    async with Session(messagebus, repository, publisher) as session:
        session.add(account)
        await session.aexecute(Deposit(account, 10))

After each message, the events the session's aggregates published are queued and
dispatched in order. A clean exit finishes the queue, dispatches `Committed` for each
aggregate (and what its handlers cause), lets the publisher prepare (the outbox writes
its rows into the repository's transaction), commits the repository, then the
publisher.
An exception in the block drops what is still queued, dispatches `RolledBack` for each
aggregate, rolls back the repository and the publisher, closes, and propagates. So does
a failure while committing, before the publisher's turn: no message leaves.

Every decision (what is queued, what is announced, which state allows what, how cleanup
failures are reported) lives in the shared helpers at the top of `Session`. The sync
and async drivers below them sit side by side and differ only in calling or awaiting
the I/O steps, in the shape of httpx's `Client` and `AsyncClient`. (A generator-driven
protocol was tried first; it cost the session benchmark four times its target.)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from pybondi._awaiting import maybe_await, refuse_awaitable
from pybondi._deprecation import deprecated, module_getattr
from pybondi.aggregate import Aggregate
from pybondi.depends import async_twin
from pybondi.events import Added, AggregateEvent, Committed, RolledBack
from pybondi.exceptions import (
    MessageLimitExceeded,
    SessionError,
    report_failures,
    short_repr,
)
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.persistence.store import Connected
from pybondi.publisher import BasePublisher, Publisher
from pybondi.repository import Repository

if TYPE_CHECKING:
    from pybondi.persistence.store import Transaction

__all__ = ["Session", "current_connection", "current_session"]

logger = logging.getLogger("pybondi.session")

T = TypeVar("T")

_NEW, _ACTIVE, _CLOSED = "new", "active", "closed"

_INSTEAD = "`async with Session(...)`"

_PUBLISHER_ROLLED_BACK = (
    "The repository had committed; the session rolled the publisher back, dropping the "
    "messages it had not delivered."
)


class Session:
    """A unit of work: dispatches messages and commits or rolls back as one.

    Args:
        messagebus: routes messages to handlers; a new, empty `Messagebus` if omitted.
        repository: holds this unit of work's aggregates; a new in-memory `Repository`
            if omitted. A repository serves one open session at a time.
        publisher: sends messages out on commit; a new in-memory `Publisher` if omitted.
        transaction: a store transaction, already begun, for the unit of work (a worker
            gives one it claimed a message in). The repository joins it (a store
            repository on the same store reads and writes in it), and the session
            commits, rolls back and closes it. Without it, a store repository opens its
            own.
        max_messages: how many messages one run may dispatch before the session decides
            a chain of events is not going to end and raises `MessageLimitExceeded`.

    Attributes:
        transaction: the unit of work's store transaction, once begun: the one given, or
            the store repository's; None when the repository keeps aggregates in memory.
            The publisher joins it (the outbox writes its messages in it).

    Use one session per unit of work, on one thread or task. The sync methods need sync
    handlers and hooks; the `a`-prefixed twins (and `async with`) accept both.
    """

    __slots__ = (
        "_announced",
        "_budget",
        "_draining",
        "_given",
        "_on_commit",
        "_owned",
        "_publishing",
        "_state",
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
        self.messagebus: Messagebus = _slot("messagebus", messagebus, Messagebus, Messagebus)
        self.repository: Repository[Any] = _slot("repository", repository, Repository, Repository)
        self.publisher: BasePublisher = _slot("publisher", publisher, BasePublisher, Publisher)
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}.")
        self.max_messages = max_messages
        self.queue: deque[Command | Event] = deque()
        self._announced = 0  # how many aggregates of the identity map got their `Added`
        self._draining = False
        self._budget = max_messages  # what the drain under way may still dispatch
        self._publishing: object | None = None  # what publisher.begin() returned
        self._given = transaction
        self.transaction = transaction
        self._owned: Transaction[Any] | None = None  # given, and not held by the repository
        self._on_commit: list[Callable[[], Any]] = []
        self._token: Token[Session | None] | None = None  # current_session's, while open
        self._state = _NEW

    # Decisions, shared by both drivers (no I/O here) ------------------------------------

    def add(self, aggregate: Aggregate) -> None:
        """Take an aggregate into the session and queue `Added(aggregate)` for it.

        Aggregates that reach the repository another way (`repository.get(id)`, or
        `repository.add` in a handler) get their `Added` too, before their own events.
        Adding the same object twice is a no-op.
        """
        if self._state is not _ACTIVE:
            self.begin()
        self.repository.add(aggregate)
        self._welcome()

    def _welcome(self) -> None:
        """Queue `Added` for the aggregates new to the repository since last time."""
        aggregates = self.repository.aggregates
        if len(aggregates) != self._announced:
            # The identity map only grows during a unit of work, in insertion order.
            if self.messagebus.listens(Added):
                self.queue.extend(map(Added, list(aggregates.values())[self._announced :]))
            self._announced = len(aggregates)

    def _announce(self, event_type: type[AggregateEvent[Any]]) -> bool:
        """Queue `event_type` for each aggregate, if anyone listens; tell if it did."""
        if not self.messagebus.listens(event_type):
            return False
        self.queue.extend(map(event_type, self.repository.aggregates.values()))
        return True

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
        aggregate published joins the queue (and its repository's record); then the run's
        budget is checked.
        """
        aggregates, queue = self.repository.aggregates, self.queue
        if len(aggregates) != self._announced:
            self._welcome()
        for aggregate in aggregates.values():
            if events := aggregate.root.events:
                queue.extend(events)
                self.repository.record(aggregate, events)
                events.clear()
        if not queue:
            return None
        self._budget -= 1
        if self._budget < 0:
            raise MessageLimitExceeded(self.max_messages, queue[0])
        return queue.popleft()

    def _claim(self) -> None:
        """Check that the session may begin, and take its repository."""
        if self._state is _CLOSED:
            raise SessionError(
                "This session is closed; open a new Session for the next unit of work."
            )
        if self._state is _ACTIVE:
            raise SessionError("This session has already begun; sessions do not nest.")
        self.repository.claim(self)
        self._state = _ACTIVE
        self._token = _current.set(self)

    def _joined(self) -> Transaction[Any] | None:
        """The unit of work's transaction, once the repository began: given, or its own."""
        given, held = self._given, self.repository.transaction
        self._owned = given if held is not given else None
        self.transaction = held if held is not None else given
        return self.transaction

    def _owns_publisher(self) -> bool:
        """Whether `publish` still writes to the transaction this session began."""
        return self._publishing is None or self.publisher.current() is self._publishing

    def _check_publisher(self) -> None:
        """Refuse to go on while another session has taken the publisher over."""
        if not self._owns_publisher():
            raise _publisher_taken_over()

    # The sync driver --------------------------------------------------------------------

    def begin(self) -> Self:
        """Begin the unit of work and return the session.

        `with` does it; so do the other methods, when the session has not begun.
        """
        self._claim()
        try:
            if self._given is not None:
                self.repository.join(self._given)
            # A hook that returns something may be an async one, called here by mistake.
            if (started := self.repository.begin()) is not None:
                refuse_awaitable(started, self.repository.begin, _INSTEAD)
            if (publishing := self.publisher.begin()) is not None:
                refuse_awaitable(publishing, self.publisher.begin, _INSTEAD)
            self._publishing = publishing
            self.publisher.join(self._joined())
        except BaseException as error:
            self._close(error)
            raise
        return self

    __enter__ = begin

    def _drain(self, target: object = None) -> Any:
        # After each message: welcome new aggregates, queue what they published, go on.
        # A handler that dispatches through the session only queues: the drain under way
        # reaches its message, and the budget covers the whole chain. What the handler of
        # `target` returned is returned.
        if self._draining:
            return None
        handle, result = self.messagebus.handle, None
        self._budget, self._draining = self.max_messages, True
        try:
            while (message := self._next()) is not None:
                if message is target:
                    result = handle(message)
                else:
                    handle(message)
        finally:
            self._draining = False
        return result

    def execute(self, command: Command) -> Any:
        """Handle a command now, and every event it causes; return what its handler returned.

        Called by a handler while the session dispatches, the command only joins the
        queue (the dispatch under way reaches it), and this returns None.
        """
        if not isinstance(command, Command):
            raise _not_a_command(command)
        if self._state is not _ACTIVE:
            self.begin()
        self._check_publisher()
        self.queue.append(command)
        return self._drain(command)

    def dispatch(self, message: Command | Event) -> Any:
        """Handle a command or an event now, and every event it causes.

        Returns what a command's handler returned, as `execute` does (None for an event).
        """
        if self._state is not _ACTIVE:
            self.begin()
        self._check_publisher()
        message = _message(message)
        self.queue.append(message)
        return self._drain(message)

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

    def enqueue(self, message: Command | Event) -> None:
        """Deprecated since 2.0 (pybondi 1.2.1's name): queue a message without handling it.

        `dispatch(message)` queues it and handles it at once, with what it causes.
        """
        deprecated("Session.enqueue()", "Session.dispatch()", "it queues the message and runs it")
        self.queue.append(_message(message))

    def dequeue(self) -> Command | Event:
        """Deprecated since 2.0 (pybondi 1.2.1's name): take the next queued message."""
        deprecated("Session.dequeue()", "Session.queue.popleft()")
        return self.queue.popleft()

    def run(self) -> None:
        """Deprecated since 2.0 (pybondi 1.2.1's name): handle every queued message.

        `execute`, `dispatch` and `commit` run the queue themselves.
        """
        deprecated(
            "Session.run()",
            "Session.dispatch(message) in place of enqueue(message) and run()",
            "execute(), dispatch() and commit() run the queue",
        )
        if self._state is not _ACTIVE:
            self.begin()
        self._check_publisher()
        self._drain()

    def commit(self) -> None:
        """Commit the unit of work.

        Finish the queue, send `Committed` for each aggregate, then commit the repository
        and the publisher. A failure before the publisher's turn rolls back and propagates.
        """
        if self._state is not _ACTIVE:
            self.begin()
        try:
            self._check_publisher()
            self._drain()
            if self._announce(Committed):
                self._drain()
            if (prepared := self.publisher.prepare()) is not None:
                refuse_awaitable(prepared, self.publisher.prepare, _INSTEAD)
            self.repository.commit()
            if self._owned is not None:
                self._owned.commit()
        except BaseException as error:
            self._rollback(error)
            raise
        try:
            if (sent := self.publisher.commit()) is not None:
                refuse_awaitable(sent, self.publisher.commit, _INSTEAD)
        except BaseException as error:
            error.add_note(_PUBLISHER_ROLLED_BACK)
            report_failures(_attempt(self.publisher.rollback), error)
            raise
        actions, self._on_commit = self._on_commit, []
        _committed(_attempt(*actions))

    def rollback(self) -> None:
        """Roll back the unit of work.

        Drop the queue, send `RolledBack` for each aggregate (each chain on its own, so
        that one failing handler does not keep the others from restoring their
        aggregate), then roll back the repository and the publisher.
        """
        if self._state is not _ACTIVE:
            self.begin()
        self._rollback(None)

    def _rollback(self, cause: BaseException | None) -> None:
        self._forget_pending()
        self._on_commit.clear()
        failures = []
        for rolled_back in self._rolled_back_events():
            self.queue.append(rolled_back)
            failures += _attempt(self._drain)
            self._forget_pending()
        failures += _attempt(self.repository.rollback)
        if self._owned is not None:
            failures += _attempt(self._owned.rollback)
        self._announced = len(self.repository.aggregates)  # a store may forget them all
        if self._owns_publisher():
            failures += _attempt(self.publisher.rollback)
        else:
            failures.append(_publisher_taken_over())
        report_failures(failures, cause)

    def close(self) -> None:
        """Close the repository and the publisher; the session cannot be used again."""
        self._close(None)

    def _close(self, cause: BaseException | None) -> None:
        if self._state is not _CLOSED:
            self._state = _CLOSED
            try:
                failures = _attempt(self.repository.close, self._close_given, self.publisher.close)
            finally:
                self.repository.release()
                self._leave()
            if failures:
                report_failures(failures, cause)

    def _leave(self) -> None:
        """No longer the current session (the enclosing one, if any, is again)."""
        token, self._token = self._token, None
        if token is None:
            return
        try:
            _current.reset(token)
        except ValueError:  # closed in another context than it began in: that one ends
            _current.set(None)

    def _close_given(self) -> None:
        if self._owned is not None:
            self._owned.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self.commit()
            else:
                self._rollback(exc)
        except BaseException as failure:
            self._close(failure)
            raise
        self._close(exc)

    # The async driver: the same, awaiting the steps that may do I/O ---------------------

    async def abegin(self) -> Self:
        """`begin` for the async path."""
        self._claim()
        try:
            if self._given is not None:
                self.repository.join(self._given)
            await self.repository.abegin()
            self._publishing = await self.publisher.abegin()
            self.publisher.join(self._joined())
        except BaseException as error:
            await self._aclose(error)
            raise
        return self

    __aenter__ = abegin

    async def _adrain(self, target: object = None) -> Any:
        if self._draining:
            return None
        ahandle, result = self.messagebus.ahandle, None
        self._budget, self._draining = self.max_messages, True
        try:
            while (message := self._next()) is not None:
                if message is target:
                    result = await ahandle(message)
                else:
                    await ahandle(message)
        finally:
            self._draining = False
        return result

    async def aexecute(self, command: Command) -> Any:
        """`execute`, awaiting async handlers."""
        if not isinstance(command, Command):
            raise _not_a_command(command)
        return await self.adispatch(command)

    async def adispatch(self, message: Command | Event) -> Any:
        """`dispatch`, awaiting async handlers."""
        if self._state is not _ACTIVE:
            await self.abegin()
        self._check_publisher()
        message = _message(message)
        self.queue.append(message)
        return await self._adrain(message)

    async def acommit(self) -> None:
        """`commit` for the async path."""
        if self._state is not _ACTIVE:
            await self.abegin()
        try:
            self._check_publisher()
            await self._adrain()
            if self._announce(Committed):
                await self._adrain()
            await self.publisher.aprepare()
            await self.repository.acommit()
            if self._owned is not None:
                await self._owned.acommit()
        except BaseException as error:
            await self._arollback(error)
            raise
        try:
            await self.publisher.acommit()
        except BaseException as error:
            error.add_note(_PUBLISHER_ROLLED_BACK)
            report_failures(await _aattempt(self.publisher.arollback), error)
            raise
        actions, self._on_commit = self._on_commit, []
        _committed(await _aattempt(*map(_awaited, actions)))

    async def arollback(self) -> None:
        """`rollback` for the async path."""
        if self._state is not _ACTIVE:
            await self.abegin()
        await self._arollback(None)

    async def _arollback(self, cause: BaseException | None) -> None:
        self._forget_pending()
        self._on_commit.clear()
        failures = []
        for rolled_back in self._rolled_back_events():
            self.queue.append(rolled_back)
            failures += await _aattempt(self._adrain)
            self._forget_pending()
        failures += await _aattempt(self.repository.arollback)
        if self._owned is not None:
            failures += await _aattempt(self._owned.arollback)
        self._announced = len(self.repository.aggregates)
        if self._owns_publisher():
            failures += await _aattempt(self.publisher.arollback)
        else:
            failures.append(_publisher_taken_over())
        report_failures(failures, cause)

    async def aclose(self) -> None:
        """`close` for the async path."""
        await self._aclose(None)

    async def _aclose(self, cause: BaseException | None) -> None:
        if self._state is not _CLOSED:
            self._state = _CLOSED
            try:
                failures = await _aattempt(
                    self.repository.aclose, self._aclose_given, self.publisher.aclose
                )
            finally:
                self.repository.release()
                self._leave()
            report_failures(failures, cause)

    async def _aclose_given(self) -> None:
        if self._owned is not None:
            await self._owned.aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                await self.acommit()
            else:
                await self._arollback(exc)
        except BaseException as failure:
            await self._aclose(failure)
            raise
        await self._aclose(exc)

    def __repr__(self) -> str:
        return (
            f"<Session {self._state}: {len(self.repository.aggregates)} aggregate(s), "
            f"{len(self.queue)} queued>"
        )


if TYPE_CHECKING:
    Commited = Committed
else:  # pybondi 1.2.1's session module had it, imported from events: warn who uses it
    __getattr__ = module_getattr(__name__, {"Commited": (Committed, "pybondi.Committed")})


_current: ContextVar[Session | None] = ContextVar("pybondi.session.current", default=None)


def current_session() -> Session:
    """The open session of this thread or task: use it as `Depends(current_session)`.

    Whichever opened it (a web request, a worker, a script): its `repository`, its
    `publisher`, its store `transaction`, and `on_commit`. Sessions opened inside another
    one's block are current until they close. Outside any open session, `SessionError`.
    """
    session = _current.get()
    if session is None:
        raise SessionError(
            "No session is open in this thread or task: current_session() is the session "
            "a handler runs in. Call it from a handler (Depends(current_session)), or "
            "inside a `with Session(...)` or `async with Session(...)` block."
        )
    return session


async def _acurrent_connection() -> Any:
    return await _connected(current_session()).awriting_connection()


@async_twin(_acurrent_connection)
def current_connection() -> Any:
    """The SQLAlchemy connection of the current session's transaction: `Depends(...)` it.

    A `Connection` in a sync session, an `AsyncConnection` (to await) in an async one,
    its writes begun: what a handler writes through it (a read model, a view) commits
    with the unit of work's aggregates, or rolls back with them, on SQLite, PostgreSQL
    and MariaDB alike. A session whose store keeps no SQL connection (the memory store,
    an in-memory repository) raises `SessionError`.
    """
    return _connected(current_session()).writing_connection()


def _connected(session: Session) -> Connected:
    transaction = session.transaction
    if not isinstance(transaction, Connected):
        where = (
            "no store" if transaction is None else f"a store without SQL ({transaction.store!r})"
        )
        raise SessionError(
            f"current_connection() is the SQL connection of the session's transaction, and "
            f"this session has {where}. Give the session a repository on a SQLStore, or "
            f"keep what the handlers write in the repository's aggregates instead."
        )
    return transaction


def _committed(failures: list[BaseException]) -> None:
    """Raise the first failure of the `on_commit` actions, saying the commit happened."""
    for failure in failures:
        failure.add_note("The unit of work had committed: this on_commit action failed after.")
    report_failures(failures)


def _awaited(action: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await maybe_await(action())

    return run


def _attempt(*steps: Callable[[], object]) -> list[BaseException]:
    """Carry out every cleanup step even if some fail; return the failures."""
    failures: list[BaseException] = []
    for step in steps:
        try:
            if (result := step()) is not None:
                refuse_awaitable(result, step, _INSTEAD)
        except Exception as failure:
            failures.append(failure)
    return failures


async def _aattempt(*steps: Callable[[], Awaitable[object]]) -> list[BaseException]:
    """`_attempt`, awaiting each step."""
    failures: list[BaseException] = []
    for step in steps:
        try:
            await step()
        except Exception as failure:
            failures.append(failure)
    return failures


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


def _not_a_command(command: object) -> TypeError:
    return TypeError(
        f"Session.execute() takes a Command, got {type(command).__name__}: "
        f"{short_repr(command)}. Use session.dispatch() for events."
    )


def _message(message: object) -> Command | Event:
    if not isinstance(message, (Command, Event)):
        raise TypeError(
            f"Session.dispatch() takes a Command or an Event, got {type(message).__name__}: "
            f"{short_repr(message)}."
        )
    return message


def _publisher_taken_over() -> SessionError:
    return SessionError(
        "Another session began on the same publisher, on this thread or task, after this "
        "one, and is still open: messages published now would join its transaction. Close "
        "the inner session before using this one again."
    )
