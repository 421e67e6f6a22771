"""What a broker adapter is, and the publisher that sends through one.

A `Broker` sends envelopes (`pybondi.messaging.envelope`) to a message broker and returns only
once the broker confirmed every one of them; anything less raises `PublishError`. The
outbox's relay sends through it, and so does `BrokerPublisher`, the publisher for
sessions that send straight to the broker when they commit:

    publisher = BrokerPublisher(connect("redis://localhost:6379"), registry)
    with Session(messagebus, repository, publisher) as session:
        ...                     # on commit: the repository first, then the broker

Sending straight from a session leaves a gap: a crash after the repository committed
and before the broker confirmed loses the messages. The outbox (`pybondi.messaging.outbox`) closes
it. Brokers whose client is async-only (RabbitMQ, NATS) have async-only adapters: sync
sessions reach them through the outbox.

The other way round, `Broker.subscribe` gives a `Subscription`: a consumer group's share
of some topics' messages, each received as a `Delivery` that the worker (`pybondi.messaging.worker`)
acknowledges once the message's session committed, or hands back to be retried later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self

from typing_extensions import TypeVar

from pybondi._redact import redact
from pybondi.exceptions import AsyncRequired, PublishError
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.serialization import Registry
from pybondi.publisher import BufferedPublisher, Message

__all__ = [
    "DEFAULT_GROUP",
    "Broker",
    "BrokerPublisher",
    "Delivery",
    "Subscription",
    "SubscriptionTerms",
]

S_co = TypeVar("S_co", bound="Subscription", default="Subscription", covariant=True)

DEFAULT_GROUP = "pybondi"
"""The consumer group of workers that name none. On RabbitMQ it consumes the topic's own
queue, the one the publisher declares so that nothing is lost before a consumer exists."""


@dataclass(frozen=True)
class SubscriptionTerms:
    """What `Broker.subscribe` was asked for, checked: see its arguments."""

    topics: tuple[str, ...]
    group: str
    consumer: str
    in_flight: int
    redeliver_after: float

    @classmethod
    def checked(
        cls,
        topics: Sequence[str],
        group: str,
        consumer: str,
        in_flight: int,
        redeliver_after: float,
    ) -> SubscriptionTerms:
        """The terms, or a ValueError that says which argument is wrong."""
        if isinstance(topics, str) or not topics:
            raise ValueError(f"Subscribe to a list of topics, as in ['orders'], not {topics!r}.")
        if not group or not consumer:
            raise ValueError(
                f"A group and a consumer name are needed, got {group!r}, {consumer!r}."
            )
        if in_flight < 1 or not redeliver_after > 0:
            raise ValueError(
                f"in_flight must be 1 or more and redeliver_after positive, got {in_flight!r} "
                f"and {redeliver_after!r}."
            )
        unique = tuple(dict.fromkeys(topics))  # a topic named twice is consumed once
        return cls(unique, group, consumer, in_flight, redeliver_after)


class Broker(ABC, Generic[S_co]):
    """A connection to a broker that sends envelopes and waits for its confirmation.

    Adapters connect at the first send and reconnect after a failure, so a caller that
    retries (such as the relay) needs nothing more. Envelopes of one topic reach the
    broker in the order given.
    """

    url: str

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact(self.url)}>"

    @abstractmethod
    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        """Send the envelopes in order; return once the broker confirmed each one.

        Raises `PublishError` whose `unconfirmed` holds the first envelope not confirmed
        and every one after it.
        """

    def send(self, envelopes: Sequence[Envelope]) -> None:
        """`asend` for sync code, where the client has a sync API."""
        raise AsyncRequired(
            f"{type(self).__name__}.send",
            type(self).asend,
            "`await broker.asend(...)`, or "
            "for sync sessions the outbox (pybondi.messaging.outbox.Outbox) with its async relay",
        )

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int = 16,
        redeliver_after: float = 60.0,
    ) -> S_co:
        """The share of `group` in the messages of `topics`; see `Subscription`.

        Args:
            topics: the topics to consume, as published (the adapter's `prefix` and
                naming rules apply as they do to sends).
            group: the consumer group: every group gets each message, and within a group
                each message goes to one consumer at a time. A new group starts from
                the oldest message the broker still keeps.
            consumer: this consumer's name within the group, unique per process.
            in_flight: how many deliveries this consumer holds at most, unacknowledged.
            redeliver_after: seconds after which a message held by a consumer that went
                silent (crashed, hung, disconnected) goes to another consumer.
        """
        return self._subscription(
            SubscriptionTerms.checked(topics, group, consumer, in_flight, redeliver_after)
        )

    def _subscription(self, terms: SubscriptionTerms) -> S_co:
        """The adapter's subscription on `terms`, which `subscribe` checked."""
        raise NotImplementedError(f"{type(self).__name__} cannot consume messages yet.")

    async def aclose(self) -> None:
        """Close the connection; the next send opens a new one."""

    def close(self) -> None:
        """`aclose` for brokers with a sync client."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _unconfirmed(
        self, envelopes: Sequence[Envelope], first: int, reason: str | BaseException
    ) -> PublishError:
        """The error for envelopes `first` onwards, which the broker did not confirm."""
        if isinstance(reason, BaseException):
            reason = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        topic = envelopes[first].topic if envelopes else "?"
        return PublishError(repr(self), topic, reason, list(envelopes[first:]))


class BrokerPublisher(BufferedPublisher):
    """A publisher that sends to a broker on commit, confirmed; see the module docstring.

    Messages are serialized as they are published, so a payload that cannot leave the
    process fails in the handler that published it. When the broker does not confirm
    them all, `commit()` raises `PublishError`: the unconfirmed messages stay buffered,
    to be sent again by another `commit()` or dropped by `rollback()`.
    """

    def __init__(self, broker: Broker, registry: Registry | None = None) -> None:
        super().__init__()
        self.broker = broker
        self.registry = registry

    def __repr__(self) -> str:
        return f"<BrokerPublisher to {self.broker!r}>"

    def _buffered(self, topic: str, message: Message[Any]) -> Envelope:
        return Envelope.seal(topic, message, self.registry)

    def commit(self) -> None:
        """Send the buffered messages, confirmed, through the broker's sync client."""
        buffer = self._buffer()
        if buffer:
            try:
                self.broker.send([envelope for _, envelope in buffer])
            except PublishError as error:
                _keep(buffer, error)
                raise
            buffer.clear()

    async def acommit(self) -> None:
        """Send the buffered messages, confirmed."""
        buffer = self._buffer()
        if buffer:
            try:
                await self.broker.asend([envelope for _, envelope in buffer])
            except PublishError as error:
                _keep(buffer, error)
                raise
            buffer.clear()


