"""Broker benchmarks: pybondi's publisher and relay against the raw broker clients.

    python benchmarks/bench_brokers.py           # full run, about 1 to 2 minutes
    python benchmarks/bench_brokers.py --quick   # smoke test, about 15 s

B1 (publish) sends 3,000 messages, confirmed, 100 per batch, to each broker twice. The
payload is `Deposited(account, amount)`, a dataclass event registered in a `Registry`
(a 34-byte JSON body). Through pybondi, `BrokerPublisher(broker, registry)`:
`publish(topic, Message(event))` for each, then `await publisher.acommit()` per batch,
which includes building the `Message`, sealing it into an `Envelope` and the adapter.
Through the broker's own client, the same work by hand in the timed loop: a fresh id and
timestamp, the headers dict, the JSON body, then the batch sent as the adapter sends it
(a redis-py asyncio pipeline of XADDs; aio-pika publishes with publisher confirms,
mandatory and persistent, all started, then every ack awaited; NATS JetStream
`publish_async` with a `Nats-Msg-Id`, then every ack awaited). Before timing, the script
reads one message of each side back and checks that the bodies, the header names and
the message properties agree.

B2 (relay) drains a PostgreSQL outbox of 5,000 rows over 5 topics (written through
`Outbox`, 50 messages per transaction) to each broker, with `Relay(SQLStore(url,
asynchronous=True), broker, batch_size=...).run_once()` called until it returns 0, for
batches of 100 and 500. Between runs the outbox is rewound (every row pending again,
under a new message id, since JetStream drops ids it saw in the last two minutes) and
vacuumed. The floor is the raw client sending the same rows (headers and bodies as
stored) in batches of the same size, so the ratio shows what the database round trips
and the relay add to the bare broker work.

Each workload runs in rounds that time the floor and pybondi back to back, their order
alternating, so that a slow spell of a shared machine weighs on both; the results are
medians over the rounds. Every stream, queue and exchange the run makes has a name of
its own (`pybondi_bench_<random>`), emptied before each timed run (outside the timing)
and deleted at the end, as is the PostgreSQL schema. A broker or database that cannot
be reached is reported and skipped. The script exits 0 whether or not targets are met;
it fails only if a sanity check does (a side not delivering every message, or the floor
not sending what pybondi sends).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import platform
import statistics
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from time import perf_counter_ns, process_time_ns
from typing import Any, ClassVar, cast

import pybondi
from pybondi import Event, Message
from pybondi.messaging.brokers import Broker, BrokerPublisher, connect
from pybondi.messaging.outbox import Outbox
from pybondi.messaging.relay import Relay
from pybondi.persistence import SQLStore
from pybondi.persistence.serialization import Registry

# Each client is optional: a missing one skips its broker (or B2), naming the extra.
try:
    import redis.asyncio
except ModuleNotFoundError:  # pragma: no cover - the redis extra is not installed
    redis = None  # type: ignore[assignment]
try:
    import aio_pika
    import aio_pika.exceptions
    import aiormq
except ModuleNotFoundError:  # pragma: no cover - the rabbitmq extra is not installed
    aio_pika = None  # type: ignore[assignment]
try:
    import nats
    import nats.errors
except ModuleNotFoundError:  # pragma: no cover - the nats extra is not installed
    nats = None  # type: ignore[assignment]
try:
    import psycopg
    import sqlalchemy as sa
except ModuleNotFoundError:  # pragma: no cover - the postgres extra is not installed
    psycopg = None  # type: ignore[assignment]

REDIS_URL = os.environ.get("PYBONDI_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PYBONDI_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("PYBONDI_NATS_URL", "nats://127.0.0.1:4222")
POSTGRES_URL = os.environ.get("PYBONDI_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

PUBLISH_TARGET = 1.15
CONNECT_TIMEOUT = 5.0

# The settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Rounds and sizes of each workload (after one warm-up run of each side)."""

    rounds: int  # B1 rounds
    messages: int  # B1 messages per run
    batch: int  # B1 messages per commit
    relay_rounds: int
    relay_rows: int  # B2 outbox rows, spread over `relay_topics`
    relay_topics: int
    relay_batches: tuple[int, ...]
    fill_session: int  # messages per outbox transaction when filling


