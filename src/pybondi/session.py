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

Every decision (what is queued, what is announced, which state allows what) lives in
`pybondi._unitofwork.UnitOfWork`, its base. The sync and async drivers here sit side by
side and differ only in calling or awaiting the I/O steps, in the shape of httpx's
`Client` and `AsyncClient`. (A generator-driven protocol was tried first; it cost the
session benchmark four times its target.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from pybondi._awaiting import _NOT_AWAITABLE, maybe_await, refuse_awaitable
from pybondi._deprecation import deprecated, module_getattr
from pybondi._unitofwork import (
    ACTIVE,
    CLOSED,
    UnitOfWork,
    checked_message,
    committed,
    not_a_command,
    publisher_taken_over,
)

# pybondi 1.2.1's session module had these names (it imported them for its own use), and
# code that imported them from here keeps working.
from pybondi.aggregate import Aggregate  # noqa: F401
from pybondi.events import Added, AggregateEvent, Committed, RolledBack  # noqa: F401
from pybondi.exceptions import report_failures
from pybondi.messagebus import (
    Command,
    Event,
    Messagebus,  # noqa: F401
)
from pybondi.publisher import Publisher  # noqa: F401
from pybondi.repository import Repository  # noqa: F401

__all__ = ["Session"]

logger = logging.getLogger("pybondi.session")

T = TypeVar("T")

_INSTEAD = "`async with Session(...)`"

# The hooks behind each async step: a repository (publisher) that overrides none of them
# would only run the base class's, which do nothing here (see `Repository._overridden`).
_BEGINS = frozenset({"begin", "abegin"})
_ACOMMITS = frozenset({"store", "acommit"})
_CLOSES = frozenset({"close", "aclose"})
_PREPARES = frozenset({"prepare", "aprepare"})

_PUBLISHER_ROLLED_BACK = (
    "The repository had committed; the session rolled the publisher back, dropping the "
    "messages it had not delivered."
)


class Session(UnitOfWork):
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

    __slots__ = ()

    # The sync driver --------------------------------------------------------------------

    def begin(self) -> Self:
        """Begin the unit of work and return the session.

        `with` does it; so do the other methods, when the session has not begun.
        """
        self._claim()
        repository, publisher = self.repository, self.publisher
        try:
            if self._given is not None:
                repository.join(self._given)
            # A hook that returns something may be an async one, called here by mistake.
            # (Hooks a class does not override do nothing: they are not called.)
            if "begin" in repository._overridden and (started := repository.begin()) is not None:
                refuse_awaitable(started, repository.begin, _INSTEAD)
            if (publishing := publisher.begin()) is not None and (
                publishing.__class__ not in _NOT_AWAITABLE  # what refuse_awaitable lets pass
            ):
                refuse_awaitable(publishing, publisher.begin, _INSTEAD)
            self._publishing = publishing
            self._join()
        except BaseException as error:
            self._close(error)
            raise
        return self

    __enter__ = begin

    def _drain(self, target: object = None, then: type[AggregateEvent[Any]] | None = None) -> Any:
        # After each message: welcome new aggregates, queue what they published, go on.
        # A handler that dispatches through the session only queues: the drain under way
        # reaches its message, and the budget covers the whole chain. What the handler of
        # `target` returned is returned. Once the queue is dry, `then` (`Committed`) is
        # announced, and what it causes dispatched.
        if self._draining:
            return self._nested(then)
        # `messagebus.handle`, without its call: the bus's route cache, read in place.
        routes, new_route = self.messagebus._routing
        next_message, result = self._next, None
        self._budget, self._draining, self._then = self.max_messages, True, then
        try:
            while (message := next_message()) is not None:
                try:
                    route = routes[message.__class__]
                except KeyError:
                    route = new_route(message)
                if message is target:
                    result = route(message)
                else:
                    route(message)
        finally:
            self._draining = False
        return result

    def execute(self, command: Command) -> Any:
        """Handle a command now, and every event it causes; return what its handler returned.

        Called by a handler while the session dispatches, the command only joins the
        queue (the dispatch under way reaches it), and this returns None.
        """
        if not isinstance(command, Command):
            raise not_a_command(command)
        if self._state is not ACTIVE:
            self.begin()
        self._check_publisher()
        self.queue.append(command)
        return self._drain(command)

    def dispatch(self, message: Command | Event) -> Any:
        """Handle a command or an event now, and every event it causes.

        Returns what a command's handler returned, as `execute` does (None for an event).
        """
        if self._state is not ACTIVE:
            self.begin()
        self._check_publisher()
        message = checked_message(message)
        self.queue.append(message)
        return self._drain(message)

    def enqueue(self, message: Command | Event) -> None:
        """Deprecated since 2.0 (pybondi 1.2.1's name): queue a message without handling it.

        `dispatch(message)` queues it and handles it at once, with what it causes.
        """
        deprecated("Session.enqueue()", "Session.dispatch()", "it queues the message and runs it")
        self.queue.append(checked_message(message))

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
        if self._state is not ACTIVE:
            self.begin()
        self._check_publisher()
        self._drain()

    def commit(self) -> None:
        """Commit the unit of work.

        Finish the queue, send `Committed` for each aggregate, then commit the repository
        and the publisher. A failure before the publisher's turn rolls back and propagates.
        """
        if self._state is not ACTIVE:
            self.begin()
        try:
            self._check_publisher()
            self._drain(then=Committed)
            if "prepare" in self.publisher._overridden and (
                (prepared := self.publisher.prepare()) is not None
            ):
                refuse_awaitable(prepared, self.publisher.prepare, _INSTEAD)
            if (hooks := self.repository._overridden) and ("commit" in hooks or "store" in hooks):
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
        if self._on_commit:
            actions, self._on_commit = self._on_commit, []
            committed(_attempt(*actions))

    def rollback(self) -> None:
        """Roll back the unit of work.

        Drop the queue, send `RolledBack` for each aggregate (each chain on its own, so
        that one failing handler does not keep the others from restoring their
        aggregate), then roll back the repository and the publisher.
        """
        if self._state is not ACTIVE:
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
            failures.append(publisher_taken_over())
        report_failures(failures, cause)

    def close(self) -> None:
        """Close the repository and the publisher; the session cannot be used again."""
        self._close(None)

    def _close(self, cause: BaseException | None) -> None:
        if self._state is not CLOSED:
            self._state = CLOSED
            repository = self.repository
            steps: tuple[Callable[[], object], ...] = (self.publisher.close,)
            if self._owned is not None:
                steps = (repository.close, self._owned.close, *steps)
            elif "close" in repository._overridden:
                steps = (repository.close, *steps)
            else:
                repository.aggregates.clear()  # what its `close` does
            try:
                failures = _attempt(*steps)
            finally:
                repository.release()
                self._leave()
            if failures:
                report_failures(failures, cause)

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
            if not self.repository._overridden.isdisjoint(_BEGINS):
                await self.repository.abegin()
            self._publishing = await self.publisher.abegin()
            self._join()
        except BaseException as error:
            await self._aclose(error)
            raise
        return self

    __aenter__ = abegin

    async def _adrain(
        self, target: object = None, then: type[AggregateEvent[Any]] | None = None
    ) -> Any:
        if self._draining:
            return self._nested(then)
        routes, new_route = self.messagebus._arouting
        next_message, result = self._next, None
        self._budget, self._draining, self._then = self.max_messages, True, then
        try:
            while (message := next_message()) is not None:
                try:
                    route = routes[message.__class__]
                except KeyError:
                    route = new_route(message)
                if message is target:
                    result = await route(message)
                else:
                    await route(message)
        finally:
            self._draining = False
        return result

    async def aexecute(self, command: Command) -> Any:
        """`execute`, awaiting async handlers."""
        if not isinstance(command, Command):
            raise not_a_command(command)
        return await self.adispatch(command)

    async def adispatch(self, message: Command | Event) -> Any:
        """`dispatch`, awaiting async handlers."""
        if self._state is not ACTIVE:
            await self.abegin()
        self._check_publisher()
        message = checked_message(message)
        self.queue.append(message)
        return await self._adrain(message)

    async def acommit(self) -> None:
        """`commit` for the async path."""
        if self._state is not ACTIVE:
            await self.abegin()
        try:
            self._check_publisher()
            await self._adrain(then=Committed)
            if not self.publisher._overridden.isdisjoint(_PREPARES):
                await self.publisher.aprepare()
            if not self.repository._overridden.isdisjoint(_ACOMMITS):
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
        if self._on_commit:
            actions, self._on_commit = self._on_commit, []
            committed(await _aattempt(*map(_awaited, actions)))

    async def arollback(self) -> None:
        """`rollback` for the async path."""
        if self._state is not ACTIVE:
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
            failures.append(publisher_taken_over())
        report_failures(failures, cause)

    async def aclose(self) -> None:
        """`close` for the async path."""
        await self._aclose(None)

    async def _aclose(self, cause: BaseException | None) -> None:
        if self._state is not CLOSED:
            self._state = CLOSED
            repository = self.repository
            steps: tuple[Callable[[], Awaitable[object]], ...] = (self.publisher.aclose,)
            if self._owned is not None:
                steps = (repository.aclose, self._owned.aclose, *steps)
            elif not repository._overridden.isdisjoint(_CLOSES):
                steps = (repository.aclose, *steps)
            else:
                repository.aggregates.clear()  # what its `close` does
            try:
                failures = await _aattempt(*steps)
            finally:
                repository.release()
                self._leave()
            if failures:
                report_failures(failures, cause)

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


if TYPE_CHECKING:
    Commited = Committed
else:  # pybondi 1.2.1's session module had it, imported from events: warn who uses it
    __getattr__ = module_getattr(__name__, {"Commited": (Committed, "pybondi.Committed")})


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
