"""The session: one unit of work over a messagebus, a repository and a publisher.

    with Session(messagebus, repository, publisher) as session:
        session.add(account)                   # Added(account) is queued
        session.execute(Deposit(account, 10))  # handled now, with every event it causes

    async with Session(messagebus, repository, publisher) as session:
        session.add(account)
        await session.aexecute(Deposit(account, 10))

After each message, the events the session's aggregates published are queued and
dispatched in order. A clean exit finishes the queue, dispatches `Committed` for each
aggregate (and what its handlers cause), commits the repository, then the publisher.
An exception in the block drops what is still queued, dispatches `RolledBack` for each
aggregate, rolls back the repository and the publisher, closes, and propagates. So does
a failure while committing, before the publisher's turn: no message leaves.

The transaction protocol is written once, as generators of `Step`s that make every
decision; `_run` and `_arun` only carry the steps out, calling or awaiting them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.events import Added, AggregateEvent, Committed, RolledBack
from pybondi.exceptions import (
    AsyncRequired,
    MessageLimitExceeded,
    SessionError,
    callable_name,
    short_repr,
)
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, Publisher
from pybondi.repository import Repository

__all__ = ["Session"]

logger = logging.getLogger("pybondi.session")

T = TypeVar("T")


class Step(NamedTuple):
    """One action of the transaction protocol: a method of the session's `part`."""

    part: str
    method: str
    amethod: str


DRAIN = Step("", "_drain", "_adrain")
REPOSITORY_BEGIN = Step("repository", "begin", "abegin")
REPOSITORY_COMMIT = Step("repository", "commit", "acommit")
REPOSITORY_ROLLBACK = Step("repository", "rollback", "arollback")
REPOSITORY_CLOSE = Step("repository", "close", "aclose")
PUBLISHER_BEGIN = Step("publisher", "begin", "abegin")
PUBLISHER_COMMIT = Step("publisher", "commit", "acommit")
PUBLISHER_ROLLBACK = Step("publisher", "rollback", "arollback")
PUBLISHER_CLOSE = Step("publisher", "close", "aclose")

Flow = Generator[Step, None, None]

_NEW, _ACTIVE, _CLOSED = "new", "active", "closed"