FULL = Settings(
    rounds=9,
    messages=3_000,
    batch=100,
    relay_rounds=5,
    relay_rows=5_000,
    relay_topics=5,
    relay_batches=(100, 500),
    fill_session=50,
)
QUICK = Settings(
    rounds=2,
    messages=300,
    batch=100,
    relay_rounds=2,
    relay_rows=1_000,
    relay_topics=5,
    relay_batches=(100,),
    fill_session=50,
)

# The payload ----------------------------------------------------------------------------


@dataclass
class Deposited(Event):
    account: str
    amount: int


DEPOSITED = "bank.Deposited"


def bank_registry() -> Registry:
    registry = Registry()
    registry.register(Deposited, name=DEPOSITED)
    return registry


def deposits(count: int) -> list[Deposited]:
    return [Deposited(f"acc-{index:06d}", index) for index in range(count)]


# One compact encoder, as the best hand-written code (and pybondi's registry) would use.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

RawMessage = tuple[str, dict[str, Any], bytes]  # (message id, headers (str values), body)


def raw_message(event: Deposited) -> RawMessage:
    """What pybondi puts in an envelope, by hand: a fresh id and timestamp, the JSON body."""
    message_id = str(uuid.uuid4())
    headers = {
        "message-id": message_id,
        "message-type": DEPOSITED,
        "message-version": "1",
        "timestamp": datetime.now(UTC).isoformat(),
        "correlation-id": message_id,
    }
    body = _encode({"account": event.account, "amount": event.amount}).encode()
    return message_id, headers, body


# The brokers, through their own clients -------------------------------------------------


class Unreachable(Exception):
    """The server is not there (refused, timed out, or without the feature we need)."""


class Missing(Exception):
    """The broker's client is not installed."""


