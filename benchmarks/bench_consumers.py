"""Consumers: pybondi's worker beside a FastStream subscriber with a hand-written handler.

    .venv-bench/bin/python benchmarks/bench_consumers.py                  # about 3 minutes
    .venv-bench/bin/python benchmarks/bench_consumers.py --rounds 1 --brokers redis,nats
    .venv-bench/bin/python benchmarks/bench_consumers.py --consume-only --rounds 3

The peer is what a FastStream 0.7.8 user writes by hand: a subscriber whose handler
INSERTs one row with psycopg (a connection of an `AsyncConnectionPool`, in a transaction
of its own), acknowledged by FastStream once the handler returns. pybondi's side is a
`Worker` on an async `SQLStore` (PostgreSQL, psycopg), one session per message with the
message's id claimed in the inbox. Both sides hold 16 messages in flight and 16 database
connections (the psycopg pool's size; the store's `pool_size`).

Four measures, on each broker found (Redis streams, RabbitMQ quorum queues, NATS
JetStream), all in this one process:

- Consume: a backlog of 3,000 messages, published beforehand (untimed) on a topic of its
  own, taken off by (a) a worker whose handler stores one new aggregate (a
  `StateRepository`: one row, as the peer's), (b) a worker whose handler does nothing (the
  inbox only), (a) and (b) again with `Worker(batch=16)` (up to 16 messages of different
  keys commit in one transaction), (c) the FastStream subscriber. The clock runs from
  the first message handled to the last (connecting and declaring are left out, on both
  sides); msg/s is (messages - 1) / that time. Rounds alternate the order of the sides;
  each round's ratio is pybondi's msg/s over FastStream's, and the table gives the min
  and median of them.
- Latency: a steady 200 messages a second for a few seconds, published from this process
  (the clock starts before the publish call) to the handler's commit: FastStream's
  handler notes the time once its transaction committed; pybondi's handler (the
  aggregate one) marks its session's connection, and the pool's `checkin` event, which
  comes once the session committed and gave the connection back, notes the time.
- Concurrency: a handler that awaits 5 ms, then commits (pybondi: stores one aggregate;
  FastStream: INSERTs its row), with 16 messages in flight against 1, on the first broker.
- Statements: the SQL statements pybondi's store sends per handled message, counted with
  SQLAlchemy's cursor events (and its begin/commit events) during the untimed warm-up.

Everything the run creates has a name of its own: the streams, queues, consumer groups
and JetStream streams (`pybondi_bench_<random>_...`), and a PostgreSQL schema holding
pybondi's tables and the peer's table; all are deleted at the end. A broker that cannot
be reached is reported and skipped. The script needs FastStream and psycopg's pool,
installed only in the benchmark's venv (`make bench` makes it), and exits 0 unless a
sanity check fails (a message lost or handled twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import platform
import statistics
import sys
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

import sqlalchemy as sa
from bench_workers import (
    CONNECT_TIMEOUT,
    IN_FLIGHT,
    NATS_URL,
    POSTGRES_URL,
    RABBITMQ_URL,
    REDIS_URL,
    Counted,
    Database,
    NATSTarget,
    RabbitMQTarget,
    RedisTarget,
    Tally,
    Target,
    Unreachable,
    check,
    load_average,
    package_version,
    percentile,
    registry,
    tallies,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import pybondi
from pybondi import Depends, Message, Root, Session, current_connection
from pybondi.messaging.consumer import Consumer, current_session
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.worker import Worker
from pybondi.persistence import SQLStore

FASTSTREAM_VERSION = "0.7.8"
FILL_CHUNK = 100  # publishes awaited together when filling the peer's backlog
SLEEP = 0.005  # the concurrency handler's await
POLL = 0.002  # seconds between looks at the handled counts
DRAIN_TIMEOUT = 180.0


@dataclass(frozen=True)
class Settings:
    messages: int  # consume backlog
    warmup: int  # consume warm-up backlog, untimed (statements are counted there)
    rounds: int
    rate: float  # latency: messages per second
    seconds: float  # latency: how long
    latency_warmup: int
    concurrency: dict[int, int]  # messages in flight -> backlog
    consume_only: bool = False  # skip the latency and concurrency measures


def settings_for(rounds: int, quick: bool, consume_only: bool = False) -> Settings:
    if quick:
        return Settings(500, 100, rounds, 200.0, 1.0, 20, {16: 160, 1: 40}, consume_only)
    return Settings(3_000, 300, rounds, 200.0, 5.0, 50, {16: 640, 1: 160}, consume_only)


@dataclass(frozen=True)
class Work:
    """What a handler does besides its bookkeeping."""

    stores: bool  # pybondi: store one aggregate (the peer always INSERTs its row)
    sleep: float = 0.0  # awaited first
    batch: int = 1  # pybondi: Worker(batch=...), messages one transaction may commit


AGGREGATE = Work(stores=True)
INBOX_ONLY = Work(stores=False)
SLOW = Work(stores=True, sleep=SLEEP)
BATCH = IN_FLIGHT  # a batch may hold every message in flight
BATCHED = Work(stores=True, batch=BATCH)
BATCHED_INBOX_ONLY = Work(stores=False, batch=BATCH)


def payload(n: int) -> Counted:
    """Message n: its key is the aggregate (pybondi) or the row (peer) it creates."""
    return Counted(f"m{n}", n)


# Runs: how long a backlog took, first handled to last ----------------------------------


@dataclass
class Run:
    messages: int
    seconds: float
    cpu: float  # this process's CPU seconds over the same time

    @property
    def rate(self) -> float:
        return (self.messages - 1) / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / (self.messages - 1) * 1e6


async def clock(done: Callable[[], int], count: int, alive: Callable[[], None]) -> Run:
    """Time from the first message handled to the `count`th, looking every POLL s."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while done() < 1:
        alive()
        check("consume", time.monotonic() < deadline, "no message handled in time")
        await asyncio.sleep(POLL / 4)
    start, start_cpu = perf_counter(), process_time()
    while done() < count:
        alive()
        check("consume", time.monotonic() < deadline, f"{done()} of {count} handled in time")
        await asyncio.sleep(POLL)
    return Run(count, perf_counter() - start, process_time() - start_cpu)


