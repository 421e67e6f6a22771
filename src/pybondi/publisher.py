"""Messages for the outside world, sent only when the unit of work commits.

    publisher = Publisher()

    @publisher.subscribe("accounts")
    def notify(message: Message[dict[str, int]], mail: Mailer = Depends(get_mailer)) -> None:
        mail.send(message.payload)

    publisher.publish("accounts", Message({"balance": 10}))   # buffered
    publisher.commit()                                         # delivered, in order

`BasePublisher` is the interface broker adapters implement; `Publisher` is the in-memory
one. Buffered messages belong to the current transaction: `begin()` opens one for the
current thread or asyncio task (a `contextvars` context), so sessions on two threads or
two tasks sharing one publisher never see each other's messages. (A thread started with
`loop.run_in_executor` does not inherit the task's context; `asyncio.to_thread` does.)

When a subscriber raises during `commit()`, delivery stops at that message and
`DeliveryError` is raised. Nothing is dropped: that message and every one behind it stay
buffered. Calling `commit()` again resumes with the subscriber that failed (the ones
before it are not called twice); `rollback()` drops them. A session that sees this error
rolls the publisher back and re-raises it, and the error's `undelivered` attribute holds
the messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload
from uuid import UUID, uuid4

from pybondi._awaiting import maybe_await
from pybondi._deprecation import deprecated, module_getattr
from pybondi.depends import (
    AnyCallable,
    DependencyOverrides,
    Depends,
    Handler,
    Overridable,
    compile_async,
    compile_sync,
)
from pybondi.exceptions import DeliveryError, InvalidHandler, SessionError, short_repr
from pybondi.tracing import Handling, _handled, trace

if TYPE_CHECKING:
    from pybondi.persistence.store import Transaction

__all__ = ["BasePublisher", "BufferedPublisher", "Depends", "Message", "Publisher"]

T = TypeVar("T")
F = TypeVar("F", bound=AnyCallable)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Message(Generic[T]):
    """A message for the outside world: a payload and its envelope.

    Attributes:
        payload: what the message carries.
        sender: who sent it, if the receiver should know.
        id: unique per message; consumers use it to recognise a redelivery. A UUID for
            messages pybondi makes; a message received from a broker keeps its sender's
            id, a UUID when it is one (in its canonical form), else the text as sent (a
            Redis entry id, say).
        headers: string metadata travelling with the message.
        timestamp: when the message was created, in UTC.
    """

    payload: T
    sender: str | None = None
    id: UUID | str = field(default_factory=uuid4)
    headers: dict[str, str] = field(default_factory=dict)
    timestamp: datetime = field(default_factory=_utcnow)


class BasePublisher(ABC):
    """The interface a session uses to send messages when it commits.

    Override `publish`, `commit` and `rollback`, plus `begin` and `close` if the transport
    needs them. `publish` only buffers, so it is sync everywhere. A publisher that does I/O
    in `commit` overrides `acommit` (and the other `a` methods) for the async path, or
    writes its hooks `async def`: the `a` methods await what the sync ones return. An
    async-only publisher makes the sync methods raise `AsyncRequired`.

    A publisher that keeps one buffer per transaction returns a handle from `begin()` and
    the handle of the transaction `publish` writes to from `current()`; a session compares
    the two to refuse interleaving with another session on the same publisher.
    """

    # Which of `join`, `prepare` and `aprepare` the class overrides, set for each
    # subclass: a session skips calling the others, which do nothing, per unit of work.
    _overridden: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._overridden = frozenset(
            name
            for name in ("join", "prepare", "aprepare")
            if getattr(cls, name) is not getattr(BasePublisher, name)
        )

    @abstractmethod
    def publish(self, topic: str, message: Message[Any]) -> None:
        """Buffer a message for `topic` until `commit()`."""

    def begin(self) -> object | None:
        """Start a transaction; may return a handle that identifies it."""
        return None

    def current(self) -> object | None:
        """The handle of the transaction `publish` writes to now, if the publisher has one."""
        return None

    def join(self, transaction: Transaction[Any] | None) -> None:
        """Called by the session once it began, with its store transaction; nothing here.

        `transaction` is the unit of work's transaction on a store (None when its
        repository keeps aggregates in memory). A publisher that writes in it (the
        outbox) takes it now, so that its writes commit, or roll back, with the rest.
        """

    def prepare(self) -> Awaitable[None] | None:
        """Called by the session just before the transaction commits; does nothing here.

        A publisher that writes in the session's transaction (the outbox) does it now,
        so that its writes commit, or roll back, with the aggregates.
        """
        return None

    @abstractmethod
    def commit(self) -> Awaitable[None] | None:
        """Send every buffered message, in the order published."""

    @abstractmethod
    def rollback(self) -> Awaitable[None] | None:
        """Drop every buffered message."""

    def close(self) -> Awaitable[None] | None:
        """End the transaction and release what it held."""
        return None

    async def abegin(self) -> object | None:
        """`begin` for the async path."""
        return await maybe_await(self.begin())

    async def aprepare(self) -> None:
        """`prepare` for the async path."""
        await maybe_await(self.prepare())

    async def acommit(self) -> None:
        """`commit` for the async path."""
        await maybe_await(self.commit())

    async def arollback(self) -> None:
        """`rollback` for the async path."""
        await maybe_await(self.rollback())

    async def aclose(self) -> None:
        """`close` for the async path."""
        await maybe_await(self.close())


class _Transaction(deque[tuple[str, Any]]):
    """The `(topic, message)` pairs one transaction published, oldest first.

    Broker and outbox publishers buffer each message serialized, as an `Envelope`.

    `resume` is the index of the subscriber to call first for the oldest message, after a
    failed delivery; `token` restores the transaction `begin()` replaced.
    """

    resume = 0
    token: Token[_Transaction | None] | None = None
    joined: Any = None  # the store transaction an outbox writes in, if any


_SYNC_INSTEAD = "`await publisher.acommit()` (or `async with Session(...)`)"


class BufferedPublisher(BasePublisher):
    """A publisher that keeps one buffer of `(topic, message)` pairs per transaction.

    The base of the in-memory publisher and of the broker and outbox publishers: it
    gives them `begin`, `current`, `pending`, `rollback` and `close`; they write
    `commit` (and `acommit`), which empties `self._buffer()` as messages leave.
    """

    def __init__(self) -> None:
        self._transaction: ContextVar[_Transaction | None] = ContextVar(
            f"pybondi.{type(self).__name__}.{id(self):x}", default=None
        )

    def publish(self, topic: str, message: Message[Any]) -> None:
        """Buffer a message for `topic`, to leave on `commit()`."""
        if not isinstance(message, Message):
            raise _not_a_message(message)
        if not isinstance(topic, str):
            raise _not_a_topic(topic)
        trace(message)
        self._buffer().append((topic, self._buffered(topic, message)))

    def _buffered(self, topic: str, message: Message[Any]) -> Any:
        """What to buffer for a message: the message itself, or its serialized form."""
        return message

    def _buffer(self) -> _Transaction:
        """The current transaction's buffer, opened if there is none."""
        transaction = self._transaction.get()
        if transaction is None:
            transaction = _Transaction()
            self._transaction.set(transaction)
        return transaction

    def begin(self) -> object:
        """Open a transaction for the current thread or task; `close()` ends it."""
        transaction = _Transaction()
        transaction.token = self._transaction.set(transaction)
        return transaction

    def current(self) -> object | None:
        """The transaction `publish` writes to in this thread or task."""
        return self._transaction.get()

    def pending(self) -> list[tuple[str, Message[Any]]]:
        """The `(topic, message)` pairs buffered and not yet delivered."""
        transaction = self._transaction.get()
        return [] if transaction is None else list(transaction)

    def rollback(self) -> None:
        """Drop every buffered message of the current transaction."""
        transaction = self._transaction.get()
        if transaction is not None:
            transaction.clear()
            transaction.resume = 0

    def close(self) -> None:
        """End the transaction `begin()` opened, returning to the one before it, if any.

        Raises `SessionError` if messages are still buffered: commit or roll back first.
        """
        transaction = self._transaction.get()
        if transaction is None:
            return
        if transaction:
            raise SessionError(
                f"The publisher still holds {len(transaction)} undelivered "
                f"message(s); call commit() or rollback() before close()."
            )
        if transaction.token is not None:
            try:
                self._transaction.reset(transaction.token)
            except ValueError:
                # Opened in another context (a task started inside the transaction):
                # that context's copy of the variable ends with it.
                self._transaction.set(None)