class Target(ABC):
    """One broker: a raw client that sends (the floor), reads back, empties and cleans up.

    Every name it makes starts with `prefix`; `adapter()` gives pybondi's adapter the
    same names, so both sides send to the same streams or queues.
    """

    name: ClassVar[str]

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.topics: set[str] = set()

    def adapter(self) -> Broker:
        """pybondi's adapter for this broker, with this run's names."""
        return connect(self.url, **self.options())

    def options(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    @abstractmethod
    async def open(self) -> None:
        """Connect the raw client; raise `Unreachable` if the server is not there."""

    @abstractmethod
    async def send(self, topic: str, messages: Sequence[RawMessage]) -> None:
        """The floor: send a batch as the adapter does, and return once all are confirmed."""

    @abstractmethod
    async def reset(self, topic: str) -> None:
        """Empty the topic's stream or queue (it exists: pybondi's adapter made it)."""

    @abstractmethod
    async def count(self, topic: str) -> int:
        """How many messages the topic's stream or queue holds."""

    @abstractmethod
    async def last(self, topic: str) -> tuple[dict[str, str], bytes, dict[str, Any]]:
        """The newest message: its headers, body and the broker's own properties."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Delete every stream, queue and exchange of this run."""

    @abstractmethod
    async def close(self) -> None:
        """Close the raw client."""


class RedisTarget(Target):
    name = "redis"

    async def open(self) -> None:
        if redis is None:
            raise Missing("redis-py is not installed: pip install 'pybondi[redis]'")
        self.client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            await self.client.ping()
        except (OSError, redis.RedisError) as error:
            await self.client.aclose()
            raise Unreachable(error) from error

    async def send(self, topic: str, messages: Sequence[RawMessage]) -> None:
        key, dumps = self.prefix + topic, json.dumps
        pipeline = self.client.pipeline(transaction=False)
        xadd = pipeline.xadd
        for _, headers, body in messages:
            xadd(key, {"headers": dumps(headers), "body": body})
        for result in await pipeline.execute(raise_on_error=False):
            if isinstance(result, Exception) or not result:
                raise RuntimeError(f"XADD to {key} failed: {result!r}")

    async def reset(self, topic: str) -> None:
        self.topics.add(topic)
        await self.client.delete(self.prefix + topic)

    async def count(self, topic: str) -> int:
        return int(await self.client.xlen(self.prefix + topic))

    async def last(self, topic: str) -> tuple[dict[str, str], bytes, dict[str, Any]]:
        entries = await self.client.xrevrange(self.prefix + topic, count=1)
        _, fields = cast(list[tuple[bytes, dict[bytes, bytes]]], entries)[0]
        return json.loads(fields[b"headers"]), fields[b"body"], {"fields": sorted(fields)}

    async def cleanup(self) -> None:
        keys = [key async for key in self.client.scan_iter(match=f"{self.prefix}*", count=1000)]
        if keys:
            await self.client.delete(*keys)

    async def close(self) -> None:
        await self.client.aclose()


class RabbitMQTarget(Target):
    name = "rabbitmq"

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, prefix)
        self.exchange_name = prefix.rstrip("_")

    def options(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "exchange": self.exchange_name}

    async def open(self) -> None:
        if aio_pika is None:
            raise Missing("aio-pika is not installed: pip install 'pybondi[rabbitmq]'")
        # aiormq logs a refused connection as an error; the skipped line says it instead.
        quiet = logging.getLogger("aiormq.connection")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            self.connection = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as error:
            raise Unreachable(error) from error
        finally:
            quiet.setLevel(level)
        # As the adapter's channel: confirms, and a returned mandatory message raises.
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await self.channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def send(self, topic: str, messages: Sequence[RawMessage]) -> None:
        publish, ack = self.exchange.publish, aiormq.spec.Basic.Ack
        persistent = aio_pika.DeliveryMode.PERSISTENT
        publishes = [
            asyncio.create_task(
                publish(
                    aio_pika.Message(
                        body,
                        headers=headers,
                        content_type="application/json",
                        delivery_mode=persistent,
                        message_id=message_id,
                    ),
                    topic,
                    mandatory=True,
                )
            )
            for message_id, headers, body in messages
        ]
        for confirmation in await asyncio.gather(*publishes):
            if not isinstance(confirmation, ack):
                raise RuntimeError(f"RabbitMQ did not ack a message to {topic}: {confirmation!r}")

    async def _queue(self, topic: str) -> Any:
        self.topics.add(topic)
        return await self.channel.declare_queue(self.prefix + topic, passive=True)

    async def reset(self, topic: str) -> None:
        await (await self._queue(topic)).purge()

    async def count(self, topic: str) -> int:
        queue = await self._queue(topic)
        return int(queue.declaration_result.message_count or 0)

    async def last(self, topic: str) -> tuple[dict[str, str], bytes, dict[str, Any]]:
        queue, message = await self._queue(topic), None
        while incoming := await queue.get(no_ack=True, fail=False):
            message = incoming
        assert message is not None, f"{topic} is empty"
        properties = {
            "content_type": message.content_type,
            "delivery_mode": int(message.delivery_mode or 0),
            "message_id": bool(message.message_id),
            "routing_key": message.routing_key,
        }
        return cast(dict[str, str], dict(message.headers)), message.body, properties

    async def cleanup(self) -> None:
        for topic in self.topics:
            async with await self.connection.channel() as channel:
                await channel.queue_delete(self.prefix + topic)
        async with await self.connection.channel() as channel:
            await channel.exchange_delete(self.exchange_name)

    async def close(self) -> None:
        await self.connection.close()