# pybondi's side ------------------------------------------------------------------------


def pybondi_consumer(topic: str, group: str, work: Work, in_flight: int) -> Consumer:
    consumer = Consumer(
        None,
        registry,
        group=group,
        repository=tallies if work.stores else None,
        in_flight=in_flight,
    )
    sleep, stores = work.sleep, work.stores

    @consumer.subscribe(topic)
    async def handle(
        message: Message[Counted], session: Session = Depends(current_session)
    ) -> None:
        if sleep:
            await asyncio.sleep(sleep)
        if stores:
            session.repository.add(Tally(Root(message.payload.key)))

    return consumer


class Pybondi:
    """pybondi's workers on one broker, over the run's store."""

    def __init__(self, target: Target, store: SQLStore) -> None:
        self.target = target
        self.store = store

    async def fill(self, topic: str, count: int) -> None:
        self.target.topics.add(topic)
        batch = [Envelope.seal(topic, Message(payload(n)), registry) for n in range(count)]
        async with self.target.adapter() as broker:
            for start in range(0, count, 500):
                await broker.asend(batch[start : start + 500])

    async def consume(self, count: int, work: Work, in_flight: int = IN_FLIGHT) -> Run:
        topic = f"bench.consumers.{uuid.uuid4().hex[:8]}"
        await self.fill(topic, count)
        group = self.target.group("pybondi")
        consumer = pybondi_consumer(topic, group, work, in_flight)
        worker = Worker(
            consumer, self.target.adapter(), self.store, redeliver_after=60, batch=work.batch
        )
        task = asyncio.create_task(worker.run())

        def alive() -> None:
            if task.done():
                task.result()
                raise SystemExit("the worker stopped")

        try:
            run = await clock(lambda: worker.handled + worker.skipped, count, alive)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 60)
        check("pybondi", worker.handled == count, f"handled {worker.handled} of {count}")
        return run


# FastStream's side ---------------------------------------------------------------------


def fs(module: str) -> Any:
    """A FastStream module: installed only in the benchmark's venv."""
    return importlib.import_module(f"faststream{module}")