class Publisher(BufferedPublisher, Overridable):
    """The in-memory publisher: subscribers are functions in this process.

    While a subscriber runs, its message is the one being handled (`pybondi.tracing`):
    what it publishes carries the message's correlation id, and its id as causation id.
    """

    def __init__(self) -> None:
        super().__init__()
        self.subscribers: dict[str, list[Handler]] = {}
        self._overrides = DependencyOverrides(self._forget_routes)
        self._routes: dict[str, tuple[tuple[Callable[[Any], Any], ...], tuple[str, ...]]] = {}
        self._aroutes: dict[
            str, tuple[tuple[tuple[Callable[[Any], Any], bool], ...], tuple[str, ...]]
        ] = {}

    # Subscribing ------------------------------------------------------------------------

    @overload
    def subscribe(self, *topics: str) -> Callable[[F], F]: ...
    @overload
    def subscribe(self, topic: str, subscriber: F, /) -> F: ...

    def subscribe(self, *topics: Any) -> Any:
        """Register the decorated function as a subscriber of these topics.

        `publisher.subscribe("topic", function)` registers directly, as in pybondi 1.x.
        The function receives the `Message`, plus its `Depends(...)` parameters.
        """
        if topics and callable(topics[-1]) and not isinstance(topics[-1], str):
            return self._subscribe(topics[:-1], topics[-1])
        return lambda function: self._subscribe(topics, function)

    def add_subscriber(self, topic: str, subscriber: AnyCallable) -> None:
        """Deprecated since 2.0 (pybondi 1.2.1's name): `subscribe(topic, subscriber)`."""
        deprecated("Publisher.add_subscriber()", "Publisher.subscribe(topic, subscriber)")
        self._subscribe((topic,), subscriber)

    @property
    def queue(self) -> deque[tuple[str, Any]]:
        """Deprecated since 2.0 (pybondi 1.2.1's name): the buffered `(topic, message)` pairs.

        The current transaction's own buffer, as 1.2.1's `queue` was; `pending()` returns
        a copy of it.
        """
        deprecated("Publisher.queue", "Publisher.pending()")
        return self._buffer()

    def _subscribe(self, topics: tuple[Any, ...], function: F) -> F:
        if not topics or not all(isinstance(topic, str) for topic in topics):
            raise InvalidHandler(
                f"publisher.subscribe() takes one or more topic names (str), got "
                f"{short_repr(topics)}, as in @publisher.subscribe('orders')."
            )
        handler = Handler(function)
        for topic in topics:
            self.subscribers.setdefault(topic, []).append(handler)
        self._forget_routes()
        return function

    def _forget_routes(self) -> None:
        self._routes.clear()
        self._aroutes.clear()

    def _route(self, topic: str) -> tuple[tuple[Callable[[Any], Any], ...], tuple[str, ...]]:
        """The subscribers' invokers for `topic`, and their names for error messages."""
        route = self._routes.get(topic)
        if route is None:
            what, handlers = f"a subscriber of {topic!r}", self.subscribers.get(topic, ())
            invokers = tuple(
                compile_sync(handler, self._overrides, what=what, instead=_SYNC_INSTEAD)
                for handler in handlers
            )
            route = self._routes[topic] = (invokers, tuple(h.name for h in handlers))
        return route

    def _aroute(
        self, topic: str
    ) -> tuple[tuple[tuple[Callable[[Any], Any], bool], ...], tuple[str, ...]]:
        """`_route` for the async path: each invoker says whether to await it."""
        route = self._aroutes.get(topic)
        if route is None:
            handlers = self.subscribers.get(topic, ())
            invokers = tuple(compile_async(h, self._overrides) for h in handlers)
            route = self._aroutes[topic] = (invokers, tuple(h.name for h in handlers))
        return route

    # The transaction --------------------------------------------------------------------

    def publish(self, topic: str, message: Message[Any]) -> None:
        """Buffer a message for `topic`; it is delivered on `commit()`."""
        if message.__class__ is not Message and not isinstance(message, Message):
            raise _not_a_message(message)
        if topic.__class__ is not str:
            raise _not_a_topic(topic)
        if _handled.get() is not None:
            trace(message)
        transaction = self._transaction.get()
        if transaction is None:
            transaction = _Transaction()
            self._transaction.set(transaction)
        transaction.append((topic, message))

    def commit(self) -> None:
        """Deliver the buffered messages in order; see the module docstring on failures."""
        transaction, routes = self._transaction.get(), self._routes
        if not transaction:
            return
        # Each message is the one being handled while its subscribers run. Setting the
        # context variable per message would cost more than the delivery itself: the
        # variable holds a cursor, moved from message to message.
        cursor = Handling()
        before = _handled.set(cursor)
        # Only the oldest message can have been delivered in part, by a commit that failed:
        # `resume` is read once, reset once that message is through, and set by a failure.
        index = resumed = transaction.resume
        try:
            while transaction:
                topic, message = transaction[0]
                invokers, names = routes.get(topic) or self._route(topic)
                cursor.message = message
                try:
                    for deliver in invokers[index:] if index else invokers:
                        deliver(message)
                        index += 1
                except Exception as error:
                    transaction.resume = index
                    raise DeliveryError(topic, message, names[index], list(transaction)) from error
                if resumed:
                    transaction.resume = resumed = 0
                index = 0
                transaction.popleft()
        finally:
            cursor.message = None
            _handled.reset(before)

    async def acommit(self) -> None:
        """`commit`, awaiting async subscribers."""
        transaction = self._transaction.get()
        if not transaction:
            return
        cursor = Handling()
        before = _handled.set(cursor)
        index = resumed = transaction.resume  # as in `commit`
        try:
            while transaction:
                topic, message = transaction[0]
                invokers, names = self._aroute(topic)
                cursor.message = message
                try:
                    for deliver, awaited in invokers[index:] if index else invokers:
                        result = deliver(message)
                        if awaited:
                            await result
                        index += 1
                except Exception as error:
                    transaction.resume = index
                    raise DeliveryError(topic, message, names[index], list(transaction)) from error
                if resumed:
                    transaction.resume = resumed = 0
                index = 0
                transaction.popleft()
        finally:
            cursor.message = None
            _handled.reset(before)


class Base(BasePublisher):
    """Deprecated since 2.0 (pybondi 1.2.1's name): subclass `BasePublisher`.

    As in 1.2.1, a subclass need only override `publish`: `commit` and `rollback` do
    nothing unless overridden. The publishers pybondi ships derive from `BasePublisher`, not
    from this class: check `isinstance(publisher, BasePublisher)`.
    """

    def commit(self) -> None:
        """Do nothing; override to send what `publish` buffered."""

    def rollback(self) -> None:
        """Do nothing; override to drop what `publish` buffered."""


if not TYPE_CHECKING:  # type checkers see `Base` as a class; code that uses it is warned
    __getattr__ = module_getattr(__name__, {"Base": (Base, "pybondi.publisher.BasePublisher")})
    del Base


def _not_a_message(message: object) -> TypeError:
    return TypeError(
        f"publisher.publish() takes a Message, got {type(message).__name__}: "
        f"{short_repr(message)}. Wrap the payload: publish(topic, Message(payload))."
    )


def _not_a_topic(topic: object) -> TypeError:
    return TypeError(f"A topic is a str, got {type(topic).__name__}: {short_repr(topic)}.")
