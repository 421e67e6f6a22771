"""Consuming from JetStream: a consumer group's subscription, and its deliveries.

`NATSBroker.subscribe` makes a `NATSSubscription`; see the package docstring for the
group's durable consumers, retries and ids.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header

from pybondi.messaging.brokers.base import Delivery, Subscription, SubscriptionTerms
from pybondi.messaging.brokers.nats.connection import Link, close_connection
from pybondi.messaging.brokers.nats.pull import Pull, status_of
from pybondi.messaging.brokers.nats.streams import (
    NOT_IN_STREAM_NAMES,
    ConsumerGone,
    NoStream,
    StreamConflict,
    durable_name,
)
from pybondi.messaging.envelope import Envelope

if TYPE_CHECKING:
    from pybondi.messaging.brokers.nats import NATSBroker

__all__ = ["NATSDelivery", "NATSSubscription"]

_MAX_ACK_PENDING = 10_000
"""How many messages a group's consumer hands out unacknowledged, at least.

They are those the group's workers hold (`in_flight` each), plus those retried and
waiting for their delay, which JetStream counts too: with too low a cap, a burst of
retries would stop new messages for every worker. 10,000 is 625 workers of 16; once
reached, the consumer hands out only the retries until some are acknowledged.
"""

_CHECK_AFTER = 10.0
"""Seconds after which a consumer that brought nothing is checked to still exist."""


class NATSSubscription(Subscription):
    """A consumer group's share of some topics, pulled from JetStream durable consumers.

    Made by `NATSBroker.subscribe`; see the package docstring. One task receives at a
    time; deliveries may be acknowledged or retried from any task. It connects at its
    first `receive`, on a connection of its own made with the broker's options (named
    `{group}/{consumer}` unless they name it), and declares the topics' streams and the
    group's consumers on them.

    Attributes:
        consumers: the durable consumer of each topic, as (stream, name), once bound.
    """

    def __init__(self, broker: NATSBroker, terms: SubscriptionTerms) -> None:
        if not NOT_IN_STREAM_NAMES.sub("", terms.group):
            raise ValueError(  # JetStream names take none of these characters
                f"A consumer group needs a name with more than '.', '*', '>', '/', '\\' and "
                f"white space in it, not {terms.group!r}."
            )
        super().__init__(terms)
        self.broker = broker
        self.consumers: dict[str, tuple[str, str]] = {}
        self._link: Link | None = None
        self._pulls: list[Pull] = []
        self._ready: deque[tuple[Link, Msg]] = deque()  # fetched, not yet returned
        self._turn = 0  # rotates which topics get the odd messages of a limit

    def __repr__(self) -> str:
        return (
            f"<NATSSubscription {self.group!r} ({self.consumer}) to "
            f"{', '.join(self.topics)} on {self.broker!r}>"
        )

    async def receive(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries, waiting at most `wait` seconds for the first one.

        Each topic's consumer has one fetch at a time, the limit dealt out among them. A
        fetch still waiting when this returns goes on (what it asked for counts against
        the next limit), and what it brings comes with a later call: a quiet topic does
        not hold up the others. A topic that brought nothing last time asks for one
        message while others are busy.

        Raises `ConnectionError` when the broker cannot be reached or refuses the
        streams or consumers; the next call connects and binds again.
        """
        limit = min(limit, self.in_flight)  # the contract: never more than in flight
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            await self._bind()
            await self._collect()
            while not self._ready and limit > 0:
                fetching = self._fetch(limit, deadline - loop.time())
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(fetching, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                await self._collect()
        except (nats.errors.Error, OSError, StreamConflict, NoStream, ConsumerGone) as error:
            await self._drop()
            reason = self.broker._no_connection(error)
            raise ConnectionError(f"{self!r}: {_reason(reason)}") from error
        ready = self._ready
        return [_delivery(*ready.popleft()) for _ in range(min(limit, len(ready)))]

    async def close(self) -> None:
        """Stop consuming and close the connection; the group's consumers stay.

        Messages fetched but not yet received go back at once; deliveries not
        acknowledged come back to the group after `redeliver_after`. A later `receive`
        connects again.
        """
        await self._drop()

    async def _bind(self) -> None:
        """Bind the topics' consumers on an open connection: connect first if need be."""
        link = self._link
        if link is not None and link.is_open:
            return
        await self._drop()
        link = await self.broker._open(name=f"{self.group}/{self.consumer}")
        try:
            pulls = [await self._pull(link, topic) for topic in self.topics]
        except BaseException:
            await close_connection(link.connection)
            raise
        self._link, self._pulls = link, pulls

    async def _pull(self, link: Link, topic: str) -> Pull:
        """Make sure the topic's stream and the group's consumer exist; bind to it."""
        jetstream, broker = link.jetstream, self.broker
        if broker.declare_streams:
            stream = await broker._declare(jetstream, topic)
        else:
            try:
                stream = await jetstream.find_stream_name_by_subject(topic)
            except nats.js.errors.NotFoundError as error:
                raise NoStream(
                    f"no JetStream stream keeps the subject {topic!r}; create one, or let "
                    f"the broker create it (declare_streams=True)"
                ) from error
        name = self.group
        if stream != broker.stream_name(topic):
            # Someone else's stream may keep several topics that the group consumes:
            # each needs a consumer of its own there, with its own filter.
            name += "_" + topic
        durable = durable_name(name)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=topic,
            deliver_policy=DeliverPolicy.ALL,  # a new group starts from the oldest message
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.redeliver_after,
            max_deliver=-1,  # the worker counts the attempts and dead-letters
            max_ack_pending=max(_MAX_ACK_PENDING, self.in_flight),
        )
        # Creates the consumer, or updates it to this config: the last worker to start
        # sets `redeliver_after` for the whole group.
        await jetstream.add_consumer(stream, config)
        self.consumers[topic] = (stream, durable)
        inbox = await link.connection.subscribe(link.connection.new_inbox())
        return Pull(topic, stream, durable, link, inbox)

    def _fetch(self, limit: int, wait: float) -> list[asyncio.Task[list[Msg]]]:
        """Start a fetch on each consumer that has none, within `limit`; return them all."""
        idle = [pull for pull in self._pulls if pull.fetching is None]
        free = limit - sum(pull.asked for pull in self._pulls if pull.fetching is not None)
        if free > 0 and idle:
            self._deal(idle, free, wait)
        return [pull.fetching for pull in self._pulls if pull.fetching is not None]

    def _deal(self, idle: list[Pull], free: int, wait: float) -> None:
        """Deal `free` messages out to the consumers with no fetch, and start theirs."""
        turn = self._turn % len(idle)
        self._turn += 1
        idle = idle[turn:] + idle[:turn]
        # A quiet topic's fetch may wait the whole `wait`, keeping what it asked for from
        # the busy ones: it asks for one message, unless no topic is busy.
        busy = not all(pull.quiet for pull in self._pulls)
        batches = dict.fromkeys(idle, 0)
        while free > 0:
            takers = [pull for pull in idle if not (busy and pull.quiet and batches[pull])]
            if not takers:
                break
            for pull in takers[:free]:
                batches[pull] += 1
            free -= min(free, len(takers))
        timeout = max(wait, 0.01)  # nats-py refuses a fetch without time to wait
        for pull, batch in batches.items():
            if batch:
                pull.asked = batch
                pull.fetching = asyncio.create_task(pull.fetch(batch, timeout))

    async def _collect(self) -> None:
        """Keep what the finished fetches brought; raise the first fetch's failure."""
        link = self._link
        assert link is not None
        now = asyncio.get_running_loop().time()
        failure: Exception | None = None
        unsure: list[Pull] = []
        for pull in self._pulls:
            task = pull.fetching
            if task is None or not task.done():
                continue
            pull.fetching = None
            try:
                messages = task.result()
            except TimeoutError:  # nothing came (nats-py's TimeoutError is one too)
                messages = []
            except Exception as error:
                failure = failure or error
                continue
            pull.quiet = not messages
            self._ready.extend((link, message) for message in messages)
            if pull.quiet and now >= pull.checked + _CHECK_AFTER:
                unsure.append(pull)
        if failure is not None:
            raise failure
        for pull in unsure:
            # Deleting a stream deletes its consumers, and fetching from a consumer that
            # is gone just times out: a check now and then raises NotFoundError, and the
            # next receive declares the stream and the consumer again.
            try:
                await link.jetstream.consumer_info(pull.stream, pull.durable)
            except nats.js.errors.NotFoundError as error:
                raise ConsumerGone(
                    f"consumer {pull.durable!r} of {pull.topic!r} on stream {pull.stream!r} "
                    f"is gone ({error.description}); the next receive declares it again"
                ) from error
            pull.checked = now

    async def _drop(self) -> None:
        """Stop the fetches and close the connection; give back what was not received."""
        link, self._link = self._link, None
        pulls, self._pulls = self._pulls, []
        ready, self._ready = self._ready, deque()
        fetching = [pull.fetching for pull in pulls if pull.fetching is not None]
        for task in fetching:
            task.cancel()
        if fetching:
            await asyncio.wait(fetching)
            for task in fetching:
                if not task.cancelled():
                    task.exception()  # retrieved, so that asyncio does not log it as lost
        if link is None:
            return
        if link.is_open:
            for _, message in ready:
                try:
                    await message.nak()  # back to the group now, not after ack_wait
                except (nats.errors.Error, OSError):
                    break  # the connection is going: they come back after ack_wait
        # Closing the connection ends its subscriptions, and the server forgets their
        # pending fetches; the durable consumers stay, for the group.
        await close_connection(link.connection)