class Peer(ABC):
    """The FastStream subscriber on one broker, and the psycopg pool its handler uses.

    A subclass per broker says how FastStream connects, publishes and subscribes with
    16 messages in flight there.
    """

    def __init__(self, target: Target, pool: Any, table: str) -> None:
        self.target = target
        self.pool = pool
        self.insert = f"INSERT INTO {table} (key, n) VALUES (%s, %s)"

    @abstractmethod
    def broker(self) -> Any:
        """A new FastStream broker, its per-message logging off."""

    def name(self) -> str:
        """A stream, queue or subject of its own, under the run's prefix."""
        return f"{self.target.prefix}fs.{uuid.uuid4().hex[:8]}"

    async def declare(self, broker: Any, name: str) -> None:
        """Make the place the backlog waits in (RabbitMQ, NATS)."""

    @abstractmethod
    async def publish(self, broker: Any, name: str, body: dict[str, Any]) -> None:
        """Publish one message of the backlog, as FastStream does, confirmed."""

    @abstractmethod
    def subscribe(self, broker: Any, name: str, in_flight: int) -> Callable[[Any], Any]:
        """The decorator of a subscriber of `name` with `in_flight` at once."""

    def handler(self, work: Work, done: Callable[[int], None]) -> Callable[..., Awaitable[None]]:
        pool, insert, sleep = self.pool, self.insert, work.sleep

        async def handle(body: dict[str, Any]) -> None:
            if sleep:
                await asyncio.sleep(sleep)
            async with pool.connection() as connection:  # commits at the end of the block
                await connection.execute(insert, (body["key"], body["n"]))
            done(body["n"])

        return handle

    async def fill(self, name: str, count: int) -> None:
        broker = self.broker()
        await broker.connect()
        try:
            await self.declare(broker, name)
            for start in range(0, count, FILL_CHUNK):
                await asyncio.gather(
                    *(
                        self.publish(broker, name, {"key": f"m{n}", "n": n})
                        for n in range(start, min(count, start + FILL_CHUNK))
                    )
                )
        finally:
            await broker.stop()

    async def consume(self, count: int, work: Work, in_flight: int = IN_FLIGHT) -> Run:
        name = self.name()
        await self.fill(name, count)
        handled = 0

        def done(n: int) -> None:
            nonlocal handled
            handled += 1

        broker = self.broker()
        self.subscribe(broker, name, in_flight)(self.handler(work, done))
        await broker.start()
        try:
            run = await clock(lambda: handled, count, lambda: None)
        finally:
            await broker.stop()
        check("FastStream", handled == count, f"handled {handled} of {count}")
        return run

    async def cleanup(self) -> None:
        """Delete what the target's own cleanup does not find."""


class RedisPeer(Peer):
    def broker(self) -> Any:
        return fs(".redis").RedisBroker(self.target.url, logger=None)

    async def publish(self, broker: Any, name: str, body: dict[str, Any]) -> None:
        await broker.publish(body, stream=name)

    def subscribe(self, broker: Any, name: str, in_flight: int) -> Callable[[Any], Any]:
        with warnings.catch_warnings():
            # It warns that `polling_interval` is not supported with this `last_id`, yet
            # passes it on as XREADGROUP's BLOCK (0.7.8); without it the reads do not block.
            warnings.simplefilter("ignore", RuntimeWarning)
            stream = fs(".redis").StreamSub(
                name,
                group=f"fs_{uuid.uuid4().hex[:8]}",
                consumer="bench",
                last_id="0",  # the group starts at the oldest message: the backlog
                max_records=in_flight,
                polling_interval=1000,
            )
        return broker.subscriber(stream=stream, max_workers=in_flight)  # type: ignore[no-any-return]


class RabbitMQPeer(Peer):
    def __init__(self, target: Target, pool: Any, table: str) -> None:
        super().__init__(target, pool, table)
        self.queues: list[str] = []  # the target's cleanup knows only pybondi's

    def broker(self) -> Any:
        return fs(".rabbit").RabbitBroker(self.target.url, logger=None)

    def queue(self, name: str) -> Any:
        rabbit = fs(".rabbit")
        # As pybondi's adapter declares its queues: durable, quorum; messages persistent.
        return rabbit.RabbitQueue(name, queue_type=rabbit.QueueType.QUORUM, durable=True)

    async def declare(self, broker: Any, name: str) -> None:
        self.queues.append(name)
        await broker.declare_queue(self.queue(name))

    async def publish(self, broker: Any, name: str, body: dict[str, Any]) -> None:
        await broker.publish(body, queue=self.queue(name), persist=True)

    def subscribe(self, broker: Any, name: str, in_flight: int) -> Callable[[Any], Any]:
        channel = fs(".rabbit").Channel(prefetch_count=in_flight)
        return broker.subscriber(self.queue(name), channel=channel)  # type: ignore[no-any-return]

    async def cleanup(self) -> None:
        aio_pika = importlib.import_module("aio_pika")
        connection = await aio_pika.connect(self.target.url)
        try:
            for name in self.queues:
                async with await connection.channel() as channel:
                    await channel.queue_delete(name)
        finally:
            await connection.close()


