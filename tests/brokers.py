"""The brokers the tests run on: real Redis, RabbitMQ and NATS JetStream, and memory.

A kit makes broker adapters with names of the test's own (a stream prefix, an
exchange), hands out unique topics, reads back what reached the broker through the
broker's own client (never through the adapter under test), and deletes every stream,
queue and exchange the test made, pass or fail. A server that cannot be reached skips
its tests with the reason, except under CI=true, where it fails them.

Each kit runs its async work on an `asyncio.Runner` of its own, so the raw client, the
adapters and the test share one event loop; `@on_broker` runs an `async def` test on it
(`@on_kit` where the fixture is `kit`, one broker's own).

The consumer side: `kit.subscribe()` hands out subscriptions, closed with the kit;
`take()` receives until enough deliveries came, `envelopes()` makes messages to send.

`MemoryKit` is the in-process broker (pybondi.messaging.brokers.memory) as a kit: not in
`KITS`, which the worker and relay tests run on, but in `WITH_MEMORY`, where a test module
takes it (tests/test_brokers.py, tests/test_broker_contract.py). It cannot be made to
fail: the tests that need a broker that fails skip on it, saying so (`can_fail`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import nats
import nats.aio.client
import nats.errors
import nats.js
import nats.js.api
import nats.js.errors
import pamqp.body
import pamqp.frame
import pamqp.header
import pytest
import redis
import redis.asyncio
from pamqp.commands import Basic, Channel, Confirm, Connection
from redis.typing import EncodableT, FieldT

from pybondi import Message
from pybondi.messaging.brokers import Broker, connect, memory
from pybondi.messaging.brokers.base import DEFAULT_GROUP, Delivery, Subscription
from pybondi.messaging.brokers.clock import Clock, ManualClock
from pybondi.messaging.envelope import Envelope
from pybondi.testing.contracts.brokers import RETRY_DELAYS
from tests.backends import unavailable

T = TypeVar("T")
F = TypeVar("F")
B = TypeVar("B", bound=Broker)
S = TypeVar("S", bound=Subscription)
S_co = TypeVar("S_co", bound=Subscription, covariant=True)

CONNECT_TIMEOUT = 3.0


class Subscribing(Protocol[S_co]):
    """An adapter whose `subscribe` gives `S_co`s (`RedisBroker`: `RedisSubscription`s)."""

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        consumer: str,
        in_flight: int = ...,
        redeliver_after: float = ...,
    ) -> S_co: ...


class BrokerKit(ABC):
    """One test's view of one broker: adapters, topics, raw reads and cleanup.

    `read(topic, count)` returns the messages of `topic` not read before, waiting up to
    `timeout` seconds until there are at least `count`. Since an adapter returns only
    once the broker confirmed, what it sent is readable at once: `timeout=0` checks that,
    and `read(topic, 0)` says instantly that nothing (more) is there.
    """

    name: ClassVar[str]
    env: ClassVar[str]
    default_url: ClassVar[str]
    dead_url: ClassVar[str]  # nothing listens there: connecting is refused at once
    impatient: ClassVar[dict[str, Any]] = {"timeout": 1.0}  # options to give up in a second
    sync: ClassVar[bool] = False  # the adapter has a sync client (`send`, `commit()`)
    can_fail: ClassVar[bool] = True  # it can be made to refuse messages, or be out of reach

    def __init__(self) -> None:
        self.url = os.environ.get(self.env, self.default_url)
        self.id = uuid.uuid4().hex[:12]
        self.prefix = f"pybondi_{self.id}_"
        self.runner = asyncio.Runner()
        self.brokers: list[Broker] = []
        self.subscribed: list[Subscription] = []
        self.topics: list[str] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.prefix}>"

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the kit's event loop."""
        return self.runner.run(work)

    def make(self, url: str | None = None, **options: Any) -> Broker:
        """A new adapter through `connect()`, with this test's names; closed at cleanup."""
        broker = connect(url or self.url, **{**self.options(), **options})
        self.brokers.append(broker)
        return broker

    def options(self) -> dict[str, Any]:
        """The adapter options that give it this test's own names."""
        return {"prefix": self.prefix}

    def subscribe(
        self,
        broker: Subscribing[S],
        topics: list[str],
        group: str = DEFAULT_GROUP,
        consumer: str = "c1",
        **options: Any,
    ) -> S:
        """`broker.subscribe(topics, group, consumer=consumer, **options)`, closed at cleanup."""
        subscription = broker.subscribe(topics, group, consumer=consumer, **options)
        self.subscribed.append(subscription)
        return subscription

    def topic(self, name: str = "orders") -> str:
        """A topic no other test uses (with a dot, as topics often have)."""
        topic = f"{name}.{self.id}-{len(self.topics)}"
        self.topics.append(topic)
        return topic

    async def elapse(self, seconds: float) -> None:
        """Let `seconds` pass for the broker (real time: sleep)."""
        await asyncio.sleep(seconds)

    async def read(self, topic: str, count: int, timeout: float = 10.0) -> list[Envelope]:
        """The unread messages of `topic`, once there are `count` or `timeout` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        got: list[Envelope] = []
        while True:
            got += await self.take(topic)
            if len(got) >= count or loop.time() >= deadline:
                return got
            await asyncio.sleep(0.02)

    def start(self) -> None:
        """Open the raw client; skip (or fail under CI=true) if the server is unreachable."""
        if self.name in _UNREACHABLE:
            unavailable(self.name, _UNREACHABLE[self.name])
        try:
            self.run(asyncio.wait_for(self.open(), CONNECT_TIMEOUT + 1))
        except Exception as error:
            if not self.unreachable(error):
                raise
            _UNREACHABLE[self.name] = error
            unavailable(self.name, error)

    def close(self) -> None:
        """Close the subscriptions and adapters, delete what the test made, close the rest."""
        try:
            self.run(self._close())
        finally:
            self.runner.close()

    async def _close(self) -> None:
        failures: list[Exception] = []
        closes = [each.close for each in self.subscribed] + [each.aclose for each in self.brokers]
        for close in closes:  # the subscriptions first
            try:
                await close()
            except Exception as error:  # close the others and clean up all the same
                failures.append(error)
        if self.connected():
            try:
                await self.cleanup()
            finally:
                await self.disconnect()
        if failures:
            raise failures[0]

    # What each broker writes -----------------------------------------------------------

    @abstractmethod
    def unreachable(self, error: Exception) -> bool:
        """Whether `error`, raised by `open()`, means the server is not there."""

    @abstractmethod
    async def open(self) -> None:
        """Connect the raw client."""

    @abstractmethod
    def connected(self) -> bool:
        """Whether `open()` succeeded (so there is something to clean up with)."""

    @abstractmethod
    async def take(self, topic: str) -> list[Envelope]:
        """Every message of `topic` available now and not taken before, in order."""

    @abstractmethod
    async def publish_bare(self, topic: str, body: bytes) -> str | None:
        """Publish a message with no id nor headers, as from a producer not pybondi.

        Returns the broker's own id of the message, where it has one (with its stream's name).
        """

    @abstractmethod
    async def publish_as_is(self, topic: str, headers: Mapping[str, str], body: bytes) -> None:
        """Publish with the raw client, headers and body as given: a producer not pybondi.

        The topic's queue or stream is declared first, as pybondi would declare it.
        """

    @abstractmethod
    async def undeliverable(self) -> tuple[Broker, str, str]:
        """An adapter with a `good` topic it can send to and a `bad` one it cannot."""

    @abstractmethod
    async def repair(self, topic: str) -> None:
        """Make a topic `undeliverable()` returned as bad deliverable."""

    @abstractmethod
    async def destroy(self, topic: str) -> None:
        """Delete a topic's stream or queue behind the adapter's back, as an operator may."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Delete every stream, queue and exchange this test made."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Close the raw client."""


_UNREACHABLE: dict[str, BaseException] = {}  # one failed connection per broker per run


class RedisKit(BrokerKit):
    """Redis Streams: each topic a stream `prefix + topic`, read with XRANGE."""

    name = "redis"
    env = "PYBONDI_REDIS_URL"
    default_url = "redis://127.0.0.1:6379"
    dead_url = "redis://127.0.0.1:1"
    impatient: ClassVar[dict[str, Any]] = {"socket_connect_timeout": 1.0}
    sync = True

    def __init__(self) -> None:
        super().__init__()
        self.client: redis.asyncio.Redis | None = None
        self.last: dict[str, str] = {}  # the last entry id read, per topic

    def unreachable(self, error: Exception) -> bool:
        return isinstance(error, OSError | redis.ConnectionError | TimeoutError)

    async def open(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self.client = client

    def connected(self) -> bool:
        return self.client is not None

    def _client(self) -> redis.asyncio.Redis:
        assert self.client is not None, "the kit is not started"
        return self.client

    async def take(self, topic: str) -> list[Envelope]:
        client, key, after = self._client(), self.prefix + topic, self.last.get(topic)
        if await client.type(key) != b"stream":  # none yet, or the string undeliverable() set
            return []
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(key, min="-" if after is None else f"({after}"),
        )
        if entries:
            self.last[topic] = entries[-1][0].decode()
        envelopes = []
        for _, fields in entries:
            assert set(fields) == {b"headers", b"body"}, fields
            headers = json.loads(fields[b"headers"])
            message_id = headers.get("message-id", "")
            envelopes.append(Envelope(topic, message_id, headers, fields[b"body"]))
        return envelopes

    async def publish_bare(self, topic: str, body: bytes) -> str:
        entry = await self._client().xadd(self.prefix + topic, {"headers": "{}", "body": body})
        return f"{self.prefix}{topic}/{entry.decode() if isinstance(entry, bytes) else entry}"

    async def publish_as_is(self, topic: str, headers: Mapping[str, str], body: bytes) -> None:
        fields: dict[FieldT, EncodableT] = {"body": body}
        if headers:  # a producer may send a body alone
            fields["headers"] = json.dumps(dict(headers))
        await self._client().xadd(self.prefix + topic, fields)

    async def undeliverable(self) -> tuple[Broker, str, str]:
        good, bad = self.topic("good"), self.topic("bad")
        # XADD to a key holding a plain string fails with WRONGTYPE.
        await self._client().set(self.prefix + bad, "not a stream")
        return self.make(), good, bad

    async def repair(self, topic: str) -> None:
        await self._client().delete(self.prefix + topic)

    async def destroy(self, topic: str) -> None:
        await self._client().delete(self.prefix + topic)

    async def cleanup(self) -> None:
        client = self._client()
        keys = [key async for key in client.scan_iter(match=f"{self.prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


class RabbitMQKit(BrokerKit):
    """RabbitMQ: a topic exchange of the test's own, a queue `prefix + topic` per topic.

    Reads with basic_get, so a message read is gone from its queue.
    """

    name = "rabbitmq"
    env = "PYBONDI_RABBITMQ_URL"
    default_url = "amqp://guest:guest@127.0.0.1:5672/"
    dead_url = "amqp://guest:guest@127.0.0.1:1/"

    def __init__(self) -> None:
        super().__init__()
        self.exchange = f"pybondi_{self.id}"
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.queues: dict[str, aio_pika.abc.AbstractQueue] = {}
        self.other_queues: list[str] = []  # a group's queues, delay queues: deleted at cleanup

    def options(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "exchange": self.exchange}

    def unreachable(self, error: Exception) -> bool:
        return isinstance(error, OSError | aio_pika.exceptions.AMQPConnectionError | TimeoutError)

    async def open(self) -> None:
        self.connection = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
        self.channel = await self.connection.channel()

    def connected(self) -> bool:
        return self.connection is not None

    def _connection(self) -> aio_pika.abc.AbstractConnection:
        assert self.connection is not None, "the kit is not started"
        return self.connection

    async def _queue(self, topic: str) -> aio_pika.abc.AbstractQueue | None:
        """The topic's queue, if the adapter (or the kit) declared it."""
        if topic not in self.queues:
            # A passive declare of a missing queue closes its channel: use a spare one.
            async with await self._connection().channel() as probe:
                try:
                    await probe.declare_queue(self.prefix + topic, passive=True)
                except aio_pika.exceptions.ChannelNotFoundEntity:
                    return None
            assert self.channel is not None
            self.queues[topic] = await self.channel.get_queue(self.prefix + topic, ensure=False)
        return self.queues[topic]

    async def take(self, topic: str) -> list[Envelope]:
        queue = await self._queue(topic)
        envelopes: list[Envelope] = []
        while queue is not None and (message := await queue.get(no_ack=True, fail=False)):
            assert message.routing_key == topic, (message.routing_key, topic)
            # Quorum queues count deliveries in a header of their own (3.10: from 0).
            headers = _strings(
                {
                    name: value
                    for name, value in message.headers.items()
                    if name != "x-delivery-count"
                }
            )
            envelopes.append(Envelope(topic, message.message_id or "", headers, message.body))
        return envelopes

    async def declare(self, topic: str) -> None:
        """Declare and bind a topic's queue the way the adapter does, with the raw client."""
        assert self.channel is not None
        exchange = await self.channel.declare_exchange(
            self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self.channel.declare_queue(
            self.prefix + topic, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key=topic)

    async def publish_bare(self, topic: str, body: bytes) -> None:
        """Publish with no message_id, confirmed, speaking AMQP itself.

        aiormq gives every message it publishes a message_id; other clients do not.
        """
        url = urlsplit(self.url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port or 5672)

        async def read(kind: type[F]) -> F:
            head = await reader.readexactly(7)
            rest = await reader.readexactly(int.from_bytes(head[3:], "big") + 1)
            _, _, frame = pamqp.frame.unmarshal(head + rest)
            assert isinstance(frame, kind), frame
            return frame

        def write(channel: int, *frames: pamqp.frame.FrameTypes) -> None:
            writer.write(b"".join(pamqp.frame.marshal(frame, channel) for frame in frames))

        try:
            writer.write(pamqp.header.ProtocolHeader().marshal())
            await read(Connection.Start)
            login = f"\0{unquote(url.username or 'guest')}\0{unquote(url.password or 'guest')}"
            write(0, Connection.StartOk(mechanism="PLAIN", response=login))
            tune = await read(Connection.Tune)
            write(0, Connection.TuneOk(tune.channel_max, tune.frame_max, heartbeat=0))
            write(0, Connection.Open(unquote(url.path[1:]) or "/"))
            await read(Connection.OpenOk)
            write(1, Channel.Open())
            await read(Channel.OpenOk)
            write(1, Confirm.Select())
            await read(Confirm.SelectOk)
            properties = Basic.Properties(delivery_mode=2)  # no message_id, no headers
            write(
                1,
                Basic.Publish(exchange=self.exchange, routing_key=topic, mandatory=True),
                pamqp.header.ContentHeader(body_size=len(body), properties=properties),
                pamqp.body.ContentBody(body),
            )
            await read(Basic.Ack)  # confirmed (a returned message would come first)
            write(0, Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
            await read(Connection.CloseOk)
        finally:
            writer.close()
            await writer.wait_closed()

    async def publish_as_is(self, topic: str, headers: Mapping[str, str], body: bytes) -> None:
        assert self.channel is not None
        await self.declare(topic)  # as pybondi's publisher and subscriptions do
        exchange = await self.channel.get_exchange(self.exchange)
        await exchange.publish(aio_pika.Message(body, headers=dict(headers)), routing_key=topic)

    async def undeliverable(self) -> tuple[Broker, str, str]:
        good, bad = self.topic("good"), self.topic("bad")
        await self.declare(good)
        # Without a queue bound to `bad`, a mandatory publish comes back unroutable.
        return self.make(declare_queues=False), good, bad

    async def repair(self, topic: str) -> None:
        await self.declare(topic)

    async def destroy(self, topic: str) -> None:
        self.queues.pop(topic, None)
        async with await self._connection().channel() as channel:
            await channel.queue_delete(self.prefix + topic)

    async def cleanup(self) -> None:
        from pybondi.messaging.brokers.rabbitmq import RabbitMQSubscription

        connection = self._connection()
        names = [*(self.prefix + topic for topic in self.topics), *self.other_queues]
        for subscription in self.subscribed:  # a group's queues, besides the topics' own
            assert isinstance(subscription, RabbitMQSubscription)
            names += [name for name in subscription.queues if name not in names]
            # The delay queues of the contract suite's retries (each expires by itself a
            # minute after its last use; deleting a queue that is not there is no error).
            names += [
                f"{name}#retry#{round(delay * 1000)}"
                for name in subscription.queues
                for delay in RETRY_DELAYS
            ]
        for name in names:
            async with await connection.channel() as channel:
                await channel.queue_delete(name)
        async with await connection.channel() as channel:
            await channel.exchange_delete(self.exchange)

    async def disconnect(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            await connection.close()


def _strings(headers: Mapping[str, object]) -> dict[str, str]:
    """Headers as envelopes have them: each value a str, as the adapter must send them."""
    assert all(isinstance(value, str) for value in headers.values()), headers
    return {key: str(value) for key, value in headers.items()}


class NATSKit(BrokerKit):
    """NATS JetStream: a stream per topic, read with a pull consumer."""

    name = "nats"
    env = "PYBONDI_NATS_URL"
    default_url = "nats://127.0.0.1:4222"
    dead_url = "nats://127.0.0.1:1"

    def __init__(self) -> None:
        super().__init__()
        self.client: nats.aio.client.Client | None = None
        self.subscriptions: dict[str, nats.js.JetStreamContext.PullSubscription] = {}
        self.taken: dict[str, int] = {}
        self.namer: Broker | None = None  # an adapter, to name streams as it does

    def unreachable(self, error: Exception) -> bool:
        return isinstance(error, OSError | nats.errors.NoServersError | TimeoutError)

    async def open(self) -> None:
        errors: list[Exception] = []

        async def note(error: Exception) -> None:
            errors.append(error)

        try:
            # nats-py retries a refused first connection whatever the options say.
            self.client = await asyncio.wait_for(
                nats.connect(self.url, connect_timeout=CONNECT_TIMEOUT, error_cb=note),
                CONNECT_TIMEOUT,
            )
        except TimeoutError as timeout:
            raise (errors[-1] if errors else timeout) from None
        await self._js().account_info()  # JetStream is enabled

    def connected(self) -> bool:
        return self.client is not None

    def _js(self) -> nats.js.JetStreamContext:
        assert self.client is not None, "the kit is not started"
        js: nats.js.JetStreamContext = self.client.jetstream()
        return js

    def stream(self, topic: str) -> str:
        """The stream name the adapter uses for a topic."""
        from pybondi.messaging.brokers.nats import NATSBroker

        if self.namer is None:
            self.namer = self.make()
        assert isinstance(self.namer, NATSBroker)
        return self.namer.stream_name(topic)

    async def take(self, topic: str) -> list[Envelope]:
        js, stream = self._js(), self.stream(topic)
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return []
        assert info.config.subjects == [topic], info.config
        available = (info.state.last_seq or 0) - self.taken.get(topic, 0)
        if available <= 0:
            return []
        if topic not in self.subscriptions:
            self.subscriptions[topic] = await js.pull_subscribe(topic, stream=stream)
        envelopes: list[Envelope] = []
        while len(envelopes) < available:
            for message in await self.subscriptions[topic].fetch(available - len(envelopes), 5):
                await message.ack()
                headers = _strings(message.headers or {})
                message_id = headers.pop("Nats-Msg-Id", "")
                assert message.subject == topic, (message.subject, topic)
                envelopes.append(Envelope(topic, message_id, headers, message.data))
        self.taken[topic] = self.taken.get(topic, 0) + len(envelopes)
        return envelopes

    async def publish_bare(self, topic: str, body: bytes) -> str:
        ack = await self._js().publish(topic, body)
        return f"{ack.stream}/{ack.seq}"

    async def publish_raw(self, topic: str, header_block: bytes, body: bytes) -> None:
        """Publish with a raw `HPUB`, whose header block no client would write.

        Returns once the server answered a PING sent after it, so it has the message.
        """
        host, _, port = self.url.removeprefix("nats://").rpartition("@")[2].partition(":")
        reader, writer = await asyncio.open_connection(host, int(port or 4222))
        try:
            await reader.readline()  # INFO
            size = len(header_block)
            writer.write(
                b'CONNECT {"headers":true,"verbose":false,"protocol":1}\r\n'
                + f"HPUB {topic} {size} {size + len(body)}\r\n".encode()
                + header_block
                + body
                + b"\r\nPING\r\n"
            )
            answer = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT)
            assert answer == b"PONG\r\n", answer
        finally:
            writer.close()
            await writer.wait_closed()

    async def add_stream(self, topic: str) -> None:
        """Create a topic's stream the way the adapter does, with the raw client."""
        await self._js().add_stream(name=self.stream(topic), subjects=[topic])

    async def publish_as_is(self, topic: str, headers: Mapping[str, str], body: bytes) -> None:
        await self.add_stream(topic)  # as pybondi's publisher and subscriptions do
        await self._js().publish(topic, body, headers=dict(headers) or None)

    async def undeliverable(self) -> tuple[Broker, str, str]:
        good, bad = self.topic("good"), self.topic("bad")
        await self.add_stream(good)
        # With no stream capturing `bad`, JetStream has nobody to acknowledge it.
        return self.make(declare_streams=False), good, bad

    async def repair(self, topic: str) -> None:
        await self.add_stream(topic)

    async def destroy(self, topic: str) -> None:
        subscription = self.subscriptions.pop(topic, None)
        if subscription is not None:
            await subscription.unsubscribe()
        self.taken.pop(topic, None)
        await self._js().delete_stream(self.stream(topic))

    async def cleanup(self) -> None:
        js = self._js()
        for subscription in self.subscriptions.values():
            await subscription.unsubscribe()
        names: list[str] = []
        while page := await js.streams_info(offset=len(names)):  # the server pages the list
            names += [info.config.name or "" for info in page]
        for name in names:
            if name.startswith(self.prefix):
                await js.delete_stream(name)

    async def disconnect(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()


class MemoryKit(BrokerKit):
    """The in-process broker: a `memory://` broker of the test's own, read with `messages()`.

    Every adapter the kit makes is that one shared broker, as every adapter of a real
    kit reaches one server. On a `ManualClock`, `elapse()` advances it.
    """

    name = "memory"
    env = "PYBONDI_MEMORY_URL"  # unused: each kit names its own broker
    default_url = "memory://"
    dead_url = "memory://"  # unused: the memory broker cannot be out of reach
    sync = True
    can_fail = False

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        self.url = f"memory://pybondi_{self.id}"
        self.clock = clock
        self.taken: dict[str, int] = {}  # how many messages of each topic were read

    def options(self) -> dict[str, Any]:
        return {} if self.clock is None else {"clock": self.clock}

    def shared(self) -> memory.MemoryBroker:
        """The kit's broker: what every adapter it makes is."""
        return memory.shared(self.url, **self.options())

    async def elapse(self, seconds: float) -> None:
        if not isinstance(self.clock, ManualClock):
            return await super().elapse(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)  # the receives it woke up run first

    def unreachable(self, error: Exception) -> bool:
        return False

    async def open(self) -> None:
        self.shared()

    def connected(self) -> bool:
        return True

    async def take(self, topic: str) -> list[Envelope]:
        kept = self.shared().messages(topic)[self.taken.get(topic, 0) :]
        self.taken[topic] = self.taken.get(topic, 0) + len(kept)
        return kept

    async def publish_bare(self, topic: str, body: bytes) -> str:
        broker = self.shared()
        await broker.asend([Envelope(topic, "", {}, body)])
        return broker.messages(topic)[-1].id  # the broker's own: topic/number

    async def publish_as_is(self, topic: str, headers: Mapping[str, str], body: bytes) -> None:
        envelope = Envelope(topic, headers.get("message-id", ""), dict(headers), body)
        await self.shared().asend([envelope])

    async def undeliverable(self) -> tuple[Broker, str, str]:
        pytest.skip(CANNOT_FAIL)

    async def repair(self, topic: str) -> None:
        pytest.skip(CANNOT_FAIL)

    async def destroy(self, topic: str) -> None:
        pytest.skip(CANNOT_FAIL)

    async def cleanup(self) -> None:
        memory.forget(self.url)

    async def disconnect(self) -> None:
        pass


CANNOT_FAIL = (
    "memory: an in-process broker is always there and keeps every message; it cannot "
    "refuse one, lose a destination or be out of reach"
)


def needs_failures(kit: BrokerKit) -> None:
    """Skip the test, saying why, on a broker that cannot be made to fail (memory)."""
    if not kit.can_fail:
        pytest.skip(CANNOT_FAIL)


KITS: dict[str, type[BrokerKit]] = {"redis": RedisKit, "rabbitmq": RabbitMQKit, "nats": NATSKit}
WITH_MEMORY: dict[str, type[BrokerKit]] = {"memory": MemoryKit, **KITS}
"""Every kit: the in-process broker first, then the real servers."""

K = TypeVar("K", bound=BrokerKit)


def started(kind: type[K]) -> Iterator[K]:
    """A fixture's body: a new kit of `kind`, started, closed after the test."""
    kit = kind()
    try:
        kit.start()
        yield kit
    finally:
        kit.close()


def on_broker(
    test: Callable[[BrokerKit], Coroutine[Any, Any, None]],
) -> Callable[[BrokerKit], None]:
    """Run an `async def test(broker)` on the kit's event loop (pytest runs only sync tests)."""

    def run(broker: BrokerKit) -> None:
        broker.run(test(broker))

    return _named(run, test)


def on_kit(test: Callable[[K], Coroutine[Any, Any, None]]) -> Callable[[K], None]:
    """`on_broker` for the tests of one broker, whose fixture is `kit` (a `RedisKit`, say)."""

    def run(kit: K) -> None:
        kit.run(test(kit))

    return _named(run, test)


def _named(run: Callable[[K], None], test: Callable[..., Any]) -> Callable[[K], None]:
    """`run`, named and documented as the test it runs (pytest reports it by that name)."""
    run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__qualname__, test.__doc__
    return run


def adapter(kit: BrokerKit, url: str | None = None, *, kind: type[B], **options: Any) -> B:
    """`kit.make(url, **options)`, checked to be a `kind` (a test file binds its own)."""
    made = kit.make(url, **options)
    assert isinstance(made, kind)
    return made


def envelopes(topic: str, count: int, **headers: str) -> list[Envelope]:
    """`count` messages for `topic`, sealed: payloads {"n": 0}, {"n": 1}..., with `headers`."""
    return [Envelope.seal(topic, Message({"n": n}, headers=headers)) for n in range(count)]


async def take(
    subscription: Subscription,
    count: int,
    timeout: float = 5.0,
    *,
    wait: float = 0.2,
    limit: int | None = None,
) -> list[Delivery]:
    """Receive until `count` deliveries came (or `timeout` passed), acknowledging none.

    Each `receive` waits up to `wait` seconds for `limit` deliveries: by default the ones
    still missing, so that no more than `count` come.
    """
    deadline = time.monotonic() + timeout
    got: list[Delivery] = []
    while len(got) < count and time.monotonic() < deadline:
        got += await subscription.receive(count - len(got) if limit is None else limit, wait=wait)
    return got


async def ack(deliveries: Iterable[Delivery]) -> None:
    """Acknowledge each delivery, in order."""
    for delivery in deliveries:
        await delivery.ack()
