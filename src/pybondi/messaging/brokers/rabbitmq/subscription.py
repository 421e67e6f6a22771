"""Consuming from RabbitMQ: a consumer group's subscription, its connection, its deliveries.

`RabbitMQBroker.subscribe` makes a `RabbitMQSubscription`; see the package docstring for
the queues a group consumes, retries through delay queues and attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq

from pybondi.exceptions import short_repr
from pybondi.messaging.brokers.base import Delivery, Subscription, SubscriptionTerms
from pybondi.messaging.brokers.rabbitmq.headers import (
    ATTEMPT_HEADER,
    copy_message,
    header_text,
    is_transport_header,
    redeliveries,
    without_id,
)
from pybondi.messaging.brokers.rabbitmq.queues import (
    QueueMismatch,
    SelfClosingConnection,
    declare_queue,
)
from pybondi.messaging.envelope import Envelope

if TYPE_CHECKING:
    from pybondi.messaging.brokers.rabbitmq import RabbitMQBroker

__all__ = ["RabbitMQDelivery", "RabbitMQSubscription"]

logger = logging.getLogger(__name__)

_RETRY_QUEUE_EXPIRES = 60_000  # ms an unused delay queue outlives its TTL, then goes


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

    def __init__(self, broker: RabbitMQBroker, terms: SubscriptionTerms) -> None:
        if any("*" in topic or "#" in topic for topic in terms.topics):
            # As binding keys they would be patterns, whose messages have other topics.
            raise ValueError(f"Subscribe to topics, not patterns: {list(terms.topics)!r}.")
        if "#" in terms.group:
            # A `#` could make a group's queue the name of another group's delay queue.
            raise ValueError(f"Invalid consumer group {terms.group!r}: name it without '#'.")
        super().__init__(terms)
        self.broker = broker
        self.queues = {broker.group_queue(topic, self.group): topic for topic in self.topics}
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
            if without_id(message) and await self._stamp(link, queue, message):
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
            elif not is_transport_header(name):
                text = header_text(value)
                if text is None:
                    problems.append(f"header {name} is {short_repr(value)}, not text")
                else:
                    headers[name] = text
        attempt += redeliveries(message)
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
        copy = copy_message(message, f"amqp-{uuid.uuid4()}")
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
                    broker.url, connection_class=SelfClosingConnection, **options
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
        except QueueMismatch as error:
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
    """A message consumed from a group's queue; see `Delivery` and the package docstring.

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
            copy = copy_message(message, message.message_id or self.envelope.id, self.attempt + 1)
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
                queue = await declare_queue(channel, name)
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
