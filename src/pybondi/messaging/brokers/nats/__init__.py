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
JetStream's control message and fail or drop it (see `pull.Pull`). A message without
`message-id` (nor `Nats-Msg-Id`) has `<stream>/<sequence>` as its id, which its
redeliveries and retries keep.

nats-py is async-only, so this adapter is too: sync sessions reach it through the outbox
(`pybondi.messaging.outbox`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pybondi.exceptions import MissingDependency
from pybondi.messaging.brokers.base import Broker, SubscriptionTerms
from pybondi.messaging.envelope import Envelope

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.api import PubAck, StorageType
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("nats-py", "nats", "A nats:// broker") from missing

if not hasattr(JetStreamContext, "publish_async"):  # pragma: no cover - nats-py < 2.8
    # Pipelined, acked publishing (publish_async) arrived in nats-py 2.8.
    raise MissingDependency("nats-py>=2.8", "nats", "A nats:// broker")

# After the client's import: without it, the lines above name the extra to install.
from pybondi.messaging.brokers.nats.connection import Link, close_connection
from pybondi.messaging.brokers.nats.streams import NOT_IN_STREAM_NAMES, StreamConflict
from pybondi.messaging.brokers.nats.subscription import NATSDelivery, NATSSubscription

__all__ = ["NATSBroker", "NATSDelivery", "NATSSubscription"]

logger = logging.getLogger(__name__)


# Failures that concern a message, not the connection, which stays open.
_REFUSALS = (
    nats.js.errors.APIError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
    nats.errors.MaxPayloadError,
    StreamConflict,
)


class NATSBroker(Broker[NATSSubscription]):
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
        self._link: Link | None = None
        self._connecting = asyncio.Lock()
        self._last_error: Exception | None = None  # the last one nats-py reported

    def stream_name(self, topic: str) -> str:
        """The name of the stream `declare_streams` creates for a topic."""
        return self.prefix + NOT_IN_STREAM_NAMES.sub("_", topic)

    def _subscription(self, terms: SubscriptionTerms) -> NATSSubscription:
        return NATSSubscription(self, terms)

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
        except (nats.errors.Error, OSError, StreamConflict) as error:
            failure = error
        await self._confirm(link, envelopes, acks, failure, deadline - loop.time())

    async def _connect(self, envelopes: Sequence[Envelope]) -> Link:
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

    async def _open(self, **options: Any) -> Link:
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
            await close_connection(connection)
            raise
        return Link(connection, closed, self.timeout)

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
                raise StreamConflict(
                    f"no stream keeps {topic!r}, and stream {name!r} cannot be created "
                    f"for it ({error.description}): another stream has its name, maybe "
                    f"that of a topic differing only where stream names have '_'. Create "
                    f"a stream that keeps {topic!r}, or give the broker another prefix"
                ) from error
        return name

    async def _confirm(
        self,
        link: Link,
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
        if isinstance(reason, StreamConflict):
            return str(reason)
        return reason

    async def aclose(self) -> None:
        """Close the connection; the next send opens a new one."""
        link, self._link = self._link, None
        if link is not None:
            await close_connection(link.connection)


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