class NATSPeer(Peer):
    def broker(self) -> Any:
        return fs(".nats").NatsBroker(self.target.url, logger=None)

    def name(self) -> str:
        return f"fs.{uuid.uuid4().hex[:8]}"  # a subject; its stream is named after it

    def stream(self, subject: str) -> str:
        assert isinstance(self.target, NATSTarget)
        return self.target.stream(subject)  # under the prefix the target's cleanup deletes

    async def declare(self, broker: Any, name: str) -> None:
        nats = importlib.import_module("nats")
        api = importlib.import_module("nats.js.api")
        client = await nats.connect(self.target.url, connect_timeout=CONNECT_TIMEOUT)
        try:  # as pybondi's adapter makes its streams: the subject only, in files
            await client.jetstream().add_stream(
                name=self.stream(name), subjects=[name], storage=api.StorageType.FILE
            )
        finally:
            await client.close()

    async def publish(self, broker: Any, name: str, body: dict[str, Any]) -> None:
        await broker.publish(body, name, stream=self.stream(name))

    def subscribe(self, broker: Any, name: str, in_flight: int) -> Callable[[Any], Any]:
        nats = fs(".nats")
        api = importlib.import_module("nats.js.api")
        return broker.subscriber(  # type: ignore[no-any-return]
            name,
            stream=nats.JStream(self.stream(name), declare=False),
            durable=f"fs_{uuid.uuid4().hex[:8]}",
            deliver_policy=api.DeliverPolicy.ALL,
            pull_sub=nats.PullSub(batch_size=in_flight, timeout=1.0),
            max_workers=in_flight,
        )


# The run's places: database, brokers ---------------------------------------------------

BROKERS: dict[str, tuple[type[Target], type[Peer], str]] = {
    "redis": (RedisTarget, RedisPeer, REDIS_URL),
    "rabbitmq": (RabbitMQTarget, RabbitMQPeer, RABBITMQ_URL),
    "nats": (NATSTarget, NATSPeer, NATS_URL),
}


@dataclass
class Bench:
    """The run's schema, pybondi's store on it, and the peer's pool and table."""

    database: Database
    store: SQLStore  # pool_size = IN_FLIGHT, as the peer's pool
    pool: Any
    table: str

    @classmethod
    async def open(cls) -> Bench:
        database = await Database.open()
        table = f"{database.schema}.fs_rows"  # the schema's: dropped with it
        psycopg = importlib.import_module("psycopg")
        async with await psycopg.AsyncConnection.connect(database.raw_url, autocommit=True) as db:
            await db.execute(f"CREATE TABLE {table} (key TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        store = SQLStore(
            POSTGRES_URL, asynchronous=True, schema=database.schema, pool_size=IN_FLIGHT
        )
        pool_module = importlib.import_module("psycopg_pool")
        pool = pool_module.AsyncConnectionPool(
            database.raw_url, min_size=IN_FLIGHT, max_size=IN_FLIGHT, open=False
        )
        await pool.open(wait=True)
        return cls(database, store, pool, table)

    async def count(self, table: str) -> int:
        [(count,)] = await self.database.query(f"SELECT count(*) FROM {table}")
        return int(count)

    async def close(self) -> None:
        await self.pool.close()
        await self.store.adispose()
        await self.database.close()


