"""What a worker consumes from a broker, and how it handles each message.

    consumer = Consumer(bus, registry, group="billing",
                        repository=lambda store: StateRepository(store, Account, registry))

    consumer.dispatch("bank.commands")      # commands and events: to the messagebus

    @consumer.subscribe("bank.deposits")    # any payload: to the subscriber
    def credit(message: Message[Deposited], session: Session = Depends(current_session)):
        session.repository.get(message.payload.account).credit(message.payload.amount)

Run it with `pybondi worker myapp.module:consumer --broker ... --store ...` (or
`Worker(consumer, broker, store)` from Python). Each message is handled in a `Session`
of its own over `messagebus`, a repository from `repository(store)`, and an outbox on the
store (`pybondi.messaging.outbox`): what the handlers change and publish commits in one database
transaction, together with the message's id in the inbox. See `pybondi.messaging.worker` for
acknowledgements, retries and dead letters.

Subscribers receive the `Message` (its payload, id, headers), as subscribers of the
in-memory `Publisher` do, and their `Depends(...)` parameters, overridable through
`consumer.dependency_overrides`. `current_session()` (`pybondi.current_session`) is the
session of the message being handled: its `repository`, and its `publisher` to publish
through the outbox.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

from pybondi.current import current_session
from pybondi.depends import DependencyOverrides
from pybondi.exceptions import InvalidHandler, short_repr
from pybondi.messagebus import Messagebus
from pybondi.messaging.backoff import backoff
from pybondi.messaging.brokers.base import DEFAULT_GROUP
from pybondi.persistence.serialization import Registry
from pybondi.publisher import Message, Publisher

if TYPE_CHECKING:
    from pybondi.persistence.store import MessagingStore
    from pybondi.repository import Repository

__all__ = ["Binding", "Consumer", "PayloadType", "Retry", "current_session"]

F = TypeVar("F", bound=Callable[..., Any])


PayloadType: TypeAlias = type | Callable[[Any], type]
"""A payload's type, or a function of the parsed body that says which it is."""


@dataclass(frozen=True)
class Binding:
    """How to read a topic whose producers do not speak pybondi; see `Consumer.subscribe`.

    Attributes:
        payload: the type the body of a message without `message-type` is built into,
            or a function of the parsed body that returns it.
        id_header: the header that holds the message's id.
    """

    payload: PayloadType | None = None
    id_header: str | None = None