class NATSTarget(Target):
    name = "nats"

    async def open(self) -> None:
        if nats is None:
            raise Missing("nats-py is not installed: pip install 'pybondi[nats]'")

        async def ignore(error: Exception) -> None:
            """nats-py reports connection errors here; `open` raises them instead."""

        try:
            self.client = await nats.connect(
                self.url,
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                error_cb=ignore,
            )
        except (OSError, TimeoutError, nats.errors.NoServersError) as error:
            raise Unreachable(error) from error
        self.js = self.client.jetstream()
        try:
            await self.js.account_info()
        except Exception as error:
            await self.client.close()
            raise Unreachable(f"JetStream is not enabled ({error})") from error
        self.namer = cast(Any, self.adapter())

    def stream(self, topic: str) -> str:
        name: str = self.namer.stream_name(topic)
        return name

    async def send(self, topic: str, messages: Sequence[RawMessage]) -> None:
        publish = self.js.publish_async
        futures = []
        for message_id, headers, body in messages:
            futures.append(
                await publish(topic, body, headers={**headers, "Nats-Msg-Id": message_id})
            )
        for ack in await asyncio.gather(*futures):
            if ack.duplicate:
                raise RuntimeError(f"JetStream took a message to {topic} as a duplicate")

    async def reset(self, topic: str) -> None:
        self.topics.add(topic)
        await self.js.purge_stream(self.stream(topic))

    async def count(self, topic: str) -> int:
        info = await self.js.stream_info(self.stream(topic))
        return int(info.state.messages)

    async def last(self, topic: str) -> tuple[dict[str, str], bytes, dict[str, Any]]:
        info = await self.js.stream_info(self.stream(topic))
        message = await self.js.get_msg(self.stream(topic), seq=info.state.last_seq)
        headers = dict(message.headers or {})
        properties = {"msg-id": bool(headers.pop("Nats-Msg-Id", None))}
        return headers, message.data or b"", properties

    async def cleanup(self) -> None:
        for info in await self.js.streams_info():
            if info.config.name and info.config.name.startswith(self.stream_prefix()):
                await self.js.delete_stream(info.config.name)

    def stream_prefix(self) -> str:
        return self.stream("x")[: -len("x")]

    async def close(self) -> None:
        await self.namer.aclose()
        await self.client.close()


TARGETS: list[tuple[type[Target], str]] = [
    (RedisTarget, REDIS_URL),
    (RabbitMQTarget, RABBITMQ_URL),
    (NATSTarget, NATS_URL),
]

# The harness ----------------------------------------------------------------------------


@dataclass
class Timing:
    """Per run: wall and CPU nanoseconds."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


async def timed(run: Callable[[], Awaitable[object]], timing: Timing) -> None:
    """Time one run with the collector paused, as `timeit` does."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start, start_cpu = perf_counter_ns(), process_time_ns()
        await run()
        timing.wall.append(perf_counter_ns() - start)
        timing.cpu.append(process_time_ns() - start_cpu)
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class Side:
    """One side of a comparison: the timed run, and what happens untimed around it."""

    run: Callable[[], Awaitable[object]]
    before: Callable[[], Awaitable[None]]  # empty the queues, rewind the outbox
    after: Callable[[], Awaitable[None]]  # check that the run delivered every message


async def interleaved(sides: Sequence[Side], rounds: int) -> list[Timing]:
    """Run each side once to warm up, then `rounds` rounds in alternating order."""
    for side in sides:
        await side.before()
        await side.run()
        await side.after()
    timings = [Timing() for _ in sides]
    for index in range(rounds):
        order = range(len(sides)) if index % 2 == 0 else reversed(range(len(sides)))
        for position in order:
            side = sides[position]
            await side.before()
            await timed(side.run, timings[position])
            await side.after()
    return timings


def check(label: str, condition: bool, detail: str) -> None:
    if not condition:
        raise SystemExit(f"{label}: sanity check failed: {detail}")


