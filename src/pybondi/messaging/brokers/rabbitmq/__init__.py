"""RabbitMQ: one durable topic exchange, a quorum queue per topic, publisher confirms.

    broker = RabbitMQBroker("amqp://guest:guest@localhost:5672/", exchange="pybondi")

Every envelope goes to the exchange (type `topic`, durable, named `exchange`) with its
topic as the routing key, persistent, with `message_id` = the envelope's id, its headers
as AMQP headers and content type `application/json`. The first time a connection sends
to a topic it declares the queue `prefix + topic` (durable, `x-queue-type: quorum`, so
RabbitMQ 3.8 or later), bound to the exchange with the topic as binding key, so messages
are kept even before any consumer exists; pass `declare_queues=False` when your consumers
or your operators declare the queues. A message returned because its queue was deleted
makes the next send declare it again.

Quorum queues count how often a message came back unacknowledged, which lets the worker
dead-letter a message that keeps killing its workers; classic queues do not, and were
what pybondi declared before. RabbitMQ cannot change a queue's type: where a classic
queue has the name, declaring fails (PRECONDITION_FAILED) and the send raises
`PublishError`, the subscription `ConnectionError`, saying what to do: let the workers
empty the queue and delete it, or keep it with `declare_queues=False`, uncounted.

Messages are published `mandatory`: one that no queue takes is returned by RabbitMQ and
raises `PublishError`, never vanishes. The broker's ack (a publisher confirm) is its
confirmation; a batch is published without waiting between messages, then every ack
awaited. aio-pika is async-only, so is this adapter: sync sessions reach it through the
outbox. Topics are used verbatim as binding keys, so keep `*` and `#` out of them.

Consuming (`subscribe`): the workers of a group share one durable queue per topic, as
competing consumers: the topic's own queue for `DEFAULT_GROUP`, `queue#group` for any
other group (see `RabbitMQBroker.group_queue`). Each subscription has a connection of its
own, with a prefetch of `in_flight` per queue; unacked messages go back to the queue when
that connection closes or dies (heartbeats of `redeliver_after` seconds notice a silent
one). `retry(delay)` puts a copy in a delay queue, `queue#retry#<ms>` (a classic one),
whose TTL dead-letters it back to the group's queue once the delay is over, then acks
the original. A delivery's attempt is the copy's `x-pybondi-attempt` (1 on the first
delivery) plus the times the quorum queue redelivered it (`x-delivery-count`, or
`x-acquired-count` where RabbitMQ 4.3 and later set it); see `ATTEMPT_HEADER` for what a
producer setting such headers can do. RabbitMQ 4.0 and later give quorum queues a
delivery limit (20 by default), past which they drop a message: keep the consumers'
`retry.attempts` below it, so that the worker dead-letters the message first.

RabbitMQ has no id of its own for a message: one that comes without `message_id` (and
without a `message-id` header) is put back in its queue as a copy with an id,
`amqp-<uuid>`, which its redeliveries and retries keep; see `_stamp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pybondi.exceptions import MissingDependency, short_repr
from pybondi.messaging.brokers.base import DEFAULT_GROUP, Broker, Delivery, Subscription
from pybondi.messaging.envelope import Envelope

try:
    import aio_pika
    import aio_pika.abc
    import aio_pika.exceptions
    import aiormq
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("aio-pika", "rabbitmq", "An amqp:// broker") from missing

__all__ = ["ATTEMPT_HEADER", "RabbitMQBroker", "RabbitMQDelivery", "RabbitMQSubscription"]

logger = logging.getLogger(__name__)


class RabbitMQBroker(Broker):
    """Sends envelopes to a RabbitMQ topic exchange, each confirmed by the broker's ack.

    Args:
        url: `amqp://user:password@host:port/vhost` (or `amqps://` for TLS).
        exchange: the name of the durable topic exchange to publish to.
        prefix: put before each topic to name its queue.
        declare_queues: declare and bind each topic's queue at its first send, and a
            group's queues when it subscribes; when false, a topic with no bound queue
            makes `asend` raise `PublishError`, and a subscription's queues must exist.
        timeout: seconds one `asend` may take, connecting and every ack included.
        connection_options: passed to `aio_pika.connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "pybondi",
        prefix: str = "",
        declare_queues: bool = True,
        timeout: float = 30.0,
        **connection_options: Any,
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.prefix = prefix
        self.declare_queues = declare_queues
        self.timeout = timeout
        self.connection_options = connection_options
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._declared: set[str] = set()  # topics whose queue this connection declared
        self._opening = asyncio.Lock()

    def queue(self, topic: str) -> str:
        """The name of a topic's queue."""
        return self.prefix + topic

    def group_queue(self, topic: str, group: str) -> str:
        """The queue a consumer group takes a topic's messages from.

        `DEFAULT_GROUP` consumes the topic's own queue, the one sends declare, so it gets
        every message sent since that queue exists. Any other group has a queue of its
        own, `queue(topic) + "#" + group` (no topic has a `#`, so no name is taken
        twice), declared when a subscription of the group first connects: messages sent
        before that are not in it.
        """
        queue = self.queue(topic)
        return queue if group == DEFAULT_GROUP else f"{queue}#{group}"

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int = 16,
        redeliver_after: float = 60.0,
    ) -> RabbitMQSubscription:
        """The share of `group` in the messages of `topics`; see `RabbitMQSubscription`."""
        return RabbitMQSubscription(
            self,
            topics,
            group,
            consumer=consumer,
            in_flight=in_flight,
            redeliver_after=redeliver_after,
        )

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        """Publish every envelope, then wait for all the acks; see the module docstring.

        A nack or a returned (unroutable) message raises `PublishError` from that
        envelope on. So does a timeout or a connection error, which also closes the
        connection: the next call opens a new one.
        """
        if not envelopes:
            return
        publishes: list[asyncio.Task[Any]] = []
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout):
                exchange = await self._open(envelopes)
                in_flight: set[str] = set()
                for envelope in envelopes:
                    if envelope.id in in_flight:
                        # aiormq matches a returned message to its publish by message_id,
                        # so of two in flight with one id it could confirm the returned one.
                        await asyncio.wait(publishes)
                        in_flight.clear()
                    in_flight.add(envelope.id)
                    # aiormq writes publishes in the order they take its channel lock,
                    # which is the order these tasks start: the order of `envelopes`.
                    message = self._message(envelope)
                    publish = exchange.publish(message, envelope.topic, mandatory=True)
                    publishes.append(asyncio.create_task(publish))
                await asyncio.wait(publishes)
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError, _QueueMismatch) as error:
            failure = error
        finally:
            for publish_task in publishes:
                publish_task.cancel()  # those still waiting, after a failure
        if failure is not None and publishes:
            await asyncio.wait(publishes)
        first, reason = self._first_unconfirmed(envelopes, publishes, failure)
        if first is None:
            return
        if not isinstance(reason, aio_pika.exceptions.DeliveryError):
            await self.aclose()
        reason_text = self._explain(reason, envelopes[first].topic)
        raise self._unconfirmed(envelopes, first, reason_text) from reason

    @staticmethod
    def _message(envelope: Envelope) -> aio_pika.Message:
        return aio_pika.Message(
            envelope.body,
            headers=dict(envelope.headers),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=envelope.id,
        )

    def _first_unconfirmed(
        self,
        envelopes: Sequence[Envelope],
        publishes: list[asyncio.Task[Any]],
        failure: BaseException | None,
    ) -> tuple[int | None, BaseException | None]:
        """The index of the first envelope without an ack, and why; reads every result."""
        first: int | None = None
        reason: BaseException | None = None
        for index, publish in enumerate(publishes):
            error = None if publish.cancelled() else publish.exception()
            if isinstance(error, aio_pika.exceptions.PublishError):
                # Returned: its queue is gone (deleted, expired), so declare it again.
                self._declared.discard(envelopes[index].topic)
            if first is not None:
                continue  # read the rest only so asyncio logs no unretrieved exception
            if publish.cancelled():
                first, reason = index, failure
            elif error is not None:
                first, reason = index, error
            elif not isinstance(publish.result(), aiormq.spec.Basic.Ack):
                first, reason = index, RuntimeError(f"no ack but {publish.result()!r}")
        if first is None and len(publishes) < len(envelopes):
            first, reason = len(publishes), failure
        return first, reason

    def _explain(self, reason: BaseException | None, topic: str) -> str | BaseException:
        if isinstance(reason, _QueueMismatch):
            return str(reason)
        if isinstance(reason, aio_pika.exceptions.PublishError):
            return (
                f"RabbitMQ returned it: no queue is bound to exchange {self.exchange!r} for "
                f"routing key {topic!r} (declare and bind one, or use "
                f"declare_queues=True)"
            )
        if isinstance(reason, aio_pika.exceptions.DeliveryError):
            return f"RabbitMQ refused it, as a full reject-publish queue does ({reason})"
        if isinstance(reason, TimeoutError):
            return f"timed out: no connection or no ack within {self.timeout} s"
        if reason is None or (type(reason) is Exception and not str(reason)):
            # aiormq fails the publishes still waiting on a closed channel with a bare Exception.
            return "the connection closed before RabbitMQ acked it"
        return reason

    async def _open(self, envelopes: Sequence[Envelope]) -> aio_pika.abc.AbstractExchange:
        """The exchange on an open channel, with the queue of every topic declared."""
        channel, exchange = self._channel, self._exchange
        if (
            channel is not None
            and exchange is not None
            and not channel.is_closed
            and (not self.declare_queues or all(e.topic in self._declared for e in envelopes))
        ):
            return exchange  # the common case, without taking the lock
        async with self._opening:
            if self._channel is None or self._exchange is None or self._channel.is_closed:
                await self.aclose()
                self._channel, self._exchange = await self._connect()
            channel, exchange = self._channel, self._exchange
            if self.declare_queues:
                for topic in dict.fromkeys(envelope.topic for envelope in envelopes):
                    if topic not in self._declared:
                        queue = await _declare(channel, self.queue(topic))
                        await queue.bind(exchange, routing_key=topic)
                        self._declared.add(topic)
            return exchange

    async def _connect(
        self,
    ) -> tuple[aio_pika.abc.AbstractChannel, aio_pika.abc.AbstractExchange]:
        # A plain connection, not connect_robust: this adapter already reconnects at the
        # next send after any failure, as the Broker contract asks. A robust connection
        # would add a second reconnection, in the background, that does not replay the
        # failed publishes anyway, and makes publishes wait for it during an outage.
        connection = await aio_pika.connect(
            self.url, connection_class=_Connection, **self.connection_options
        )
        try:
            # on_return_raises: without it a returned mandatory message *succeeds*,
            # aio-pika handing back the returned message in place of the ack.
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._declared = set()
        return channel, exchange

    async def aclose(self) -> None:
        """Close the connection; the next `asend` opens a new one."""
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        self._declared = set()
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except aio_pika.exceptions.CONNECTION_EXCEPTIONS as error:
                # Closing a connection that already failed: nothing is left to release.
                logger.debug("Closing %r failed: %r", self, error)


class _Connection(aio_pika.Connection):
    """A connection that closes itself when connecting fails.

    aio-pika leaves a connection that failed to connect open; when it is garbage
    collected, its `__del__` starts a close() that no event loop may be there to run.
    """

    async def connect(self, timeout: aio_pika.abc.TimeoutType = None) -> None:
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise


class _QueueMismatch(Exception):
    """A queue to declare exists already, with other arguments (a classic queue)."""


_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


async def _declare(channel: aio_pika.abc.AbstractChannel, name: str) -> aio_pika.abc.AbstractQueue:
    """Declare a topic's or a group's queue: durable and quorum, wherever it is declared.

    Sends and subscriptions both declare the topic's own queue: their declarations must
    be the same, or RabbitMQ refuses the second (PRECONDITION_FAILED) and closes the
    channel.
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=_QUORUM)
    except aio_pika.exceptions.ChannelPreconditionFailed as error:
        raise _QueueMismatch(
            f"RabbitMQ queue {name!r} exists, but not as pybondi declares it ({error}). "
            f"pybondi's queues are durable quorum queues, which count redeliveries, so "
            f"that a message that keeps killing its workers is dead-lettered; an older "
            f"pybondi declared classic ones, which RabbitMQ cannot convert. Let the "
            f"workers empty it, delete it and start again (pybondi declares it anew), "
            f"or keep it with declare_queues=False (its redeliveries then go uncounted)"
        ) from error


