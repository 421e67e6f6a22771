r"""NATS JetStream: each topic is a subject, kept by a stream of its own.

    broker = NATSBroker("nats://localhost:4222", prefix="bank_")

With `declare_streams` (the default), the first send to a topic on a connection makes
sure a JetStream stream keeps it: one named `stream_name(topic)` (the prefix, then the
topic with `.`, `*`, `>`, `/`, `\` and whitespace replaced by `_`), whose only subject
is the topic, stored in files. A stream that already keeps the topic, under that name or
another, is used as it is. With `declare_streams=False` you create the streams; a send
to a subject that no stream keeps fails.

A message carries the envelope's headers plus `Nats-Msg-Id` (the envelope's id) and the
body. The id lets JetStream's duplicate window (two minutes unless the stream says
otherwise) drop a message sent twice, as when a relay crashes between sending and
marking sent. A replayed dead letter keeps its message id but has a `replayed-at`
header: its `Nats-Msg-Id` is `{id}/{replayed-at}`, so that the window does not drop it.
The confirmation is JetStream's PubAck: a batch goes out pipelined on one connection, in
order, and `asend` returns once every message is acked. A dropped connection fails the
batch at once, and the next send connects again.

`subscribe(topics, group, ...)` consumes through durable pull consumers: one per topic
and group, on the topic's stream (declared as a send would), named after the group
(plus `_` and the topic when the stream is not the topic's own, since one stream may
keep several topics; where `.`, `*`, `>`, `/`, `\` or whitespace had to become `_`, a
short hash of the name follows, so that two groups never share a consumer). Every
worker of the group pulls from it: that is how they share the messages. A new consumer
starts from the oldest message kept, acks explicitly, redelivers what is not acked within
`redeliver_after` and never gives up (the worker counts attempts, from JetStream's
delivery count, and dead-letters). A retry is a NAK with a delay: JetStream redelivers
the message when the delay is over. The subscription has a connection of its own, and
sends the consumers' pull requests itself: a stored message whose header block begins
with a status line (`NATS/1.0 503`, as only a raw HPUB writes) is a delivery with a
`problem`, which the worker dead-letters, where nats-py's fetch would take it for
JetStream's control message and fail or drop it (see `_Pull`). A message without
`message-id` (nor `Nats-Msg-Id`) has `<stream>/<sequence>` as its id, which its
redeliveries and retries keep.

nats-py is async-only, so this adapter is too: sync sessions reach it through the outbox
(`pybondi.messaging.outbox`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pybondi.exceptions import MissingDependency
from pybondi.messaging.brokers.base import Broker, Delivery, Subscription
from pybondi.messaging.envelope import Envelope

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as Inbox
    from nats.js import JetStreamContext
    from nats.js.api import (
        DEFAULT_PREFIX,
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        Header,
        PubAck,
        StorageType,
    )
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("nats-py", "nats", "A nats:// broker") from missing

if not hasattr(JetStreamContext, "publish_async"):  # pragma: no cover - nats-py < 2.8
    # Pipelined, acked publishing (publish_async) arrived in nats-py 2.8.
    raise MissingDependency("nats-py>=2.8", "nats", "A nats:// broker")

__all__ = ["NATSBroker", "NATSDelivery", "NATSSubscription"]

logger = logging.getLogger(__name__)

_NOT_IN_STREAM_NAMES = re.compile(r"[.*>/\\\s]")


class _StreamConflict(Exception):
    """No stream keeps a topic, and the one `declare_streams` would create cannot be."""


class _NoStream(Exception):
    """No stream keeps a topic to consume, and `declare_streams` is off."""


class _ConsumerGone(Exception):
    """A topic's consumer was deleted (with its stream, maybe) while bound."""


# Failures that concern a message, not the connection, which stays open.
_REFUSALS = (
    nats.js.errors.APIError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
    nats.errors.MaxPayloadError,
    _StreamConflict,
)


class _Link:
    """One connection and what the broker learned on it."""

    def __init__(self, connection: Client, closed: asyncio.Future[None], timeout: float) -> None:
        self.connection = connection
        self.timeout = timeout
        self.jetstream = connection.jetstream(timeout=timeout)
        self.declared: set[str] = set()  # topics a stream keeps
        self.closed = closed  # done once nats-py closed the connection, for good

    @property
    def is_open(self) -> bool:
        return not self.closed.done() and not self.connection.is_closed