async def open_brokers(names: list[str], prefix: str) -> list[tuple[Target, type[Peer]]]:
    opened: list[tuple[Target, type[Peer]]] = []
    for name in names:
        kind, peer, url = BROKERS[name]
        target = kind(url, prefix)
        try:
            await asyncio.wait_for(target.open(), CONNECT_TIMEOUT * 2)
        except TimeoutError:
            print(f"skipped: {name} not reachable at {url} (no answer)", flush=True)
            continue
        except Unreachable as error:
            print(f"skipped: {' '.join(str(error).split())}", flush=True)
            continue
        opened.append((target, peer))
    return opened


# Statements per message ----------------------------------------------------------------


@contextlib.contextmanager
def statements(store: SQLStore) -> Iterator[Counter[str]]:
    """Count what the store sends: each statement by verb and table, BEGIN and COMMIT."""
    engine = store.engine
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    sent: Counter[str] = Counter()
    prefix = f"{store.metadata.schema}."

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.replace("\n", " ").split()
        verb = words[0].upper()
        table = next((w.strip('"') for w in words if prefix in w), "?").removeprefix(prefix)
        sent[f"{verb} {table}"] += 1

    def begin(_conn: Any) -> None:
        sent["BEGIN"] += 1

    def commit(_conn: Any) -> None:
        sent["COMMIT"] += 1

    def rollback(_conn: Any) -> None:
        sent["ROLLBACK"] += 1

    listeners: list[tuple[str, Callable[..., None]]] = [
        ("before_cursor_execute", note),
        ("begin", begin),
        ("commit", commit),
        ("rollback", rollback),
    ]
    for name, listener in listeners:
        sa.event.listen(sync_engine, name, listener)
    try:
        yield sent
    finally:
        for name, listener in listeners:
            sa.event.remove(sync_engine, name, listener)


def per_message(sent: Counter[str], messages: int) -> str:
    total = sum(sent.values()) / messages
    parts = ", ".join(f"{what} {count / messages:.2f}" for what, count in sorted(sent.items()))
    return f"{total:.2f} per message ({parts})"


# 1. Consume ------------------------------------------------------------------------------


@dataclass
class Consume:
    broker: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)  # 1-minute load average, per round
    statements: dict[str, str] = field(default_factory=dict)

    def ratios(self, side: str) -> list[float]:
        return [
            mine.rate / theirs.rate
            for mine, theirs in zip(self.runs[side], self.runs["faststream"], strict=True)
        ]


SIDES: list[tuple[str, Work | None]] = [
    ("pybondi, 1 aggregate", AGGREGATE),
    ("pybondi, inbox only", INBOX_ONLY),
    (f"pybondi, batch {BATCH}, 1 aggr", BATCHED),
    (f"pybondi, batch {BATCH}, inbox", BATCHED_INBOX_ONLY),
    ("faststream", None),
]


async def consume(target: Target, peer: Peer, bench: Bench, settings: Settings) -> Consume:
    result = Consume(target.name, {side: [] for side, _ in SIDES})
    mine = Pybondi(target, bench.store)

    async def one(side: str, work: Work | None, count: int) -> Run:
        await bench.database.reset()
        if work is None:
            run = await peer.consume(count, AGGREGATE)
            check("FastStream", await bench.count(bench.table) == count, "rows != messages")
            return run
        run = await mine.consume(count, work)
        handled = await bench.database.handled()
        check("pybondi", handled == count, f"{handled} inbox rows for {count} messages")
        return run

    for side, work in SIDES:  # warm-up: pools filled, statements counted
        if work is None:
            await one(side, work, settings.warmup)
            continue
        with statements(bench.store) as sent:
            await one(side, work, settings.warmup)
        result.statements[side] = per_message(sent, settings.warmup)
    for index in range(settings.rounds):
        order = SIDES if index % 2 == 0 else list(reversed(SIDES))
        result.loads.append(os.getloadavg()[0])
        for side, work in order:
            run = await one(side, work, settings.messages)
            result.runs[side].append(run)
        rates = ", ".join(f"{side} {result.runs[side][-1].rate:,.0f}" for side, _ in SIDES)
        print(f"  {target.name}: consume round {index + 1}: {rates} msg/s", flush=True)
    return result


# 2. Latency ------------------------------------------------------------------------------


@dataclass
class Latency:
    broker: str
    side: str
    seconds: list[float]  # per message, publish to commit


async def steady(
    rate: float, count: int, first: int, send: Callable[[int], Awaitable[None]]
) -> None:
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for index in range(count):
        await asyncio.sleep(max(0.0, begin + index / rate - loop.time()))
        await send(first + index)