@dataclass(frozen=True)
class Retry:
    """How often a failing message is tried, and how long it waits in between.

    Attempt n that fails waits `delay * factor ** (n - 1)` seconds, at most `max_delay`,
    before attempt n + 1; after `attempts` attempts the message is dead-lettered.
    """

    attempts: int = 5
    delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.delay < 0 or self.factor < 1 or self.max_delay < 0:
            raise ValueError(
                f"{self!r}: attempts must be at least 1, delay and max_delay at least 0, "
                f"factor at least 1."
            )

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` (1, 2, ...) failed."""
        return backoff(attempt, first=self.delay, longest=self.max_delay, factor=self.factor)


class Consumer:
    """The topics a worker consumes, and what it does with each message.

    Args:
        messagebus: the bus that `dispatch`ed topics' commands and events go to, in each
            message's session; a new, empty one if omitted.
        registry: the registry of the payload types that arrive (plain JSON needs none).
        group: the consumer group. Workers of one group share the messages (each is
            handled by one of them); each group gets every message.
        repository: builds each session's repository on the worker's store; it must be a
            store repository on that store (`StateRepository(store, ...)`, ...), whose
            transaction the inbox joins. Without it, sessions keep no aggregates.
        retry: how often a failing message is tried, and the delays in between.
        in_flight: how many messages a worker handles at once.
        key: orders messages: those with the same key (an aggregate id, say) are handled
            one after the other, in the order received, within a worker (a key of None
            orders nothing).
        timeout: seconds one handling of a message may take, on an async store; past
            that its session is cancelled and rolled back, and the attempt failed.
            Sync handlers (a sync store) cannot be interrupted, and have none.
    """

    def __init__(
        self,
        messagebus: Messagebus | None = None,
        registry: Registry | None = None,
        *,
        group: str = DEFAULT_GROUP,
        repository: Callable[[MessagingStore], Repository[Any]] | None = None,
        retry: Retry | None = None,
        in_flight: int = 16,
        key: Callable[[Message[Any]], Hashable] | None = None,
        timeout: float | None = None,
    ) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}.")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be above 0 (or None), got {timeout}.")
        if not group or not isinstance(group, str):
            raise ValueError(f"group must be a non-empty str, got {short_repr(group)}.")
        self.messagebus = messagebus if messagebus is not None else Messagebus()
        self.registry = registry
        self.group = group
        self.repository = repository
        self.retry = retry or Retry()
        self.in_flight = in_flight
        self.key = key
        self.timeout = timeout
        self.dispatched: set[str] = set()
        self.bindings: dict[str, Binding] = {}
        """The format of topics whose producers do not speak pybondi (see `subscribe`)."""
        # The subscribers are those of an in-memory publisher: same signature, same
        # dependency plans, same overrides.
        self._subscribers = Publisher()

    def __repr__(self) -> str:
        return f"<Consumer {self.group!r} of {', '.join(self.topics) or 'no topic'}>"

    @property
    def topics(self) -> list[str]:
        """Every topic consumed, in a stable order."""
        return sorted(self.dispatched | self._subscribers.subscribers.keys())

    @property
    def dependency_overrides(self) -> DependencyOverrides:
        """The subscribers' dependency overrides (the messagebus has its own)."""
        return self._subscribers.dependency_overrides

    def dispatch(
        self, *topics: str, payload: PayloadType | None = None, id_header: str | None = None
    ) -> None:
        """Dispatch the commands and events that arrive on `topics` to the messagebus.

        `payload` and `id_header` are for producers that do not speak pybondi; see
        `subscribe`.
        """
        _check_topics("dispatch", topics)
        clash = self._subscribers.subscribers.keys() & set(topics)
        if clash:
            raise InvalidHandler(_both(clash))
        self._bind(topics, payload, id_header)
        self.dispatched.update(topics)

    @overload
    def subscribe(
        self, *topics: str, payload: PayloadType | None = None, id_header: str | None = None
    ) -> Callable[[F], F]: ...
    @overload
    def subscribe(self, topic: str, subscriber: F, /) -> F: ...

    def subscribe(
        self, *topics: Any, payload: PayloadType | None = None, id_header: str | None = None
    ) -> Any:
        """Register the decorated function as a subscriber of these topics.

        It receives the `Message` and its `Depends(...)` parameters; several subscribers
        of a topic run in the order registered, in the message's one session.

        For producers that do not speak pybondi (plain JSON, no `message-type` header):
        `payload` is the registered type their body is built into, or a function of the
        body (the parsed JSON) that returns it; without it, such a body arrives as plain
        JSON. `id_header` names the header that holds their message ids; without it,
        the id is `message-id`, or else the broker's own id of the message.
        """
        if topics and callable(topics[-1]) and not isinstance(topics[-1], str):
            return self._subscribe(topics[:-1], topics[-1], payload, id_header)
        return lambda function: self._subscribe(topics, function, payload, id_header)

    def _subscribe(
        self,
        topics: tuple[Any, ...],
        function: F,
        payload: PayloadType | None,
        id_header: str | None,
    ) -> F:
        _check_topics("subscribe", topics)
        if clash := self.dispatched & set(topics):
            raise InvalidHandler(_both(clash))
        self._bind(topics, payload, id_header)
        self._subscribers.subscribe(*topics)(function)
        return function

    def _bind(
        self, topics: tuple[str, ...], payload: PayloadType | None, id_header: str | None
    ) -> None:
        if payload is None and id_header is None:
            return
        if payload is not None and not callable(payload):
            raise InvalidHandler(
                f"payload= takes a registered type, or a function of the message's body "
                f"that returns one, got {short_repr(payload)}."
            )
        if id_header is not None and not (isinstance(id_header, str) and id_header):
            raise InvalidHandler(f"id_header= takes a header name, got {short_repr(id_header)}.")
        binding = Binding(payload, id_header)
        for topic in topics:
            if self.bindings.setdefault(topic, binding) != binding:
                raise InvalidHandler(
                    f"Topic {topic!r} is bound to {self.bindings[topic]} already; a topic's "
                    f"messages have one format: bind it once."
                )

    def routes(self, topic: str) -> tuple[tuple[Callable[[Any], Any], ...], tuple[str, ...]]:
        """The subscribers of `topic` as sync invokers, and their names."""
        return self._subscribers._route(topic)

    def aroutes(
        self, topic: str
    ) -> tuple[tuple[tuple[Callable[[Any], Any], bool], ...], tuple[str, ...]]:
        """The subscribers of `topic` as `(invoke, awaited)` pairs, and their names."""
        return self._subscribers._aroute(topic)


def _check_topics(method: str, topics: tuple[Any, ...]) -> None:
    if not topics or not all(isinstance(topic, str) and topic for topic in topics):
        raise InvalidHandler(
            f"consumer.{method}() takes one or more topic names (str), got "
            f"{short_repr(topics)}, as in consumer.{method}('bank.deposits')."
        )


def _both(topics: set[str]) -> str:
    return (
        f"Topics {sorted(topics)} would be both dispatched to the messagebus and given to "
        f"subscribers: choose one per topic (a subscriber may dispatch through its session)."
    )