# B1: publish ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: pybondi against its floor, for `messages` messages per run."""

    broker: str
    workload: str
    messages: int
    floor: Timing
    bondi: Timing
    target: float | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.bondi.wall) / statistics.median(self.floor.wall)

    @property
    def best_ratio(self) -> float:
        return min(self.bondi.wall) / min(self.floor.wall)

    @property
    def cpu_ratio(self) -> float:
        """The same for this process's CPU time: the client side only, steadier."""
        return statistics.median(self.bondi.cpu) / statistics.median(self.floor.cpu)

    @property
    def added(self) -> float:
        """What pybondi adds per message, in ns: the median of the rounds' differences."""
        pairs = zip(self.bondi.wall, self.floor.wall, strict=True)
        return statistics.median(b - f for b, f in pairs) / self.messages

    @property
    def status(self) -> str:
        if self.target is None:
            return "report"
        return "PASS" if self.ratio <= self.target else "over"


async def publish_bondi(
    publisher: BrokerPublisher, topic: str, events: Sequence[Deposited], batch: int
) -> None:
    publish = publisher.publish
    for start in range(0, len(events), batch):
        for event in events[start : start + batch]:
            publish(topic, Message(event))
        await publisher.acommit()


async def publish_raw(target: Target, topic: str, events: Sequence[Deposited], batch: int) -> None:
    send = target.send
    for start in range(0, len(events), batch):
        await send(topic, [raw_message(event) for event in events[start : start + batch]])


async def same_message(target: Target, topic: str, bondi: Callable[[], Awaitable[None]]) -> str:
    """Send one message each way; check both carry the same body, header names, properties."""
    event = Deposited("acc-check", 1)
    await target.reset(topic)
    await bondi()
    mine = await target.last(topic)
    await target.reset(topic)
    await target.send(topic, [raw_message(event)])
    floor = await target.last(topic)
    await target.reset(topic)
    label = f"B1 on {target.name}"
    check(label, mine[1] == floor[1], f"bodies differ: {mine[1]!r} / {floor[1]!r}")
    check(label, sorted(mine[0]) == sorted(floor[0]), f"headers: {mine[0]} / {floor[0]}")
    check(label, mine[2] == floor[2], f"message properties differ: {mine[2]} / {floor[2]}")
    return f"{target.name}: {len(mine[1])}-byte body, headers {', '.join(sorted(mine[0]))}"


async def b1_publish(target: Target, settings: Settings, registry: Registry) -> tuple[Row, str]:
    topic = "bench.deposits"
    broker = target.adapter()
    publisher = BrokerPublisher(broker, registry)
    events = deposits(settings.messages)
    try:

        async def one_bondi() -> None:
            publisher.publish(topic, Message(Deposited("acc-check", 1)))
            await publisher.acommit()

        await one_bondi()  # the adapter makes the stream or queue
        sample = await same_message(target, topic, one_bondi)

        async def empty() -> None:
            await target.reset(topic)

        async def delivered() -> None:
            count = await target.count(topic)
            check(f"B1 on {target.name}", count == len(events), f"{count} of {len(events)} sent")

        floor, bondi = await interleaved(
            [
                Side(lambda: publish_raw(target, topic, events, settings.batch), empty, delivered),
                Side(
                    lambda: publish_bondi(publisher, topic, events, settings.batch),
                    empty,
                    delivered,
                ),
            ],
            settings.rounds,
        )
        await empty()
    finally:
        await broker.aclose()
    workload = f"B1 publish, {settings.batch}/commit"
    return Row(target.name, workload, len(events), floor, bondi, PUBLISH_TARGET), sample


# B2: relay from PostgreSQL --------------------------------------------------------------