async def arrived(committed: dict[int, float], numbers: range, what: str) -> None:
    deadline = time.monotonic() + 60
    while not all(n in committed for n in numbers):
        check(what, time.monotonic() < deadline, f"messages {numbers} not committed in time")
        await asyncio.sleep(0.01)


async def pybondi_latency(target: Target, bench: Bench, settings: Settings) -> Latency:
    await bench.database.reset()
    topic = f"bench.latency.{uuid.uuid4().hex[:8]}"
    target.topics.add(topic)
    consumer = Consumer(None, registry, group=target.group("latency"), repository=tallies)
    started: dict[int, float] = {}
    committed: dict[int, float] = {}

    @consumer.subscribe(topic)
    async def handle(
        message: Message[Counted],
        session: Session = Depends(current_session),
        connection: AsyncConnection = Depends(current_connection),
    ) -> None:
        session.repository.add(Tally(Root(message.payload.key)))
        connection.info["bench_n"] = message.payload.n  # read back at the checkin

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        n = record.info.pop("bench_n", None)
        if n is not None:
            committed[n] = perf_counter()

    engine = bench.store.engine
    assert isinstance(engine, AsyncEngine)
    sa.event.listen(engine.sync_engine, "checkin", checkin)
    broker = target.adapter()
    worker = Worker(consumer, target.adapter(), bench.store, redeliver_after=60)
    task = asyncio.create_task(worker.run())

    async def send(n: int) -> None:
        envelope = Envelope.seal(topic, Message(payload(n)), registry)
        started[n] = perf_counter()
        await broker.asend([envelope])

    try:
        timed = await latency_run(settings, send, committed, "pybondi latency")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
        await broker.aclose()
        sa.event.remove(engine.sync_engine, "checkin", checkin)
    return Latency(target.name, "pybondi", [committed[n] - started[n] for n in timed])


async def latency_run(
    settings: Settings,
    send: Callable[[int], Awaitable[None]],
    committed: dict[int, float],
    what: str,
) -> range:
    """Warm the path up, then send at the steady rate; the numbers of the timed ones."""
    warmup = settings.latency_warmup
    await steady(50.0, warmup, 0, send)
    await arrived(committed, range(warmup), what)
    await asyncio.sleep(0.5)
    count = round(settings.rate * settings.seconds)
    await steady(settings.rate, count, warmup, send)
    timed = range(warmup, warmup + count)
    await arrived(committed, timed, what)
    return timed


async def peer_latency(target: Target, peer: Peer, bench: Bench, settings: Settings) -> Latency:
    await bench.database.reset()
    name = peer.name()
    started: dict[int, float] = {}
    committed: dict[int, float] = {}

    def done(n: int) -> None:
        committed[n] = perf_counter()

    broker = peer.broker()
    await broker.connect()
    await peer.declare(broker, name)
    peer.subscribe(broker, name, IN_FLIGHT)(peer.handler(AGGREGATE, done))
    await broker.start()

    async def send(n: int) -> None:
        body = {"key": f"m{n}", "n": n}
        started[n] = perf_counter()
        await peer.publish(broker, name, body)

    try:
        timed = await latency_run(settings, send, committed, "FastStream latency")
    finally:
        await broker.stop()
    return Latency(target.name, "faststream", [committed[n] - started[n] for n in timed])


# 3. Concurrency ------------------------------------------------------------------------


@dataclass
class Concurrency:
    broker: str
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)

    def speedup(self, side: str) -> list[float]:
        many, one = self.runs[(side, IN_FLIGHT)], self.runs[(side, 1)]
        return [a.rate / b.rate for a, b in zip(many, one, strict=True)]


async def concurrency(target: Target, peer: Peer, bench: Bench, settings: Settings) -> Concurrency:
    result = Concurrency(target.name)
    mine = Pybondi(target, bench.store)
    cases = [(side, n) for side in ("pybondi", "faststream") for n in settings.concurrency]
    for case in cases:
        result.runs[case] = []
    for index in range(settings.rounds):
        order = cases if index % 2 == 0 else list(reversed(cases))
        for side, in_flight in order:
            await bench.database.reset()
            count = settings.concurrency[in_flight]
            if side == "pybondi":
                run = await mine.consume(count, SLOW, in_flight)
            else:
                run = await peer.consume(count, SLOW, in_flight)
            result.runs[(side, in_flight)].append(run)
        print(f"  {target.name}: concurrency round {index + 1} done", flush=True)
    return result


