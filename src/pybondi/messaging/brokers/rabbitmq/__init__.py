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
`amqp-<uuid>`, which its redeliveries and retries keep; see `RabbitMQSubscription._stamp`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from pybondi.exceptions import MissingDependency
from pybondi.messaging.brokers.base import DEFAULT_GROUP, Broker, SubscriptionTerms
from pybondi.messaging.envelope import Envelope

try:
    import aio_pika
    import aio_pika.abc
    import aio_pika.exceptions
    import aiormq
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("aio-pika", "rabbitmq", "An amqp:// broker") from missing

# After the client's import: without it, the line above names the extra to install.
from pybondi.messaging.brokers.rabbitmq.headers import ATTEMPT_HEADER
from pybondi.messaging.brokers.rabbitmq.queues import (
    QueueMismatch,
    SelfClosingConnection,
    declare_queue,
)
from pybondi.messaging.brokers.rabbitmq.subscription import (
    RabbitMQDelivery,
    RabbitMQSubscription,
)

__all__ = ["ATTEMPT_HEADER", "RabbitMQBroker", "RabbitMQDelivery", "RabbitMQSubscription"]

logger = logging.getLogger(__name__)


class RabbitMQBroker(Broker[RabbitMQSubscription]):
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

    def _subscription(self, terms: SubscriptionTerms) -> RabbitMQSubscription:
        return RabbitMQSubscription(self, terms)

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
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS, TimeoutError, QueueMismatch) as error:
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
        if isinstance(reason, QueueMismatch):
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
                        queue = await declare_queue(channel, self.queue(topic))
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
            self.url, connection_class=SelfClosingConnection, **self.connection_options
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