def _keep(buffer: Any, error: PublishError) -> None:
    """Leave only the unconfirmed envelopes in the buffer."""
    buffer.clear()
    buffer.extend((envelope.topic, envelope) for envelope in error.unconfirmed)


_SHOWN_OF_IDS = 80  # characters of a message id a delivery's repr shows, at most


class Delivery(ABC):
    """One message as a subscription received it, until it is acknowledged or retried.

    Attributes:
        envelope: the message: its topic (as published, without the adapter's prefix),
            id, headers and body. Headers the transport adds for itself (`Nats-Msg-Id`,
            `x-death`, the attempt count) are not in it. The id is the `message-id`
            header, or the broker's own id of the message when it has none.
        attempt: 1 the first time the message is delivered to this group, then one more
            after each `retry()` (and, where the broker counts them, after each
            redelivery of a message whose consumer went silent).
        problem: why the message could not be read from the broker's format (fields
            missing, headers that are not a JSON object of strings), or None. Such a
            delivery still has an envelope, with what could be read, for the dead
            letter.
        timestamp: when the broker took the message, by its own clock, where it says
            (a Redis entry id, JetStream's metadata, AMQP's timestamp); the time of a
            message whose producer sent no `timestamp` header.
    """

    __slots__ = ("attempt", "envelope", "problem", "timestamp")

    def __init__(self, envelope: Envelope, attempt: int = 1, problem: str | None = None) -> None:
        self.envelope = envelope
        self.attempt = attempt
        self.problem = problem
        self.timestamp: datetime | None = None

    def __repr__(self) -> str:
        id = self.envelope.id
        if len(id) > _SHOWN_OF_IDS:  # anyone may send a long one: keep log lines short
            id = f"{id[: _SHOWN_OF_IDS - 20]}...({len(id)} characters)"
        return f"<{type(self).__name__} {id!s} on {self.envelope.topic!r}, attempt {self.attempt}>"

    @abstractmethod
    async def ack(self) -> None:
        """Acknowledge the message: the group will not get it again."""

    async def extend(self) -> None:
        """Tell the broker the message is still being handled.

        The worker calls it while a handler runs longer than a third of
        `redeliver_after`, so that the message does not go to another consumer. Brokers
        that notice a dead consumer by its connection need nothing (RabbitMQ).
        """

    @abstractmethod
    async def retry(self, delay: float) -> None:
        """Have the group get the message again in `delay` seconds, at attempt + 1.

        Once this returns, the broker keeps the retry durably and this delivery is
        acknowledged. A crash in between may leave both: the message then comes twice,
        which the worker's inbox absorbs.
        """


class Subscription(ABC):
    """A consumer group's share of some topics' messages; see `Broker.subscribe`.

    Messages of a consumer that went silent come back to the group's other consumers
    after `redeliver_after`; retried messages come back when their delay is over.

    Attributes:
        topics, group, consumer, in_flight, redeliver_after: as subscribed.
    """

    def __init__(self, terms: SubscriptionTerms) -> None:
        self.topics = terms.topics
        self.group = terms.group
        self.consumer = terms.consumer
        self.in_flight = terms.in_flight
        self.redeliver_after = terms.redeliver_after

    @abstractmethod
    async def receive(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries, waiting at most `wait` seconds for the first one.

        Returns an empty list when nothing came in time. Raises `ConnectionError` (or
        the client's own error) when the broker cannot be reached; the next call
        connects again.

        The worker cancels a receive under way when it stops (it may be connecting to a
        broker that does not answer): a cancelled receive leaves the subscription for
        `close()`, and what it had taken comes back to the group, unacknowledged.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming and close the connection.

        Unacknowledged deliveries come back to the group: at once, or after
        `redeliver_after`, depending on the broker. A closed subscription is not used
        again (RabbitMQ's raises; Redis's and NATS's would connect anew).
        """