# Results -------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def consume_table(results: list[Consume]) -> list[str]:
    head = (
        f"{'broker':<8}  {'side':<26}  {'msg/s median':>12}  {'cpu us/msg':>10}  "
        f"{'ratio min / median':>18}  per round"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        for side, _ in SIDES:
            runs = result.runs[side]
            rate = statistics.median(run.rate for run in runs)
            cpu = statistics.median(run.cpu_us for run in runs)
            ratios = result.ratios(side) if side != "faststream" else []
            rounds = ", ".join(f"{run.rate:,.0f}" for run in runs)
            lines.append(
                f"{result.broker:<8}  {side:<26}  {rate:>12,.0f}  {cpu:>10,.0f}  "
                f"{spread(ratios) if ratios else '':>18}  {rounds}"
            )
        loads = ", ".join(f"{load:.2f}" for load in result.loads)
        lines.append(f"{'':<8}  load average (1 min) at each round's start: {loads}")
    return lines


def statements_lines(results: list[Consume]) -> list[str]:
    lines = []
    for result in results:
        for side, text in result.statements.items():
            lines.append(f"{result.broker:<8}  {side:<26}  {text}")
    return lines


def latency_table(results: list[Latency]) -> list[str]:
    head = f"{'broker':<8}  {'side':<10}  {'msgs':>5}  {'p50 ms':>7}  {'p90 ms':>7}  {'p99 ms':>7}"
    lines = [head, "-" * len(head)]
    for result in results:
        values = result.seconds
        lines.append(
            f"{result.broker:<8}  {result.side:<10}  {len(values):>5}  "
            f"{percentile(values, 0.5) * 1e3:>7.2f}  {percentile(values, 0.9) * 1e3:>7.2f}  "
            f"{percentile(values, 0.99) * 1e3:>7.2f}"
        )
    by_broker: dict[str, dict[str, list[float]]] = {}
    for result in results:
        by_broker.setdefault(result.broker, {})[result.side] = result.seconds
    for broker, sides in by_broker.items():
        if len(sides) == 2:
            mine, theirs = sides["pybondi"], sides["faststream"]
            p50 = percentile(mine, 0.5) / percentile(theirs, 0.5)
            p99 = percentile(mine, 0.99) / percentile(theirs, 0.99)
            lines.append(f"{broker:<8}  pybondi / FastStream: p50 {p50:.2f}, p99 {p99:.2f}")
    return lines


def concurrency_table(result: Concurrency) -> list[str]:
    head = (
        f"{'broker':<8}  {'side':<10}  {'in flight':>9}  {'msg/s median':>12}  "
        f"{'cpu us/msg':>10}  per round"
    )
    lines = [head, "-" * len(head)]
    for (side, in_flight), runs in result.runs.items():
        rate = statistics.median(run.rate for run in runs)
        cpu = statistics.median(run.cpu_us for run in runs)
        rounds = ", ".join(f"{run.rate:,.0f}" for run in runs)
        lines.append(
            f"{result.broker:<8}  {side:<10}  {in_flight:>9}  {rate:>12,.0f}  {cpu:>10,.0f}  "
            f"{rounds}"
        )
    for side in ("pybondi", "faststream"):
        lines.append(
            f"{result.broker:<8}  {side:<10}  {IN_FLIGHT} vs 1 in flight, min / median: "
            f"{spread(result.speedup(side))}x"
        )
    return lines


def header(settings: Settings, brokers: list[str]) -> list[str]:
    clients = ", ".join(
        f"{name} {package_version(name)}"
        for name in (
            "faststream",
            "psycopg",
            "psycopg-pool",
            "SQLAlchemy",
            "redis",
            "aio-pika",
            "nats-py",
        )
    )
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.machine()}, {platform.system()}), {os.cpu_count()} CPUs",
        f"pybondi {pybondi.__version__} from {Path(pybondi.__file__).parent}",
        clients,
        f"brokers: {', '.join(brokers)}; {IN_FLIGHT} in flight and {IN_FLIGHT} database "
        f"connections on both sides; FastStream's per-message logging off (logger=None)",
        f"consume: {settings.messages:,} messages, {settings.rounds} rounds (+ a warm-up of "
        f"{settings.warmup}); latency: {settings.rate:g} msg/s for {settings.seconds:g} s; "
        f"concurrency: await {SLEEP * 1e3:g} ms, backlogs "
        + ", ".join(f"{n} for {k} in flight" for k, n in settings.concurrency.items()),
        load_average("at the start"),
    ]