@dataclass
class Outboxed:
    """The PostgreSQL outbox, filled once; `rewind()` makes every row pending again."""

    store: SQLStore
    raw_url: str
    schema: str
    rows: dict[str, list[RawMessage]] = field(default_factory=dict)  # per topic, by seq

    async def rewind(self) -> None:
        """Make every row pending again, under a new message id.

        New ids, because JetStream drops a message whose `Nats-Msg-Id` it saw in the last
        two minutes (its duplicate window), even from a purged stream.
        """
        outbox = f"{self.schema}.pybondi_outbox"
        async with await psycopg.AsyncConnection.connect(self.raw_url, autocommit=True) as db:
            await db.execute(
                f"UPDATE {self.schema}.pybondi_outbox_relay "
                f"SET sent = 0, owner = NULL, lease_until = NULL"
            )
            # The id is in the headers twice (message-id, correlation-id): replace both.
            await db.execute(
                f"UPDATE {outbox} AS o SET sent_at = NULL, message_id = n.id, "
                f"headers = replace(o.headers, o.message_id, n.id) "
                f"FROM (SELECT topic, seq, gen_random_uuid()::text AS id FROM {outbox}) AS n "
                f"WHERE o.topic = n.topic AND o.seq = n.seq"
            )
            # Each run rewrites every row twice: keep the tables as lean for every run.
            for table in ("pybondi_outbox", "pybondi_outbox_relay", "pybondi_outbox_topics"):
                await db.execute(f"VACUUM ANALYZE {self.schema}.{table}")


async def fill_outbox(store: SQLStore, registry: Registry, settings: Settings) -> None:
    """Write the rows through `Outbox`, `fill_session` messages per transaction."""
    outbox = Outbox(store, registry)
    topics = [f"relay.t{index}" for index in range(settings.relay_topics)]
    events = deposits(settings.relay_rows)
    for start in range(0, len(events), settings.fill_session):
        await outbox.abegin()
        try:
            for offset, event in enumerate(events[start : start + settings.fill_session]):
                outbox.publish(topics[(start + offset) % len(topics)], Message(event))
            await outbox.acommit()
        finally:
            await outbox.aclose()


async def read_outbox(raw_url: str, schema: str) -> dict[str, list[RawMessage]]:
    rows: dict[str, list[RawMessage]] = {}
    async with await psycopg.AsyncConnection.connect(raw_url) as db:
        cursor = await db.execute(
            f"SELECT topic, message_id, headers, body FROM {schema}.pybondi_outbox "
            f"ORDER BY topic, seq"
        )
        for topic, message_id, headers, body in await cursor.fetchall():
            rows.setdefault(topic, []).append((message_id, json.loads(headers), body.encode()))
    return rows


def renewed(rows: dict[str, list[RawMessage]]) -> dict[str, list[RawMessage]]:
    """The same messages under new ids, as `Outboxed.rewind()` gives the outbox's rows."""
    renewed: dict[str, list[RawMessage]] = {}
    for topic, messages in rows.items():
        renewed[topic] = []
        for _, headers, body in messages:
            message_id = str(uuid.uuid4())
            fresh = {**headers, "message-id": message_id, "correlation-id": message_id}
            renewed[topic].append((message_id, fresh, body))
    return renewed


async def drain(relay: Relay) -> int:
    sent = 0
    while sent_now := await relay.run_once():
        sent += sent_now
    return sent


@dataclass
class RelayBench:
    """B2 on one broker: the relay and its floor, for one batch size at a time."""

    target: Target
    outboxed: Outboxed
    floor_rows: dict[str, list[RawMessage]] = field(default_factory=dict)
    sent: int = 0

    @property
    def label(self) -> str:
        return f"B2 on {self.target.name}"

    @property
    def total(self) -> int:
        return sum(len(messages) for messages in self.outboxed.rows.values())

    async def empty(self) -> None:
        for topic in self.outboxed.rows:
            await self.target.reset(topic)

    async def delivered(self) -> None:
        for topic, messages in self.outboxed.rows.items():
            count = await self.target.count(topic)
            expected = len(messages)
            check(self.label, count == expected, f"{topic}: {count} of {expected} sent")

    async def prepare(self) -> None:
        """A first drain, so that the adapter makes the streams or queues."""
        async with self.target.adapter() as broker:
            await self.outboxed.rewind()
            sent = await drain(Relay(self.outboxed.store, broker))
            check(self.label, sent == self.total, f"the relay sent {sent} of {self.total}")
        await self.delivered()

    async def floor_before(self) -> None:
        await self.empty()
        self.floor_rows = renewed(self.outboxed.rows)

    async def floor(self, batch: int) -> None:
        """The raw client sends the outbox's rows, batch by batch, topic by topic."""
        send = self.target.send
        for topic, messages in self.floor_rows.items():
            for start in range(0, len(messages), batch):
                await send(topic, messages[start : start + batch])

    async def relay_before(self) -> None:
        await self.empty()
        await self.outboxed.rewind()

    async def relay(self, relay: Relay) -> None:
        self.sent = await drain(relay)

    async def relay_after(self) -> None:
        check(self.label, self.sent == self.total, f"the relay sent {self.sent} of {self.total}")
        await self.delivered()

    async def compare(self, batch: int, rounds: int) -> Row:
        relay = Relay(self.outboxed.store, self.target.adapter(), batch_size=batch)
        try:
            floor, bondi = await interleaved(
                [
                    Side(lambda: self.floor(batch), self.floor_before, self.delivered),
                    Side(lambda: self.relay(relay), self.relay_before, self.relay_after),
                ],
                rounds,
            )
        finally:
            await relay.broker.aclose()
        return Row(self.target.name, f"B2 relay, batch {batch}", self.total, floor, bondi)