ATTEMPT_HEADER = "x-pybondi-attempt"
"""The AMQP header that counts a retried message's attempts; absent on the first.

Retries set it on the copy they publish. A producer may set it too: it can only make
its message reach its last attempt sooner (a value above the consumer's attempts is
dead-lettered unhandled, visibly), never skip it; a value that is not a positive integer
is a `problem`, and the message is dead-lettered.
"""

# Set by RabbitMQ on a quorum queue's message each time it comes back to the queue
# unacknowledged (3.x: any return; 4.3 and later: failed ones, x-acquired-count any).
_REDELIVERY_HEADERS = ("x-delivery-count", "x-acquired-count")
_TRANSPORT_HEADERS = ("x-death", ATTEMPT_HEADER, *_REDELIVERY_HEADERS)
_DEATH_HEADERS = ("x-first-death-", "x-last-death-")
_RETRY_QUEUE_EXPIRES = 60_000  # ms an unused delay queue outlives its TTL, then goes


def _transport_header(name: str) -> bool:
    """Whether RabbitMQ or this adapter set the header (to count, to dead-letter)."""
    return name in _TRANSPORT_HEADERS or name.startswith(_DEATH_HEADERS)


def _redeliveries(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """How often a quorum queue delivered the message before, unacknowledged.

    Only on a message RabbitMQ flags as redelivered: on a first delivery, the headers
    are the producer's (RabbitMQ 3.12 and later set none then).
    """
    if not message.redelivered:
        return 0
    counts = [(message.headers or {}).get(name) for name in _REDELIVERY_HEADERS]
    return max(
        (n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 0),
        default=0,
    )


class RabbitMQSubscription(Subscription):
    """A consumer group's share of some topics' messages, on RabbitMQ.

    Every consumer of the group consumes the same durable queue per topic
    (`RabbitMQBroker.group_queue`), which RabbitMQ shares out between them. The first
    `receive` connects (a connection of the subscription's own), declares and binds those
    queues (unless the broker has `declare_queues=False`) and starts consuming; after
    the connection is lost, `receive` raises `ConnectionError` once and the next call
    connects again.

    `in_flight` is RabbitMQ's prefetch (`basic.qos`), which counts per consumer: one per
    topic, so a subscription to n topics holds up to n * `in_flight` messages. (A
    per-channel prefetch would bound the sum, but RabbitMQ deprecates it.)

    Unacknowledged messages go back to the queue when the connection closes: at once if
    the process ends, after about `redeliver_after` seconds if it went silent, since that
    is the heartbeat timeout the connection asks for (unless the URL or the connection
    options name one). A consumer whose event loop runs but never acks (a handler stuck
    on an await) keeps its messages until RabbitMQ's `consumer_timeout` (30 minutes by
    default; a server setting) closes its channel. Each such redelivery counts as an
    attempt, as the quorum queue counts it (not on a classic queue consumed with
    `declare_queues=False`).
    """

    def __init__(
        self,
        broker: RabbitMQBroker,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int = 16,
        redeliver_after: float = 60.0,
    ) -> None:
        if not topics:
            raise ValueError("Subscribe to at least one topic.")
        if any("*" in topic or "#" in topic for topic in topics):
            # As binding keys they would be patterns, whose messages have other topics.
            raise ValueError(f"Subscribe to topics, not patterns: {list(topics)!r}.")
        if not group or "#" in group:
            # A `#` could make a group's queue the name of another group's delay queue.
            raise ValueError(f"Invalid consumer group {group!r}: name it without '#'.")
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight!r}.")
        self.broker = broker
        self.group = group
        self.consumer = consumer
        self.in_flight = in_flight
        self.redeliver_after = redeliver_after
        self.queues = {broker.group_queue(topic, group): topic for topic in topics}
        """The queue consumed for each topic: {queue name: topic}."""
        self._link: _Link | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.group}/{self.consumer} on {self.broker!r}>"

    async def receive(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries, waiting at most `wait` seconds for the first one.

        Raises `ConnectionError` (or aio-pika's error) when RabbitMQ cannot be reached or
        the connection was lost; deliveries received before can then no longer be acked,
        and their messages come back. The next call connects again. After `close()`,
        raises `RuntimeError`.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed.")
        link = self._link or await self._connect()
        items: list[tuple[str, aio_pika.abc.AbstractIncomingMessage] | None] = []
        if limit > 0 and link.incoming.empty() and link.lost is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    items.append(await link.incoming.get())
        while len(items) < limit and not link.incoming.empty():
            items.append(link.incoming.get_nowait())
        if link.lost is not None:
            await self._disconnect()
            raise ConnectionError(
                f"{self!r} lost its connection to RabbitMQ ({link.lost}); the next receive "
                f"connects again, and the messages not acked come back."
            ) from link.lost
        deliveries: list[Delivery] = []
        for item in items:
            if item is None:
                continue
            queue, message = item
            if _without_id(message) and await self._stamp(link, queue, message):
                continue  # it comes again as the copy, which has an id
            deliveries.append(self._delivery(link, queue, message))
        return deliveries

    async def close(self) -> None:
        """Cancel the consumers and close the connection; unacked messages go back at once."""
        self._closed = True
        link = self._link
        if link is not None and link.lost is None:
            # Cancelled first, so that no new message arrives while the channel closes.
            with contextlib.suppress(TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS):
                async with asyncio.timeout(self.broker.timeout):
                    for queue, tag in link.consumers:
                        await queue.cancel(tag)
        await self._disconnect()

    def _delivery(
        self, link: _Link, queue: str, message: aio_pika.abc.AbstractIncomingMessage
    ) -> RabbitMQDelivery:
        """The delivery of a message consumed from `queue`, read as an envelope."""
        topic = self.queues[queue]  # not the routing key: a retried message has the queue's
        headers: dict[str, str] = {}
        problems: list[str] = []
        attempt = 1
        for name, value in (message.headers or {}).items():
            if name == ATTEMPT_HEADER:
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    attempt = value
                else:
                    problems.append(f"header {name} is {short_repr(value)}, not an attempt")
            elif not _transport_header(name):
                text = _text(value)
                if text is None:
                    problems.append(f"header {name} is {short_repr(value)}, not text")
                else:
                    headers[name] = text
        attempt += _redeliveries(message)
        # Only when `_stamp` failed: an id for this delivery alone.
        message_id = headers.get("message-id") or message.message_id or f"amqp-{uuid.uuid4()}"
        problem = None
        if problems:
            problem = (
                f"Message {message_id} from RabbitMQ queue {queue!r} cannot be read: "
                f"{'; '.join(problems)}."
            )
        envelope = Envelope(topic, message_id, headers, message.body)
        delivery = RabbitMQDelivery(
            self, link, queue, message, envelope, attempt=attempt, problem=problem
        )
        delivery.timestamp = message.timestamp  # the producer's AMQP property (UTC)
        return delivery

    async def _stamp(
        self, link: _Link, queue: str, message: aio_pika.abc.AbstractIncomingMessage
    ) -> bool:
        """Put a copy of a message without id, with an id, in its queue; ack the original.

        RabbitMQ has no ids of its own for messages: an id made up at each delivery would
        change when the message comes again after its worker died, and the worker's inbox
        could not tell that it handled it already. A hash of the message instead would
        make two equal messages one, and the second would be skipped. The copy keeps the
        id for good. It goes to the back of the queue. Should a crash come between
        the copy and the ack, the original comes again and gets a copy of its own.

        Returns False when the copy could not be published: the message is then
        delivered with an id for this delivery alone.
        """
        copy = _copy(message, f"amqp-{uuid.uuid4()}")
        try:
            async with asyncio.timeout(self.broker.timeout):
                channel = await link.publisher()
                # mandatory: should the queue be gone, the publish raises.
                await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as error:
            logger.warning(
                "%r could not give message %s of queue %r an id: %r",
                self, short_repr(message.body), queue, error,
            )  # fmt: skip
            return False
        with contextlib.suppress(aiormq.exceptions.ChannelInvalidStateError):
            await message.ack()  # if lost, the original comes again, and is copied again
        return True

    async def _connect(self) -> _Link:
        broker = self.broker
        options = dict(broker.connection_options)
        url_options = parse_qs(urlsplit(broker.url).query)
        if "heartbeat" not in options and "heartbeat" not in url_options:
            # RabbitMQ closes a connection that missed its heartbeats for this long, which
            # sends the unacked messages of a silent consumer back to the queue.
            options["heartbeat"] = max(1, math.ceil(self.redeliver_after))
        if "name" not in options and "name" not in url_options:
            options["name"] = f"pybondi {self.group}/{self.consumer}"  # shown by RabbitMQ
        try:
            async with asyncio.timeout(broker.timeout):
                connection = await aio_pika.connect(
                    broker.url, connection_class=_Connection, **options
                )
                link = _Link(connection)
                try:
                    await link.consume(self)
                except BaseException:
                    await connection.close()
                    raise
        except TimeoutError as error:
            raise ConnectionError(
                f"{self!r} could not connect and consume within {broker.timeout} s."
            ) from error
        except _QueueMismatch as error:
            raise ConnectionError(f"{self!r} cannot consume: {error}.") from error
        self._link = link
        return link

    async def _disconnect(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        link.lose(ConnectionError("the subscription disconnected"))
        if not link.connection.is_closed:
            try:
                await link.connection.close()
            except aio_pika.exceptions.CONNECTION_EXCEPTIONS as error:
                logger.debug("Closing %r failed: %r", self, error)


class RabbitMQDelivery(Delivery):
    """A message consumed from a group's queue; see `Delivery` and the module docstring.

    `ack()` and `retry()` raise `ConnectionError` once the subscription lost (or closed)
    the connection it came on: RabbitMQ puts the message back in the queue then, to be
    received again. An ack is not confirmed by RabbitMQ: one lost with the connection
    also brings the message back, which the worker's inbox absorbs.
    """

    __slots__ = ("_link", "_message", "_queue", "_subscription")

    def __init__(
        self,
        subscription: RabbitMQSubscription,
        link: _Link,
        queue: str,
        message: aio_pika.abc.AbstractIncomingMessage,
        envelope: Envelope,
        *,
        attempt: int = 1,
        problem: str | None = None,
    ) -> None:
        super().__init__(envelope, attempt, problem)
        self._subscription = subscription
        self._link = link
        self._queue = queue
        self._message = message

    async def ack(self) -> None:
        """Acknowledge the message: its queue drops it."""
        self._check_link()
        try:
            await self._message.ack()
        except aiormq.exceptions.ChannelInvalidStateError as error:
            raise self._lost() from error

    async def retry(self, delay: float) -> None:
        """Publish a copy to the delay queue of `delay` (confirmed), then ack this one.

        The delay queue, `<queue>#retry#<milliseconds>`, holds the copy for `delay` (its
        message TTL), then dead-letters it to the default exchange with the group's queue
        as routing key: back to this group only, with attempt + 1. It is declared at each
        retry, which keeps it for a minute more than the delay; unused, it goes.
        """
        self._check_link()
        ms = max(0, round(delay * 1000))
        delay_queue = f"{self._queue}#retry#{ms}"
        arguments: dict[str, Any] = {
            "x-message-ttl": ms,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self._queue,
            "x-expires": ms + _RETRY_QUEUE_EXPIRES,
        }
        async with asyncio.timeout(self._subscription.broker.timeout):
            channel = await self._link.publisher()
            await channel.declare_queue(delay_queue, durable=True, arguments=arguments)
            message = self._message
            copy = _copy(message, message.message_id or self.envelope.id, self.attempt + 1)
            # mandatory: should the delay queue vanish in between, the publish raises.
            await channel.default_exchange.publish(copy, routing_key=delay_queue, mandatory=True)
        await self.ack()

    def _check_link(self) -> None:
        if self._link.lost is not None:
            raise self._lost()

    def _lost(self) -> ConnectionError:
        return ConnectionError(
            f"Cannot settle {self!r}: {self._subscription!r} lost the connection it came "
            f"on, so RabbitMQ delivers the message again."
        )


class _Link:
    """One connection of a subscription: its consumers, and what they received."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection
        # (queue, message) as consumed; None wakes a waiting receive when the link is lost.
        self.incoming: asyncio.Queue[tuple[str, aio_pika.abc.AbstractIncomingMessage] | None]
        self.incoming = asyncio.Queue()
        self.consumers: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self.lost: BaseException | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None
        self._opening = asyncio.Lock()

    async def consume(self, subscription: RabbitMQSubscription) -> None:
        """Declare and bind the subscription's queues, and consume them."""
        broker = subscription.broker
        channel = await self.connection.channel(publisher_confirms=False)
        channel.close_callbacks.add(self._closed)
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._cancelled)
        await channel.set_qos(prefetch_count=subscription.in_flight)
        exchange = None
        if broker.declare_queues:
            exchange = await channel.declare_exchange(
                broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        for name, topic in subscription.queues.items():
            if exchange is not None:
                queue = await _declare(channel, name)
                await queue.bind(exchange, routing_key=topic)
            else:
                queue = await channel.get_queue(name)  # passive: it must exist
            tag = await queue.consume(functools.partial(self._put, name))
            self.consumers.append((queue, tag))

    async def publisher(self) -> aio_pika.abc.AbstractChannel:
        """A channel with publisher confirms, for retries.

        A channel of its own: an error there (such as a clashing declaration) closes it,
        not the channel whose deliveries are waiting for their acks.
        """
        async with self._opening:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return self._publisher

    def lose(self, reason: BaseException) -> None:
        """Mark the link lost, once, and wake a receive waiting on it."""
        if self.lost is None:
            self.lost = reason
            self.incoming.put_nowait(None)

    async def _put(self, queue: str, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.incoming.put_nowait((queue, message))

    def _closed(
        self, channel: aio_pika.abc.AbstractChannel | None, reason: BaseException | None
    ) -> None:
        self.lose(reason or ConnectionError("the channel closed"))

    def _cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        # RabbitMQ cancels a consumer whose queue was deleted: connect and declare again.
        self.lose(ConnectionError(f"RabbitMQ cancelled consumer {frame.consumer_tag}"))


def _without_id(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """Whether the message has no id: no AMQP message_id, no `message-id` header."""
    return not message.message_id and not _text((message.headers or {}).get("message-id"))


def _copy(
    message: aio_pika.abc.AbstractIncomingMessage, message_id: str, attempt: int | None = None
) -> aio_pika.Message:
    """The message as sent, with `message_id`, persistent, and `attempt` if given.

    Without `attempt`, its attempt header stays as it was; the other headers RabbitMQ or
    this adapter set are left out.
    """
    headers = {
        name: _encodable(value)
        for name, value in (message.headers or {}).items()
        if not _transport_header(name) or (name == ATTEMPT_HEADER and attempt is None)
    }
    if attempt is not None:
        headers[ATTEMPT_HEADER] = attempt
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def _text(value: object) -> str | None:
    """A header value as text: UTF-8 bytes decoded, numbers written out; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return None


def _encodable(value: Any) -> Any:
    """A header value as pamqp can write it, for a retried copy.

    pamqp reads a string that is not UTF-8 as `bytes`, but writes only `bytearray`.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value