class NATSDelivery(Delivery):
    """A message a JetStream consumer delivered; see `Delivery`.

    The attempt is JetStream's count of deliveries of the message to the group's
    consumer: it grows after a retry, and after `redeliver_after` with no answer.
    """

    __slots__ = ("_link", "_message")

    def __init__(
        self, envelope: Envelope, attempt: int, problem: str | None, link: Link, message: Msg
    ) -> None:
        super().__init__(envelope, attempt, problem)
        self._link = link
        self._message = message

    async def ack(self) -> None:
        """Acknowledge the message, without waiting for the server's answer.

        An ack lost on the way (the connection dropped) brings the message again after
        `redeliver_after`, which the worker's inbox absorbs; waiting for every answer
        would cost a round trip per message.
        """
        try:
            await self._message.ack()
        except (nats.errors.Error, OSError) as error:
            raise ConnectionError(f"Cannot acknowledge {self!r}: {_reason(error)}") from error

    async def extend(self) -> None:
        """Tell JetStream the message is in progress, which restarts its `ack_wait`."""
        try:
            await self._message.in_progress()
        except (nats.errors.Error, OSError) as error:
            raise ConnectionError(f"Cannot extend {self!r}: {_reason(error)}") from error

    async def retry(self, delay: float) -> None:
        """NAK the message with a delay: JetStream delivers it again once that is over.

        Waits for the server's answer, so that the delay holds once this returns; a lost
        NAK would bring the message back after `redeliver_after` instead.
        """
        payload = Msg.Ack.Nak
        if delay > 0:
            payload += b" " + json.dumps({"delay": round(delay * 1e9)}).encode()
        try:
            await self._link.connection.request(
                self._message.reply, payload, timeout=self._link.timeout
            )
        except (nats.errors.Error, OSError) as error:
            raise ConnectionError(f"Cannot retry {self!r}: {_reason(error)}") from error