async def b2_relay(target: Target, outboxed: Outboxed, settings: Settings) -> list[Row]:
    bench = RelayBench(target, outboxed)
    await bench.prepare()
    rows = [await bench.compare(batch, settings.relay_rounds) for batch in settings.relay_batches]
    await bench.empty()
    return rows


async def open_outbox(settings: Settings, registry: Registry) -> Outboxed | str:
    """The filled outbox in a schema of this run's own, or why PostgreSQL is skipped."""
    if psycopg is None:
        return "skipped: B2 relay needs psycopg (pip install 'pybondi[postgres]')"
    url = sa.make_url(POSTGRES_URL)
    raw_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"pybondi_bench_{uuid.uuid4().hex[:12]}"
    try:
        async with await psycopg.AsyncConnection.connect(
            raw_url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
        ) as db:
            await db.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        reason = " ".join(str(error).split())
        return f"skipped: PostgreSQL not reachable at {url.render_as_string()} ({reason})"
    outboxed = Outboxed(SQLStore(POSTGRES_URL, asynchronous=True, schema=schema), raw_url, schema)
    try:
        await outboxed.store.acreate_tables()
        await fill_outbox(outboxed.store, registry, settings)
        outboxed.rows = await read_outbox(raw_url, schema)
    except BaseException:
        await close_outbox(outboxed)
        raise
    return outboxed


async def close_outbox(outboxed: Outboxed) -> None:
    """Drop the run's schema."""
    await outboxed.store.adispose()
    async with await psycopg.AsyncConnection.connect(outboxed.raw_url, autocommit=True) as db:
        await db.execute(f"DROP SCHEMA {outboxed.schema} CASCADE")


# Results --------------------------------------------------------------------------------


def per_message(times: list[float], messages: int) -> float:
    return statistics.median(times) / messages / 1e3


def rate(times: list[float], messages: int) -> float:
    return messages / (statistics.median(times) / 1e9)