class Session:
    """A unit of work: dispatches messages and commits or rolls back as one.

    Args:
        messagebus: routes messages to handlers; a new, empty `Messagebus` if omitted.
        repository: holds this unit of work's aggregates; a new in-memory `Repository`
            if omitted. A repository serves one open session at a time.
        publisher: sends messages out on commit; a new in-memory `Publisher` if omitted.
        max_messages: how many messages one run may dispatch before the session decides
            a chain of events is not going to end and raises `MessageLimitExceeded`.

    Use one session per unit of work, on one thread or task. The sync methods need sync
    handlers and hooks; the `a`-prefixed twins (and `async with`) accept both.
    """

    def __init__(
        self,
        messagebus: Messagebus | None = None,
        repository: Repository[Any] | None = None,
        publisher: BasePublisher | None = None,
        *,
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
        self._state = _NEW

    # Work that needs no I/O -------------------------------------------------------------

    def add(self, aggregate: Aggregate) -> None:
        """Take an aggregate into the session and queue `Added(aggregate)` for it.

        Aggregates that reach the repository another way (`repository.get(id)`, or
        `repository.add` in a handler) get their `Added` too, before their own events.
        Adding the same object twice is a no-op.
        """
        if self._state is not _ACTIVE:
            self._run(self._begin_flow())
        self.repository.add(aggregate)
        self._take_news()

    def _take_news(self) -> None:
        """Queue `Added` for aggregates new to the repository, then their events."""
        queue, aggregates = self.queue, self.repository.aggregates
        if len(aggregates) != self._announced:
            # The identity map only grows during a unit of work, in insertion order.
            newcomers = list(aggregates.values())[self._announced :]
            queue.extend(map(Added, newcomers))
            self._announced = len(aggregates)
        for aggregate in aggregates.values():
            events = aggregate.root.events
            if events:
                queue.extend(events)
                events.clear()

    def _messages(self) -> Iterator[Command | Event]:
        """Yield queued messages, first taking what the aggregates published meanwhile."""
        queue = self.queue
        for count in range(self.max_messages + 1):
            self._take_news()
            if not queue:
                return
            if count == self.max_messages:
                raise MessageLimitExceeded(self.max_messages, queue[0])
            yield queue.popleft()

    def _announce(self, event_type: type[AggregateEvent[Any]]) -> None:
        self.queue.extend(map(event_type, self.repository.aggregates.values()))

    def _forget_pending(self) -> None:
        self.queue.clear()
        self._announced = len(self.repository.aggregates)
        for aggregate in self.repository.aggregates.values():
            aggregate.root.events.clear()

    # The transaction protocol, decided once for both drivers ----------------------------

    def _begin_flow(self) -> Flow:
        if self._state is _CLOSED:
            raise SessionError(
                "This session is closed; open a new Session for the next unit of work."
            )
        if self._state is _ACTIVE:
            raise SessionError("This session has already begun; sessions do not nest.")
        self.repository.claim(self)
        self._state = _ACTIVE
        try:
            yield REPOSITORY_BEGIN
            yield PUBLISHER_BEGIN
        except BaseException as error:
            yield from self._close_flow(error)
            raise

    def _dispatch_flow(self, message: Command | Event) -> Flow:
        if self._state is not _ACTIVE:
            yield from self._begin_flow()
        self.queue.append(message)
        yield DRAIN

    def _commit_flow(self) -> Flow:
        try:
            yield DRAIN
            self._announce(Committed)
            yield DRAIN
            yield REPOSITORY_COMMIT
        except BaseException as error:
            yield from self._rollback_flow(error)
            raise
        try:
            yield PUBLISHER_COMMIT
        except BaseException as error:
            error.add_note(
                "The repository had committed; the session rolled the publisher back, "
                "dropping the messages it had not delivered."
            )
            yield from _attempt([PUBLISHER_ROLLBACK], error)
            raise

    def _rollback_flow(self, cause: BaseException | None = None) -> Flow:
        self._forget_pending()
        self._announce(RolledBack)
        yield from _attempt([DRAIN, REPOSITORY_ROLLBACK, PUBLISHER_ROLLBACK], cause)
        self._forget_pending()

    def _close_flow(self, cause: BaseException | None = None) -> Flow:
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        try:
            yield from _attempt([REPOSITORY_CLOSE, PUBLISHER_CLOSE], cause)
        finally:
            self.repository.release()

    def _exit_flow(self, error: BaseException | None) -> Flow:
        try:
            if error is None:
                yield from self._commit_flow()
            else:
                yield from self._rollback_flow(error)
        except BaseException as failure:
            yield from self._close_flow(failure)
            raise
        yield from self._close_flow(error)

    # The sync driver --------------------------------------------------------------------

    def _run(self, flow: Flow) -> None:
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else next(flow)
            except StopIteration:
                return
            error = None
            try:
                hook = getattr(getattr(self, step.part) if step.part else self, step.method)
                result = hook()
                if result is not None:
                    _refuse(result, hook)
            except BaseException as failure:
                error = failure

    def _drain(self) -> None:
        handle = self.messagebus.handle
        for message in self._messages():
            handle(message)

    def begin(self) -> None:
        """Begin the unit of work (`with` does it; other methods do it when needed)."""
        self._run(self._begin_flow())

    def execute(self, command: Command) -> None:
        """Handle a command now, and every event it causes."""
        self._run(self._dispatch_flow(_command(command)))

    def dispatch(self, message: Command | Event) -> None:
        """Handle a command or an event now, and every event it causes."""
        self._run(self._dispatch_flow(_message(message)))

    def commit(self) -> None:
        """Commit the unit of work.

        Finish the queue, send `Committed` for each aggregate, then commit the repository
        and the publisher. A failure before the publisher's turn rolls back and propagates.
        """
        self._run(self._active(self._commit_flow()))

    def rollback(self) -> None:
        """Roll back the unit of work.

        Drop the queue, send `RolledBack` for each aggregate, then roll back the repository
        and the publisher.
        """
        self._run(self._active(self._rollback_flow()))

    def close(self) -> None:
        """Close the repository and the publisher; the session cannot be used again."""
        self._run(self._close_flow())

    def __enter__(self) -> Session:
        self._run(self._begin_flow())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._run(self._exit_flow(exc))

    # The async driver -------------------------------------------------------------------

    async def _arun(self, flow: Flow) -> None:
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else next(flow)
            except StopIteration:
                return
            error = None
            try:
                await getattr(getattr(self, step.part) if step.part else self, step.amethod)()
            except BaseException as failure:
                error = failure

    async def _adrain(self) -> None:
        ahandle = self.messagebus.ahandle
        for message in self._messages():
            await ahandle(message)

    async def abegin(self) -> None:
        """`begin` for the async path."""
        await self._arun(self._begin_flow())

    async def aexecute(self, command: Command) -> None:
        """`execute`, awaiting async handlers."""
        await self._arun(self._dispatch_flow(_command(command)))

    async def adispatch(self, message: Command | Event) -> None:
        """`dispatch`, awaiting async handlers."""
        await self._arun(self._dispatch_flow(_message(message)))

    async def acommit(self) -> None:
        """`commit` for the async path."""
        await self._arun(self._active(self._commit_flow()))

    async def arollback(self) -> None:
        """`rollback` for the async path."""
        await self._arun(self._active(self._rollback_flow()))

    async def aclose(self) -> None:
        """`close` for the async path."""
        await self._arun(self._close_flow())

    async def __aenter__(self) -> Session:
        await self._arun(self._begin_flow())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._arun(self._exit_flow(exc))

    def _active(self, flow: Flow) -> Flow:
        if self._state is not _ACTIVE:
            yield from self._begin_flow()
        yield from flow

    def __repr__(self) -> str:
        return (
            f"<Session {self._state}: {len(self.repository.aggregates)} aggregate(s), "
            f"{len(self.queue)} queued>"
        )


def _attempt(steps: list[Step], cause: BaseException | None) -> Flow:
    """Carry out every step even if some fail; then report the failures.

    With a `cause` (the error that made us roll back or close), failures are logged and
    noted on it, since it is the one that must propagate; without, the first is raised.
    """
    failures: list[BaseException] = []
    for step in steps:
        try:
            yield step
        except Exception as failure:
            failures.append(failure)
    if not failures:
        return
    if cause is None:
        raise failures[0]
    for other in failures:
        logger.error("While cleaning up after %r, another error occurred", cause, exc_info=other)
        cause.add_note(f"While cleaning up, another error occurred: {other!r}")


def _slot(name: str, value: T | None, expected: type, default: Callable[[], T]) -> T:
    if value is None:
        return default()
    if not isinstance(value, expected):
        raise TypeError(
            f"Session() argument {name!r} expects a {expected.__module__}.{expected.__name__}, "
            f"got {type(value).__name__}: {short_repr(value)}. The order is "
            f"Session(messagebus, repository, publisher)."
        )
    return value


def _command(command: object) -> Command:
    if not isinstance(command, Command):
        raise TypeError(
            f"Session.execute() takes a Command, got {type(command).__name__}: "
            f"{short_repr(command)}. Use session.dispatch() for events."
        )
    return command


def _message(message: object) -> Command | Event:
    if not isinstance(message, Command | Event):
        raise TypeError(
            f"Session.dispatch() takes a Command or an Event, got {type(message).__name__}: "
            f"{short_repr(message)}."
        )
    return message


def _refuse(result: object, hook: Any) -> None:
    """A hook returned something: an awaitable means it is async and was called sync."""
    if hasattr(result, "__await__"):
        close = getattr(result, "close", None)
        if close is not None:
            close()  # never leave an un-awaited coroutine behind to warn later
        raise AsyncRequired(f"{callable_name(hook)}()", hook, "`async with Session(...)`")