class NATSBroker(Broker):
    """Sends envelopes to NATS JetStream, each topic a subject; see the module docstring.

    Args:
        url: `nats://[user:password@]host:port` (or `tls://` for TLS); several servers
            may be given comma-separated.
        prefix: put before each topic's stream name, to keep apart the streams of
            several applications on one server.
        declare_streams: create each topic's stream at its first send; False expects
            the streams to exist.
        timeout: seconds `asend` waits for the broker: to connect, then to declare the
            streams and have every message acked; what is not acked by then fails.
        connection_options: passed to nats-py's `Client.connect`. Unlike nats-py, the
            broker defaults to `allow_reconnect=False` (a dropped connection fails the
            batch at once and the next send reconnects), and `error_cb` to a warning
            on this module's logger.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        declare_streams: bool = True,
        timeout: float = 30.0,
        **connection_options: Any,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.declare_streams = declare_streams
        self.timeout = timeout
        self.connection_options = connection_options
        self._link: _Link | None = None
        self._connecting = asyncio.Lock()
        self._last_error: Exception | None = None  # the last one nats-py reported

    def stream_name(self, topic: str) -> str:
        """The name of the stream `declare_streams` creates for a topic."""
        return self.prefix + _NOT_IN_STREAM_NAMES.sub("_", topic)

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int = 16,
        redeliver_after: float = 60.0,
    ) -> NATSSubscription:
        """The share of `group` in the messages of `topics`; see `Broker.subscribe`.

        The subscription connects at its first `receive`, on a connection of its own made
        with the broker's options (named `{group}/{consumer}` unless they name it), and
        declares the topics' streams and the group's consumers on them.
        """
        return NATSSubscription(
            self,
            topics,
            group,
            consumer=consumer,
            in_flight=in_flight,
            redeliver_after=redeliver_after,
        )

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        """Publish every envelope, pipelined and in order; each must be acked by JetStream.

        On a connection failure or a missing ack, the connection is closed and the next
        call opens a new one.
        """
        if not envelopes:
            return
        link = self._link
        if link is None or not link.is_open:
            link = await self._connect(envelopes)
        jetstream, declared = link.jetstream, link.declared
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        acks: list[asyncio.Future[PubAck]] = []
        failure: BaseException | None = None
        try:
            # One deadline for the batch: publish_async blocks once too many acks are
            # pending, and a timer per message would cost more than the publish itself.
            async with asyncio.timeout_at(deadline):
                for envelope in envelopes:
                    topic = envelope.topic
                    if self.declare_streams and topic not in declared:
                        await self._declare(jetstream, topic)
                        declared.add(topic)
                    headers = dict(envelope.headers)
                    replayed_at = headers.get("replayed-at")
                    # A replayed dead letter has its message's id, which the duplicate
                    # window may still hold: the replay's time tells the two apart.
                    headers["Nats-Msg-Id"] = (
                        envelope.id if replayed_at is None else f"{envelope.id}/{replayed_at}"
                    )
                    acks.append(
                        await jetstream.publish_async(topic, envelope.body, headers=headers)
                    )
        except (nats.errors.Error, OSError, _StreamConflict) as error:
            failure = error
        await self._confirm(link, envelopes, acks, failure, deadline - loop.time())

    async def _connect(self, envelopes: Sequence[Envelope]) -> _Link:
        link = self._link
        async with self._connecting:
            if self._link is not link and self._link is not None:
                return self._link  # another task connected meanwhile
            await self.aclose()
            try:
                self._link = await self._open()
            except (nats.errors.Error, OSError) as error:
                raise self._unconfirmed(envelopes, 0, self._no_connection(error)) from error
            return self._link

    async def _open(self, **options: Any) -> _Link:
        """A new connection with the broker's options (which win over `options`)."""
        connection = Client()
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Without nats-py's own reconnection, a dropped connection fails the batch at
        # once: the acks of messages written before the drop would never come, and
        # the batch would wait out its timeout. The next send connects again.
        options = {"error_cb": self._report, "allow_reconnect": False, **options}
        options.update(self.connection_options)
        options["closed_cb"] = _on_closed(closed, self.connection_options.get("closed_cb"))
        try:
            # nats-py retries a refused first connection (60 times, 2 s apart, by
            # default); the timeout bounds that, and the caller retries later.
            async with asyncio.timeout(self.timeout):
                await connection.connect(self.url, **options)
        except BaseException:
            await _close(connection)
            raise
        return _Link(connection, closed, self.timeout)

    def _no_connection(self, error: BaseException) -> str | BaseException:
        """Why `_open` failed, saying what nats-py's bare timeout means."""
        if isinstance(error, TimeoutError) and not str(error):
            last = f" ({self._last_error!r})" if self._last_error else ""
            return f"no connection within {self.timeout:g} s{last}"
        return error

    async def _report(self, error: Exception) -> None:
        # nats-py's own callback logs every failed attempt with a traceback.
        self._last_error = error
        logger.warning("%r: %s: %s", self, type(error).__name__, error)

    async def _declare(self, jetstream: JetStreamContext, topic: str) -> str:
        """Make sure a stream keeps `topic`: create it, or find the one that does.

        Returns the stream's name.
        """
        name = self.stream_name(topic)
        try:
            await jetstream.add_stream(name=name, subjects=[topic], storage=StorageType.FILE)
        except nats.js.errors.BadRequestError as error:
            # The server creates a stream again without complaint only when its config is
            # the same. It refuses when the name is taken by another config, or when
            # another stream's subjects overlap the topic: either may keep the topic.
            try:
                return await jetstream.find_stream_name_by_subject(topic)
            except nats.js.errors.NotFoundError:
                raise _StreamConflict(
                    f"no stream keeps {topic!r}, and stream {name!r} cannot be created "
                    f"for it ({error.description}): another stream has its name, maybe "
                    f"that of a topic differing only where stream names have '_'. Create "
                    f"a stream that keeps {topic!r}, or give the broker another prefix"
                ) from error
        return name

    async def _confirm(
        self,
        link: _Link,
        envelopes: Sequence[Envelope],
        acks: list[asyncio.Future[PubAck]],
        failure: BaseException | None,
        remaining: float,
    ) -> None:
        """Wait for the acks; raise for the first envelope not acked."""
        pending = [ack for ack in acks if not ack.done()]
        # While nats-py reconnects, it buffers the messages and the acks may still come;
        # once it closes the connection, none will.
        if pending and remaining > 0 and link.is_open:
            acked = asyncio.gather(*pending, return_exceptions=True)
            await asyncio.wait(
                (acked, link.closed), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
        for ack in pending:
            ack.cancel()  # frees its slot in nats-py's count of pending acks
        first = len(acks)
        reason: str | BaseException | None = failure
        for index, ack in enumerate(acks):
            if ack.cancelled() or ack.exception() is not None:
                first = index
                if not ack.cancelled():
                    reason = ack.exception()
                elif failure is None and link.is_open:
                    reason = f"no acknowledgement within {self.timeout:g} s"
                elif failure is None:
                    reason = "the connection closed before the acknowledgement"
                break
        if reason is None:
            return
        for ack in acks[first + 1 :]:
            if not ack.cancelled():
                ack.exception()  # retrieved, so asyncio does not log it as lost
        for envelope in envelopes[first:]:  # maybe its stream was deleted: declare again
            link.declared.discard(envelope.topic)
        if not isinstance(reason, _REFUSALS) and self._link is link:
            await self.aclose()
        cause = reason if isinstance(reason, BaseException) else None
        raise self._unconfirmed(
            envelopes, first, self._explain(reason, envelopes[first].topic)
        ) from cause

    def _explain(self, reason: str | BaseException, topic: str) -> str | BaseException:
        """Say what nats-py's terser errors mean here."""
        if isinstance(reason, TimeoutError) and not str(reason):  # the batch's deadline
            return f"no answer within {self.timeout:g} s"
        if isinstance(reason, nats.js.errors.NoStreamResponseError):
            return (
                f"no JetStream stream keeps the subject {topic!r}; create one, or let the "
                f"broker create it (declare_streams=True)"
            )
        if isinstance(reason, _StreamConflict):
            return str(reason)
        return reason

    async def aclose(self) -> None:
        """Close the connection; the next send opens a new one."""
        link, self._link = self._link, None
        if link is not None:
            await _close(link.connection)


_MAX_ACK_PENDING = 10_000
"""How many messages a group's consumer hands out unacknowledged, at least.

They are those the group's workers hold (`in_flight` each), plus those retried and
waiting for their delay, which JetStream counts too: with too low a cap, a burst of
retries would stop new messages for every worker. 10,000 is 625 workers of 16; once
reached, the consumer hands out only the retries until some are acknowledged.
"""

_CHECK_AFTER = 10.0
"""Seconds after which a consumer that brought nothing is checked to still exist."""

_MORE_WITHIN = 0.05  # seconds a fetch that has its first message waits for what is there
_LATE = 0.1  # seconds a fetch waits, past its request's expiry, for JetStream to end it
_ACK_SUBJECT = "$JS.ACK."  # the reply subject of every message a consumer delivers
_OVER = ("404", "408", "409")  # statuses that end a pull request: none left, expired...
_HEARTBEAT = "100"


class _Pull:
    """A topic's durable consumer, bound on the subscription's connection.

    It fetches with pull requests of its own, answered on an inbox of its own, rather
    than with nats-py's `PullSubscription.fetch`: nats-py takes any message with a
    `Status` header (how it reads a header block that begins with a status line, such as
    `NATS/1.0 503`) for JetStream's control message, and a producer can store such a
    message in a stream with a raw `HPUB`. nats-py then fails every fetch (503), or
    drops the message unseen (404, 408, 100), so that it came back forever, never
    handled nor dead-lettered. A message a consumer delivers has an acknowledgement
    subject as its reply; a control message has none: that tells them apart here, and
    `_delivery` gives a stored one a `problem`.
    """

    def __init__(self, topic: str, stream: str, durable: str, link: _Link, inbox: Inbox) -> None:
        self.topic = topic
        self.stream = stream
        self.durable = durable
        self.link = link
        self.inbox = inbox  # where JetStream answers this consumer's pull requests
        self.requests = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.fetching: asyncio.Task[list[Msg]] | None = None  # one fetch at a time
        self.asked = 0  # how many messages the running fetch asked for
        self.quiet = False  # the last fetch brought nothing
        self.checked = asyncio.get_running_loop().time()  # when it was known to exist

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages, as soon as one came, waiting up to `timeout` for it.

        A request for one message waits for it; once it came, a request for the rest
        takes what is there now. Waiting for a whole batch would hold the first messages
        while the stream is slow, when the worker could handle them at once.
        """
        fetched = await self._late(batch)
        if not fetched:
            await self._request({"batch": 1, "expires": round(timeout * 1e9)})
            fetched = await self._answers(1, timeout + _LATE)
        if fetched and len(fetched) < batch:
            await self._request({"batch": batch - len(fetched), "no_wait": True})
            fetched += await self._answers(batch - len(fetched), _MORE_WITHIN)
        return fetched

    async def _request(self, request: dict[str, Any]) -> None:
        await self.link.connection.publish(
            self.requests, json.dumps(request).encode(), reply=self.inbox.subject
        )

    async def _late(self, batch: int) -> list[Msg]:
        """Messages already in the inbox: an earlier request's, come after it stopped.

        Control messages there ended earlier requests: they are dropped.
        """
        late: list[Msg] = []
        while self.inbox.pending_msgs and len(late) < batch:
            message = await self.inbox.next_msg(timeout=_LATE)  # at once: one is there
            if _stored(message):
                late.append(message)
        return late

    async def _answers(self, wanted: int, timeout: float) -> list[Msg]:
        """The messages that answer a request, until `wanted` came or it is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        messages: list[Msg] = []
        while len(messages) < wanted:
            try:
                message = await self.inbox.next_msg(timeout=max(deadline - loop.time(), 0.001))
            except nats.errors.TimeoutError:
                break  # JetStream did not say the request is over: it is, by now
            status = None if _stored(message) else _status(message)
            if status is None:
                messages.append(message)
            elif status in _OVER:
                break
            elif status != _HEARTBEAT:
                # 503: no JetStream to answer, or worse: as nats-py's fetch, fail, and
                # the subscription connects again.
                raise nats.js.errors.APIError.from_msg(message)
        return messages


class NATSSubscription(Subscription):
    """A consumer group's share of some topics, pulled from JetStream durable consumers.

    Made by `NATSBroker.subscribe`; see the module docstring. One task receives at a
    time; deliveries may be acknowledged or retried from any task.

    Attributes:
        consumers: the durable consumer of each topic, as (stream, name), once bound.
    """

    def __init__(
        self,
        broker: NATSBroker,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int,
        redeliver_after: float,
    ) -> None:
        if isinstance(topics, str) or not topics:
            raise ValueError(f"Subscribe to a list of topics, not {topics!r}.")
        if not _NOT_IN_STREAM_NAMES.sub("", group):
            raise ValueError(f"A consumer group needs a name, not {group!r}.")
        if in_flight < 1 or redeliver_after <= 0:
            raise ValueError(
                f"in_flight must be 1 or more and redeliver_after positive, not "
                f"{in_flight!r} and {redeliver_after!r}."
            )
        self.broker = broker
        self.topics = list(dict.fromkeys(topics))
        self.group = group
        self.consumer = consumer
        self.in_flight = in_flight
        self.redeliver_after = redeliver_after
        self.consumers: dict[str, tuple[str, str]] = {}
        self._link: _Link | None = None
        self._pulls: list[_Pull] = []
        self._ready: deque[tuple[_Link, Msg]] = deque()  # fetched, not yet returned
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
        except (nats.errors.Error, OSError, _StreamConflict, _NoStream, _ConsumerGone) as error:
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
            await _close(link.connection)
            raise
        self._link, self._pulls = link, pulls

    async def _pull(self, link: _Link, topic: str) -> _Pull:
        """Make sure the topic's stream and the group's consumer exist; bind to it."""
        jetstream, broker = link.jetstream, self.broker
        if broker.declare_streams:
            stream = await broker._declare(jetstream, topic)
        else:
            try:
                stream = await jetstream.find_stream_name_by_subject(topic)
            except nats.js.errors.NotFoundError as error:
                raise _NoStream(
                    f"no JetStream stream keeps the subject {topic!r}; create one, or let "
                    f"the broker create it (declare_streams=True)"
                ) from error
        name = self.group
        if stream != broker.stream_name(topic):
            # Someone else's stream may keep several topics that the group consumes:
            # each needs a consumer of its own there, with its own filter.
            name += "_" + topic
        durable = _durable_name(name)
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
        return _Pull(topic, stream, durable, link, inbox)

    def _fetch(self, limit: int, wait: float) -> list[asyncio.Task[list[Msg]]]:
        """Start a fetch on each consumer that has none, within `limit`; return them all."""
        idle = [pull for pull in self._pulls if pull.fetching is None]
        free = limit - sum(pull.asked for pull in self._pulls if pull.fetching is not None)
        if free > 0 and idle:
            self._deal(idle, free, wait)
        return [pull.fetching for pull in self._pulls if pull.fetching is not None]

    def _deal(self, idle: list[_Pull], free: int, wait: float) -> None:
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
        unsure: list[_Pull] = []
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
                raise _ConsumerGone(
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
        await _close(link.connection)


class NATSDelivery(Delivery):
    """A message a JetStream consumer delivered; see `Delivery`.

    The attempt is JetStream's count of deliveries of the message to the group's
    consumer: it grows after a retry, and after `redeliver_after` with no answer.
    """

    __slots__ = ("_link", "_message")

    def __init__(
        self, envelope: Envelope, attempt: int, problem: str | None, link: _Link, message: Msg
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


def _delivery(link: _Link, message: Msg) -> NATSDelivery:
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
    status = _status(message)
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


def _stored(message: Msg) -> bool:
    """Whether a consumer delivered the message (a control message has no reply)."""
    return message.reply.startswith(_ACK_SUBJECT)


def _status(message: Msg) -> str | None:
    """The status of the status line the message's header block begins with, if any.

    nats-py reads `NATS/1.0 503` into a header `Status: 503` (as nats.go does), so a
    header `Status` of three digits reads the same and is taken for a status line alike:
    NATS clients reserve it. Any other value is an ordinary header.
    """
    status = (message.headers or {}).get(Header.STATUS)
    return status if status is not None and len(status) == 3 and status.isdigit() else None


def _durable_name(name: str) -> str:
    """A consumer name JetStream takes, and a different one for each `name`.

    Characters it refuses become `_`; then, so that groups `billing.eu` and
    `billing_eu` do not end up sharing one consumer, a short hash of the name follows.
    """
    durable = _NOT_IN_STREAM_NAMES.sub("_", name)
    if durable != name:
        durable += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return durable


def _reason(error: str | BaseException) -> str:
    if isinstance(error, str | _StreamConflict | _NoStream | _ConsumerGone):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _on_closed(
    closed: asyncio.Future[None], then: Callable[[], Awaitable[None]] | None
) -> Callable[[], Awaitable[None]]:
    """A `closed_cb` that marks the link closed, then calls the user's one."""

    async def on_closed() -> None:
        if not closed.done():
            closed.set_result(None)
        if then is not None:
            await then()

    return on_closed


async def _close(connection: Client) -> None:
    if connection.is_closed:
        return
    try:
        await connection.close()
    except (nats.errors.Error, OSError) as error:
        # Closing a broken connection can fail for the reason it broke, already reported.
        logger.debug("Closing a NATS connection failed: %r", error)