def _delivery(link: Link, message: Msg) -> NATSDelivery:
    """The delivery of a fetched message, with the transport's own headers left out."""
    headers = message.headers or {}
    problem: str | None = None
    try:
        metadata = message.metadata
        attempt, fallback = metadata.num_delivered, f"{metadata.stream}/{metadata.sequence.stream}"
    except (nats.errors.Error, ValueError, IndexError) as error:
        attempt, fallback = 1, ""
        problem = (
            f"its reply subject {message.reply!r} is not a JetStream acknowledgement "
            f"subject ({_reason(error)})"
        )
    transport: tuple[str, ...] = ()
    status = status_of(message)
    if status is not None and problem is None:
        # Only a raw HPUB publishes such a message. nats-py reads its status line into
        # `Status` and `Description`, garbled when headers follow: both are left out.
        transport = (Header.STATUS, Header.DESCRIPTION)
        problem = (
            f"its NATS header block begins with a status line {status}, which JetStream "
            f"uses for control messages"
        )
    message_id = headers.get("message-id") or headers.get("Nats-Msg-Id") or fallback
    kept = {
        str(name): value
        for name, value in headers.items()
        if not name.startswith("Nats-") and name not in transport
    }
    envelope = Envelope(message.subject, message_id, kept, message.data)
    delivery = NATSDelivery(envelope, attempt, problem, link, message)
    if problem is None:
        delivery.timestamp = metadata.timestamp  # when JetStream stored it
    return delivery


def _reason(error: str | BaseException) -> str:
    if isinstance(error, str | StreamConflict | NoStream | ConsumerGone):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