# The run -------------------------------------------------------------------------------


@dataclass
class Results:
    consume: list[Consume] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    concurrency: Concurrency | None = None


async def run(settings: Settings, names: list[str]) -> Results:
    results = Results()
    prefix = f"pybondi_bench_{uuid.uuid4().hex[:12]}_"
    brokers = await open_brokers(names, prefix)
    if not brokers:
        return results
    try:
        bench = await Bench.open()
    except Unreachable as error:
        print(f"skipped: {error}", flush=True)
        return results
    try:
        for index, (target, kind) in enumerate(brokers):
            peer = kind(target, bench.pool, bench.table)
            try:
                results.consume.append(await consume(target, peer, bench, settings))
                if settings.consume_only:
                    continue
                # Which side goes first alternates from broker to broker.
                for side in ("pybondi", "faststream")[:: 1 if index % 2 == 0 else -1]:
                    if side == "pybondi":
                        results.latency.append(await pybondi_latency(target, bench, settings))
                    else:
                        results.latency.append(await peer_latency(target, peer, bench, settings))
                print(f"  {target.name}: latency done", flush=True)
                if results.concurrency is None:
                    results.concurrency = await concurrency(target, peer, bench, settings)
            finally:
                await peer.cleanup()
                await target.cleanup()
    finally:
        await bench.close()
    return results


def parse_args(argv: list[str] | None) -> tuple[Settings, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--brokers",
        default=",".join(BROKERS),
        help="comma-separated, from %(default)s (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="small backlogs, for a smoke test")
    parser.add_argument("--consume-only", action="store_true", help="the consume measure alone")
    arguments = parser.parse_args(argv)
    names = [name.strip() for name in arguments.brokers.split(",") if name.strip()]
    unknown = set(names) - BROKERS.keys()
    if unknown:
        parser.error(f"unknown broker(s) {', '.join(sorted(unknown))}; known: {', '.join(BROKERS)}")
    settings = settings_for(max(1, arguments.rounds), arguments.quick, arguments.consume_only)
    return settings, names


def main(argv: list[str] | None = None) -> int:
    settings, names = parse_args(argv)
    try:
        importlib.import_module("faststream")
        importlib.import_module("psycopg_pool")
    except ModuleNotFoundError as error:
        print(
            f"skipped: {error.name} is not installed; run `make bench`, or "
            f"`.venv-bench/bin/python benchmarks/bench_consumers.py` once it exists "
            f"(faststream[redis,rabbit,nats]=={FASTSTREAM_VERSION}, psycopg[pool])"
        )
        return 0
    print("\n".join(header(settings, names)), flush=True)
    began = time.monotonic()
    results = asyncio.run(run(settings, names))
    if not results.consume:
        print("nothing measured")
        return 0
    print("\n1. Consume: a backlog, 16 in flight; ratio = pybondi msg/s / FastStream msg/s")
    print("\n".join(consume_table(results.consume)))
    print("\n4. Statements pybondi's store sends per handled message (warm-up runs)")
    print("\n".join(statements_lines(results.consume)))
    print(f"\n2. Latency at {settings.rate:g} msg/s: publish to the handler's commit")
    print("\n".join(latency_table(results.latency)))
    if results.concurrency is not None:
        print(f"\n3. Concurrency: the handler awaits {SLEEP * 1e3:g} ms, then commits")
        print("\n".join(concurrency_table(results.concurrency)))
    print()
    print(f"{load_average('at the end')}; the run took {time.monotonic() - began:.0f} s")
    print(
        "targets (issue 15): consume with an aggregate >= 1.0, inbox only >= 1.2; latency "
        "p50 and p99 <= FastStream's; concurrency 16 vs 1 >= 10x; batched >= 3x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