def table(rows: list[Row]) -> list[str]:
    width = max(len(row.workload) for row in rows)
    head = (
        f"{'broker':<8} {'workload':<{width}}  {'raw msg/s':>9}  {'pybondi msg/s':>13}  "
        f"{'raw us/msg':>10}  {'pybondi us/msg':>14}  {'added':>6}  {'ratio':>5}  {'(min)':>5}  "
        f"{'target':>6}  {'status':<6}  {'cpu ratio':>9}  cpu us/msg raw / pybondi"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        target = "-" if row.target is None else f"<={row.target:g}"
        n = row.messages
        lines.append(
            f"{row.broker:<8} {row.workload:<{width}}  {rate(row.floor.wall, n):>9,.0f}  "
            f"{rate(row.bondi.wall, n):>13,.0f}  {per_message(row.floor.wall, n):>10.1f}  "
            f"{per_message(row.bondi.wall, n):>14.1f}  {row.added / 1e3:>+6.1f}  "
            f"{row.ratio:>5.2f}  {row.best_ratio:>5.2f}  {target:>6}  {row.status:<6}  "
            f"{row.cpu_ratio:>9.2f}  "
            f"{per_message(row.floor.cpu, n):.1f} / {per_message(row.bondi.cpu, n):.1f}"
        )
    return lines


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def header(settings: Settings) -> list[str]:
    clients = ", ".join(
        f"{name} {package_version(name)}"
        for name in ("redis", "aio-pika", "nats-py", "SQLAlchemy", "psycopg")
    )
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.machine()}, {platform.system()})",
        f"pybondi {pybondi.__version__} from {Path(pybondi.__file__).parent}",
        clients,
        f"B1: {settings.messages:,} messages per run, {settings.batch} per commit, "
        f"{settings.rounds} interleaved rounds; B2: {settings.relay_rows:,} outbox rows over "
        f"{settings.relay_topics} topics, batches of {', '.join(map(str, settings.relay_batches))}"
        f", {settings.relay_rounds} rounds",
        load_average("at the start"),
    ]


def load_average(when: str) -> str:
    """Other work on the machine skews broker and database timings: say how much there was."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # pragma: no cover - not on this platform
        return f"load average {when}: unknown"
    return f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min), {os.cpu_count()} CPUs"


async def open_targets(stack: contextlib.AsyncExitStack) -> list[Target]:
    """The brokers that answer, each to be cleaned up and closed when `stack` unwinds."""
    prefix = f"pybondi_bench_{uuid.uuid4().hex[:12]}_"
    targets: list[Target] = []
    for kind, url in TARGETS:
        target = kind(url, prefix)
        try:
            await asyncio.wait_for(target.open(), CONNECT_TIMEOUT * 2)
        except (Missing, ModuleNotFoundError) as error:
            print(f"skipped: {kind.name} not available ({error})", flush=True)
            continue
        except TimeoutError:
            reason = f"no connection within {CONNECT_TIMEOUT * 2:g} s"
            print(f"skipped: {kind.name} not reachable at {url} ({reason})", flush=True)
            continue
        except Unreachable as error:
            reason = " ".join(str(error).split())
            print(f"skipped: {kind.name} not reachable at {url} ({reason})", flush=True)
            continue
        stack.push_async_callback(target.close)
        stack.push_async_callback(target.cleanup)  # runs first: the stack unwinds LIFO
        targets.append(target)
    return targets


async def run(settings: Settings) -> tuple[list[Row], list[str]]:
    registry = bank_registry()
    rows: list[Row] = []
    notes: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        targets = await open_targets(stack)
        for target in targets:
            row, sample = await b1_publish(target, settings, registry)
            rows.append(row)
            notes.append(f"same message both sides: {sample}")
            print(f"  {target.name}: B1 done", flush=True)
        if not targets:
            return rows, notes
        outboxed = await open_outbox(settings, registry)
        if isinstance(outboxed, str):
            print(outboxed, flush=True)
            return rows, notes
        stack.push_async_callback(close_outbox, outboxed)
        for target in targets:
            rows += await b2_relay(target, outboxed, settings)
            print(f"  {target.name}: B2 done", flush=True)
    return rows, notes


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run, for a smoke test")
    return QUICK if parser.parse_args(argv).quick else FULL


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    print("\n".join(header(settings)), flush=True)
    rows, notes = asyncio.run(run(settings))
    if not rows:
        print("no broker reachable: nothing measured")
        return 0
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(notes))
    print(load_average("at the end"))
    print(
        "ratio = pybondi median / raw median (wall time per run); (min) = best / best; added = "
        "median of the rounds' differences, us per message. B1's raw side builds the same "
        "headers and JSON body in the timed loop; B2's floor sends the outbox's rows as stored."
    )
    over = [f"{row.workload} on {row.broker}" for row in rows if row.status == "over"]
    print(f"over target: {', '.join(over)}" if over else "all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
