"""Worker benchmarks: scale-out over processes, end-to-end latency, and the consumer side.

    python benchmarks/bench_workers.py           # full run, about 9 minutes
    python benchmarks/bench_workers.py --quick   # smoke test, about 3 minutes

Every message is a `Counted(key, n)` event; the handler adds one to the count of the
key's `Tally` (a `StateRepository` aggregate on PostgreSQL), so each message is a real
database transaction: read the tally (or find none), write it, record the message in the
inbox, commit. Messages of one key are handled one after the other within a worker
(`Consumer(key=...)`); two workers updating one tally at once make one of them retry.

W1 (scale-out) puts a backlog of 5,000 messages over 1,000 keys on a topic, then starts
`pybondi worker bench_workers:consumer --workers N` (N = 1, 2, 4: the CLI's supervisor
and N worker processes). The handler holds every worker's first messages at a gate until
all N processes have one, so that imports and connections are left out; the time runs
from opening the gate to the commit of the last message (the latest `handled_at` of the
inbox). The machine's cores are shared by the workers, PostgreSQL and the broker.

W2 (latency) measures, at a steady 200 messages a second for 5 s, the time from a
message's send to its handler's commit in a worker process: the handler also runs
`pg_notify`, which PostgreSQL delivers to the benchmark's listening connection when the
transaction commits, and the benchmark notes the time it arrives. Two paths: "direct",
where the benchmark sends each message with the adapter's `asend` (the clock starts
before the call), and "outbox", where it commits a session whose outbox holds the
message (the clock starts once the commit returned) and a `pybondi relay` process sends
it. For the outbox path the `sent_at` the relay wrote (once the broker confirmed) splits
the time in two legs.

W3 (consume) takes a backlog of 5,000 messages off a topic in this process, three ways:
the broker's own client (redis-py XREADGROUP + XACK, aio-pika consume + ack, nats-py pull
fetch + ack), 16 messages at a time and one ack per message, with no database: the
floor; pybondi's `Subscription.receive(16)` and `Delivery.ack()`, with no database: the
adapter; and a `Worker` with the handler above on PostgreSQL. The ratios are to the
floor, in rounds that alternate the order of the sides.

Every stream, queue, exchange and consumer group the run makes has a name of its own
(`pybondi_bench_<random>_`), and so does its PostgreSQL schema; all are deleted at the
end, even after a failure. A broker that cannot be reached is reported and skipped. The
script exits 0 unless a sanity check fails (a message not handled, or handled twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from time import perf_counter_ns, process_time_ns
from typing import IO, Any, ClassVar, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

import pybondi
from pybondi import (
    Aggregate,
    Depends,
    Event,
    Message,
    Messagebus,
    Root,
    Session,
    current_connection,
)
from pybondi.exceptions import NotFound
from pybondi.messaging.brokers import Broker, connect
from pybondi.messaging.brokers.base import DEFAULT_GROUP
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.messaging.worker import Worker
from pybondi.persistence import SQLStore, Store
from pybondi.persistence.repositories import StateRepository, StoreRepository
from pybondi.persistence.serialization import Registry

# Each client is optional: a missing one skips its broker (PostgreSQL: everything).
try:
    import redis.asyncio
except ModuleNotFoundError:  # pragma: no cover - the redis extra is not installed
    redis = None  # type: ignore[assignment]
try:
    import aio_pika
    import aio_pika.abc
    import aio_pika.exceptions
except ModuleNotFoundError:  # pragma: no cover - the rabbitmq extra is not installed
    aio_pika = None  # type: ignore[assignment]
try:
    import nats
    import nats.errors
    import nats.js.api
except ModuleNotFoundError:  # pragma: no cover - the nats extra is not installed
    nats = None  # type: ignore[assignment]
try:
    import psycopg
except ModuleNotFoundError:  # pragma: no cover - the postgres extra is not installed
    psycopg = None  # type: ignore[assignment]

REDIS_URL = os.environ.get("PYBONDI_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_URL = os.environ.get("PYBONDI_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("PYBONDI_NATS_URL", "nats://127.0.0.1:4222")
POSTGRES_URL = os.environ.get("PYBONDI_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

HERE = Path(__file__).resolve().parent
CONNECT_TIMEOUT = 5.0
IN_FLIGHT = 16  # the Consumer's default: messages a worker (and each floor) holds at once
FILL_BATCH = 500  # messages per asend when filling a backlog
START_TIMEOUT = 120.0  # seconds for worker processes to start (imports on a busy machine)
DRAIN_TIMEOUT = 300.0  # seconds for a backlog to be handled

# The consumer (imported by the worker processes as bench_workers:consumer) ------------

registry = Registry()


@registry.register(name="bench.Counted")
@dataclass
class Counted(Event):
    """Message n for the tally `key`."""

    key: str
    n: int


@dataclass
class Tally(Aggregate):
    """How many messages were handled for one key."""

    root: Root
    count: int = 0


registry.register(Tally, name="bench.Tally")

# Conflicts between workers on a tally are retried soon, and never dead-lettered here.
RETRY = Retry(attempts=100, delay=0.05, factor=2.0, max_delay=0.5)


def tallies(store: Store) -> StateRepository[Tally]:
    return StateRepository(store, Tally, registry)


def make_consumer(
    topic: str, *, group: str = DEFAULT_GROUP, gate: str | None = None, notify: str | None = None
) -> Consumer:
    """The benchmark's consumer of `topic`; see the module docstring.

    gate: a directory: each worker process's first messages wait until the file `go`
        is there, after writing `ready-<pid>` (W1).
    notify: a PostgreSQL channel: the handler's transaction notifies it with the
        message's number, which PostgreSQL delivers when it commits (W2).
    """
    consumer = Consumer(
        None,
        registry,
        group=group,
        repository=tallies,
        retry=RETRY,
        key=lambda message: message.payload.key,
    )
    opened = gate is None

    async def count(message: Message[Counted], session: Session) -> None:
        nonlocal opened
        if not opened:
            assert gate is not None
            await _wait_at(gate)
            opened = True
        repository = cast(StoreRepository[Tally], session.repository)
        key = message.payload.key
        try:
            tally = await repository.aget(key)
        except NotFound:
            tally = Tally(Root(key))
            repository.add(tally)
        tally.count += 1

    if notify is None:

        @consumer.subscribe(topic)
        async def counted(
            message: Message[Counted], session: Session = Depends(current_session)
        ) -> None:
            await count(message, session)

    else:

        @consumer.subscribe(topic)
        async def counted_and_notified(
            message: Message[Counted],
            session: Session = Depends(current_session),
            connection: AsyncConnection = Depends(current_connection),
        ) -> None:
            await count(message, session)
            sent = (notify, str(message.payload.n))
            await connection.exec_driver_sql("SELECT pg_notify(%s, %s)", sent)

    return consumer


async def _wait_at(gate: str) -> None:
    Path(gate, f"ready-{os.getpid()}").touch()
    go = Path(gate, "go")
    while not go.exists():
        await asyncio.sleep(0.002)


consumer = make_consumer(
    os.environ.get("PYBONDI_BENCH_TOPIC", "bench.unused"),
    gate=os.environ.get("PYBONDI_BENCH_GATE") or None,
    notify=os.environ.get("PYBONDI_BENCH_NOTIFY") or None,
)


def envelopes(topic: str, count: int, keys: int, start: int = 0) -> list[Envelope]:
    return [
        Envelope.seal(topic, Message(Counted(f"k{n % keys}", n)), registry)
        for n in range(start, start + count)
    ]


# The settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    scale_messages: int  # W1 backlog
    scale_workers: tuple[int, ...]
    scale_rounds: int
    keys: int
    latency_runs: tuple[tuple[bool, float], ...]  # W2 (through the outbox?, messages/s)
    latency_seconds: float
    latency_warmup: int  # messages through the whole path before timing
    consume_messages: int  # W3 backlog
    consume_rounds: int


FULL = Settings(
    scale_messages=5_000,
    scale_workers=(1, 2, 4),
    scale_rounds=1,
    keys=1_000,
    latency_runs=((False, 200.0), (True, 200.0), (True, 50.0)),
    latency_seconds=5.0,
    latency_warmup=50,
    consume_messages=3_000,
    consume_rounds=2,
)
QUICK = Settings(
    scale_messages=1_000,
    scale_workers=(1, 2, 4),
    scale_rounds=1,
    keys=1_000,
    latency_runs=((False, 200.0), (True, 200.0), (True, 50.0)),
    latency_seconds=2.0,
    latency_warmup=20,
    consume_messages=1_000,
    consume_rounds=1,
)


# The database ---------------------------------------------------------------------------


class Unreachable(Exception):
    """The server is not there, or its client is not installed."""


@dataclass
class Database:
    """The run's PostgreSQL schema, its store, and plain connections for the checks."""

    url: str  # as pybondi takes it
    raw_url: str  # as psycopg takes it
    schema: str
    store: SQLStore

    @classmethod
    async def open(cls) -> Database:
        if psycopg is None:
            raise Unreachable("psycopg is not installed: pip install 'pybondi[postgres]'")
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
            raise Unreachable(f"PostgreSQL at {url.render_as_string()}: {reason}") from error
        store = SQLStore(POSTGRES_URL, asynchronous=True, schema=schema)
        database = cls(POSTGRES_URL, raw_url, schema, store)
        await store.acreate_tables()
        return database

    def cli(self) -> list[str]:
        return ["--store", self.url, "--schema", self.schema]

    async def query(self, sql: str, *values: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.raw_url) as db:
            cursor = await db.execute(sql, values)
            return [tuple(row) for row in await cursor.fetchall()]

    async def handled(self) -> int:
        [(count,)] = await self.query(f"SELECT count(*) FROM {self.schema}.pybondi_inbox")
        return int(count)

    async def last_handled_at(self) -> float:
        [(latest,)] = await self.query(f"SELECT max(handled_at) FROM {self.schema}.pybondi_inbox")
        return epoch(latest)

    async def counted(self) -> int:
        """The sum of the tallies' counts: one per message handled."""
        rows = await self.query(f"SELECT data FROM {self.schema}.pybondi_aggregates")
        return sum(json.loads(data)["count"] for (data,) in rows)

    async def reset(self) -> None:
        """Empty every table of the schema, so that each run finds the same database."""
        tables = await self.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", self.schema
        )
        async with await psycopg.AsyncConnection.connect(self.raw_url, autocommit=True) as db:
            names = ", ".join(f"{self.schema}.{name}" for (name,) in tables)
            await db.execute(f"TRUNCATE {names}")
            await db.execute("CHECKPOINT")  # each run starts with the WAL flushed

    async def close(self) -> None:
        await self.store.adispose()
        async with await psycopg.AsyncConnection.connect(self.raw_url, autocommit=True) as db:
            await db.execute(f"DROP SCHEMA {self.schema} CASCADE")


def epoch(moment: datetime) -> float:
    """A naive UTC timestamp from the store, in seconds since the epoch."""
    return moment.replace(tzinfo=UTC).timestamp()


# The brokers, through their own clients -------------------------------------------------


class Target(ABC):
    """One broker: pybondi's adapter on the run's names, the raw floor, the cleanup."""

    name: ClassVar[str]
    refills: ClassVar[bool] = False  # each run needs its backlog sent again (RabbitMQ)

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.topics: set[str] = set()

    def options(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def adapter(self) -> Broker:
        return connect(self.url, **self.options())

    def cli(self) -> list[str]:
        """The `--broker` arguments of `pybondi worker` and `pybondi relay`."""
        arguments = ["--broker", self.url]
        for name, value in self.options().items():
            arguments += ["--broker-option", f"{name}={json.dumps(value)}"]
        return arguments

    def group(self, label: str) -> str:
        """A consumer group that starts from the oldest message of the topic."""
        return f"{label}_{uuid.uuid4().hex[:8]}"

    async def fill(self, topic: str, count: int, keys: int) -> None:
        """Send a backlog of `count` messages, confirmed, through the adapter."""
        self.topics.add(topic)
        batch = envelopes(topic, count, keys)
        async with self.adapter() as broker:
            for start in range(0, count, FILL_BATCH):
                await broker.asend(batch[start : start + FILL_BATCH])

    @abstractmethod
    async def open(self) -> None:
        """Check that the server answers; raise `Unreachable` if not."""

    @abstractmethod
    async def raw_consume(self, topic: str, group: str, count: int) -> int:
        """The floor: take `count` messages as a group's consumer, ack each one."""

    async def empty(self, topic: str) -> None:
        """Drop what the topic holds (RabbitMQ, before a refill)."""

    @abstractmethod
    async def cleanup(self) -> None:
        """Delete every stream, queue and exchange of the run."""


class RedisTarget(Target):
    name = "redis"

    def stream(self, topic: str) -> str:
        return self.prefix + topic

    async def open(self) -> None:
        if redis is None:
            raise Unreachable("redis-py is not installed: pip install 'pybondi[redis]'")
        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            await client.ping()
        except (OSError, redis.RedisError) as error:
            raise Unreachable(f"redis at {self.url}: {error}") from error
        finally:
            await client.aclose()

    async def raw_consume(self, topic: str, group: str, count: int) -> int:
        client = redis.asyncio.Redis.from_url(self.url)
        key, done = self.stream(topic), 0
        try:
            await client.xgroup_create(key, group, "0", mkstream=True)
            while done < count:
                response = await client.xreadgroup(
                    group, "raw", {key: ">"}, count=IN_FLIGHT, block=1000
                )
                for _, entries in cast(list[tuple[bytes, list[tuple[bytes, Any]]]], response):
                    for entry, _fields in entries:
                        await client.xack(key, group, entry)
                        done += 1
        finally:
            await client.aclose()
        return done

    async def cleanup(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


class RabbitMQTarget(Target):
    name = "rabbitmq"
    refills = True  # a queue's messages, once acked, are gone

    def options(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "exchange": self.prefix.rstrip("_")}

    def group(self, label: str) -> str:
        # Another group's queue would get only the messages sent after it exists: every
        # side consumes the topic's own queue, filled again before each run.
        return DEFAULT_GROUP

    async def open(self) -> None:
        if aio_pika is None:
            raise Unreachable("aio-pika is not installed: pip install 'pybondi[rabbitmq]'")
        try:
            connection = await aio_pika.connect(self.url, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPConnectionError) as error:
            raise Unreachable(f"rabbitmq at {self.url}: {error}") from error
        await connection.close()

    async def raw_consume(self, topic: str, group: str, count: int) -> int:
        connection = await aio_pika.connect(self.url)
        done = 0
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=IN_FLIGHT)
            queue = await channel.declare_queue(self.prefix + topic, passive=True)
            incoming: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            tag = await queue.consume(incoming.put)
            while done < count:
                message = await incoming.get()
                await message.ack()
                done += 1
            await queue.cancel(tag)
        finally:
            await connection.close()
        return done

    async def empty(self, topic: str) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                queue = await channel.declare_queue(self.prefix + topic, passive=True)
                await queue.purge()
        finally:
            await connection.close()

    async def cleanup(self) -> None:
        connection = await aio_pika.connect(self.url)
        delays = {round(RETRY.backoff(attempt) * 1000) for attempt in range(1, 30)}
        try:
            for topic in self.topics:
                queue = self.prefix + topic
                for name in [queue, *(f"{queue}#retry#{ms}" for ms in delays)]:
                    async with await connection.channel() as channel:
                        await channel.queue_delete(name)
            async with await connection.channel() as channel:
                await channel.exchange_delete(self.prefix.rstrip("_"))
        finally:
            await connection.close()


class NATSTarget(Target):
    name = "nats"

    def stream(self, topic: str) -> str:
        from pybondi.messaging.brokers.nats import NATSBroker  # noqa: PLC0415 - with the nats extra

        broker = self.adapter()
        assert isinstance(broker, NATSBroker)
        return broker.stream_name(topic)

    async def _connect(self) -> Any:
        async def ignore(error: Exception) -> None:
            """nats-py reports connection errors here; the caller raises them."""

        return await nats.connect(
            self.url,
            connect_timeout=CONNECT_TIMEOUT,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=ignore,
        )

    async def open(self) -> None:
        if nats is None:
            raise Unreachable("nats-py is not installed: pip install 'pybondi[nats]'")
        try:
            client = await self._connect()
        except (OSError, TimeoutError, nats.errors.NoServersError) as error:
            raise Unreachable(f"nats at {self.url}: {error}") from error
        try:
            await client.jetstream().account_info()
        except Exception as error:
            raise Unreachable(f"nats at {self.url} without JetStream: {error}") from error
        finally:
            await client.close()

    async def raw_consume(self, topic: str, group: str, count: int) -> int:
        client = await self._connect()
        jetstream, stream, done = client.jetstream(), self.stream(topic), 0
        api = nats.js.api
        try:
            # As the adapter's consumer: from the oldest message, explicit acks.
            config = api.ConsumerConfig(
                durable_name=group,
                filter_subject=topic,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=60,
                max_deliver=-1,
                max_ack_pending=10_000,
            )
            await jetstream.add_consumer(stream, config)
            subscription = await jetstream.pull_subscribe_bind(group, stream)
            while done < count:
                try:
                    messages = await subscription.fetch(IN_FLIGHT, 1.0)
                except TimeoutError:
                    continue
                for message in messages:
                    await message.ack()
                    done += 1
        finally:
            await client.close()
        return done

    async def cleanup(self) -> None:
        client = await self._connect()
        try:
            jetstream = client.jetstream()
            prefix = self.stream("x")[: -len("x")]
            for info in await jetstream.streams_info():
                if info.config.name and info.config.name.startswith(prefix):
                    await jetstream.delete_stream(info.config.name)
        finally:
            await client.close()


TARGETS: list[tuple[type[Target], str]] = [
    (RedisTarget, REDIS_URL),
    (RabbitMQTarget, RABBITMQ_URL),
    (NATSTarget, NATS_URL),
]


def check(label: str, condition: bool, detail: str) -> None:
    if not condition:
        raise SystemExit(f"{label}: sanity check failed: {detail}")


# Worker and relay processes --------------------------------------------------------------


class Processes:
    """`pybondi` commands run as processes of their own, logging to one file."""

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, arguments: list[str], **env: str) -> subprocess.Popen[bytes]:
        path = os.environ.get("PYTHONPATH")
        python_path = str(HERE) + (os.pathsep + path if path else "")
        process = subprocess.Popen(
            [sys.executable, "-m", "pybondi", *arguments],
            cwd=HERE.parent,
            env={**os.environ, "PYTHONPATH": python_path, **env},
            stdout=self.log,
            stderr=self.log,
        )
        self.running.append(process)
        return process

    def alive(self, process: subprocess.Popen[bytes], what: str) -> None:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}; see {self.log.name}")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM, as an operator stops workers and relays; SIGKILL after 60 s."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.running.remove(process)

    def close(self) -> None:
        for process in list(self.running):
            self.stop(process)


def worker_command(target: Target, database: Database, workers: int) -> list[str]:
    return [
        "worker", "bench_workers:consumer", *database.cli(), *target.cli(),
        "--workers", str(workers), "--redeliver-after", "60", "--log-level", "warning",
    ]  # fmt: skip


def log_count(log: IO[bytes], since: int, text: str) -> int:
    log.flush()
    with open(log.name, "rb") as read:
        read.seek(since)
        return read.read().decode(errors="replace").count(text)


# W1: scale-out ----------------------------------------------------------------------------


@dataclass
class Scale:
    broker: str
    workers: int
    rates: list[float] = field(default_factory=list)  # messages per second, per round
    retries: int = 0

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


async def scale_run(
    target: Target, database: Database, processes: Processes, workers: int, settings: Settings
) -> tuple[float, int]:
    """One W1 run: messages per second, and how many attempts failed (conflicts)."""
    count = settings.scale_messages
    topic = f"bench.scale.{workers}.{uuid.uuid4().hex[:6]}"
    await database.reset()
    await target.fill(topic, count, settings.keys)
    gate = tempfile.mkdtemp(prefix="pybondi-bench-")
    since = os.path.getsize(processes.log.name)
    process = processes.start(
        worker_command(target, database, workers),
        PYBONDI_BENCH_TOPIC=topic,
        PYBONDI_BENCH_GATE=gate,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(list(Path(gate).glob("ready-*"))) < workers:
            processes.alive(process, "the workers")
            check("W1", time.monotonic() < deadline, f"{workers} workers not ready in time")
            await asyncio.sleep(0.02)
        opened = time.time()
        Path(gate, "go").touch()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while await database.handled() < count:
            processes.alive(process, "the workers")
            check("W1", time.monotonic() < deadline, f"{count} messages not handled in time")
            await asyncio.sleep(0.05)
        finished = await database.last_handled_at()
    finally:
        processes.stop(process)
        for path in Path(gate).iterdir():
            path.unlink()
        Path(gate).rmdir()
    counted = await database.counted()
    check("W1", counted == count, f"the tallies count {counted} messages, {count} were sent")
    return count / (finished - opened), log_count(processes.log, since, " failed for <")


async def w1_scale(
    target: Target, database: Database, processes: Processes, settings: Settings
) -> list[Scale]:
    results = [Scale(target.name, workers) for workers in settings.scale_workers]
    for index in range(settings.scale_rounds):
        order = results if index % 2 == 0 else list(reversed(results))
        for result in order:
            rate, retries = await scale_run(target, database, processes, result.workers, settings)
            result.rates.append(rate)
            result.retries += retries
            print(f"  {target.name}: W1 {result.workers} worker(s): {rate:,.0f} msg/s", flush=True)
    return results


# W2: latency ------------------------------------------------------------------------------


@dataclass
class Latency:
    broker: str
    path: str
    rate: float  # messages per second sent
    total: list[float]  # seconds, per message
    legs: tuple[list[float], list[float]] | None = None  # outbox: to the broker, then on


async def w2_latency(
    target: Target,
    database: Database,
    processes: Processes,
    settings: Settings,
    relayed: bool,
    rate: float,
) -> Latency:
    topic = f"bench.latency.{'outbox' if relayed else 'direct'}.{uuid.uuid4().hex[:6]}"
    target.topics.add(topic)
    channel = f"bench_{uuid.uuid4().hex[:12]}"
    await database.reset()
    listener = await psycopg.AsyncConnection.connect(database.raw_url, autocommit=True)
    arrived: dict[int, float] = {}

    async def listen() -> None:
        async for notify in listener.notifies():
            arrived[int(notify.payload)] = time.time()

    await listener.execute(f"LISTEN {channel}")
    listening = asyncio.create_task(listen())
    worker = processes.start(
        worker_command(target, database, 1), PYBONDI_BENCH_TOPIC=topic, PYBONDI_BENCH_NOTIFY=channel
    )
    relay = None
    if relayed:
        relay = processes.start(["relay", *database.cli(), *target.cli(), "--log-level", "warning"])
    broker = target.adapter()
    outbox = Outbox(database.store, registry)
    started: dict[int, float] = {}
    ids: dict[str, int] = {}

    async def send(n: int) -> None:
        message = Message(Counted(f"k{n % settings.keys}", n))
        if relayed:
            async with Session(Messagebus(), None, outbox):
                outbox.publish(topic, message)
            started[n] = time.time()  # the session committed
            ids[str(message.id)] = n
        else:
            envelope = Envelope.seal(topic, message, registry)
            started[n] = time.time()
            await broker.asend([envelope])

    async def arrival(first: int, last: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(n in arrived for n in range(first, last)):
            processes.alive(worker, "the worker")
            if relay is not None:
                processes.alive(relay, "the relay")
            check("W2", time.monotonic() < deadline, f"messages {first}-{last} not handled")
            await asyncio.sleep(0.01)

    try:
        warmup = settings.latency_warmup
        for n in range(warmup):  # through the whole path, imports and connections included
            await send(n)
            await asyncio.sleep(0.02)
        await arrival(0, warmup, START_TIMEOUT)
        await asyncio.sleep(1.0)  # the worker's first round of housekeeping is done
        count = round(rate * settings.latency_seconds)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for index in range(count):
            await asyncio.sleep(max(0.0, begin + index / rate - loop.time()))
            await send(warmup + index)
        await arrival(warmup, warmup + count, 60.0)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        await listener.close()
        await broker.aclose()
        processes.stop(worker)
        if relay is not None:
            processes.stop(relay)
    timed = range(warmup, warmup + count)
    total = [arrived[n] - started[n] for n in timed]
    legs = None
    if relayed:
        rows = await database.query(
            f"SELECT message_id, sent_at FROM {database.schema}.pybondi_outbox"
        )
        sent = {ids[message_id]: epoch(at) for message_id, at in rows if message_id in ids}
        legs = (
            [sent[n] - started[n] for n in timed],
            [arrived[n] - sent[n] for n in timed],
        )
    return Latency(target.name, "outbox + relay" if relayed else "direct", rate, total, legs)


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


# W3: consuming, against the raw client --------------------------------------------------


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # ns per run
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


@dataclass
class Consume:
    broker: str
    messages: int
    raw: Timing
    adapter: Timing
    worker: Timing
    pooled: Timing  # the worker, on a store whose pool holds `in_flight` connections

    def rate(self, timing: Timing) -> float:
        return self.messages / (statistics.median(timing.wall) / 1e9)

    def ratio(self, timing: Timing) -> float:
        return statistics.median(timing.wall) / statistics.median(self.raw.wall)

    def cpu_ratio(self, timing: Timing) -> float:
        return statistics.median(timing.cpu) / statistics.median(self.raw.cpu)


class ConsumeBench:
    """W3 on one broker: the floor, the adapter and the worker take the same backlog."""

    def __init__(self, target: Target, database: Database, settings: Settings) -> None:
        self.target = target
        self.database = database
        self.settings = settings
        self.count = settings.consume_messages
        self.topic = f"bench.consume.{uuid.uuid4().hex[:6]}"
        self.group = ""
        self.taken = 0
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None
        # The engine's default pool keeps 5 connections (and opens up to 10 more, closed
        # again when returned): fewer than the worker's 16 sessions in flight.
        self.pooled = SQLStore(
            database.url, asynchronous=True, schema=database.schema, pool_size=IN_FLIGHT
        )

    async def prepare(self) -> None:
        """A backlog the groups of Redis and NATS read again and again; refilled for RabbitMQ."""
        await self.target.fill(self.topic, self.count, self.settings.keys)

    async def before(self, label: str) -> None:
        self.group = self.target.group(label)
        self.taken = 0
        await self.database.reset()
        if self.target.refills:
            await self.target.empty(self.topic)
            await self.target.fill(self.topic, self.count, self.settings.keys)

    async def raw(self) -> None:
        self.taken = await self.target.raw_consume(self.topic, self.group, self.count)

    async def adapter(self) -> None:
        broker = self.target.adapter()
        subscription = broker.subscribe(
            [self.topic], self.group, consumer="bench", in_flight=IN_FLIGHT, redeliver_after=60
        )
        try:
            while self.taken < self.count:
                for delivery in await subscription.receive(IN_FLIGHT, 1.0):
                    await delivery.ack()
                    self.taken += 1
        finally:
            await subscription.close()
            await broker.aclose()

    async def work(self, store: SQLStore | None = None) -> None:
        consumer = make_consumer(self.topic, group=self.group)
        store = store or self.database.store
        worker = self.worker = Worker(consumer, self.target.adapter(), store, redeliver_after=60)
        task = self.task = asyncio.create_task(worker.run())
        while worker.handled + worker.skipped < self.count:
            if task.done():
                task.result()
                raise SystemExit("W3: the worker stopped")
            await asyncio.sleep(0.002)
        self.taken = worker.handled

    async def close(self) -> None:
        """Stop a worker left running by a failure, before the cleanup deletes its streams."""
        if self.task is not None and self.worker is not None:
            self.worker.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 30)
        await self.pooled.adispose()

    async def after(self) -> None:
        if self.task is not None and self.worker is not None:
            self.worker.stop()
            await self.task
            counted = await self.database.counted()
            check(f"W3 on {self.target.name}", counted == self.count, f"counted {counted}")
            self.task = self.worker = None
        label = f"W3 on {self.target.name}"
        check(label, self.taken == self.count, f"took {self.taken} of {self.count}")

    async def compare(self) -> Consume:
        sides: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("raw", self.raw),
            ("adapter", self.adapter),
            ("worker", self.work),
            ("pooled", lambda: self.work(self.pooled)),
        ]
        timings = {label: Timing() for label, _ in sides}
        for label, run in sides:  # one warm-up run each
            await self.before(label)
            await run()
            await self.after()
        for index in range(self.settings.consume_rounds):
            order = sides if index % 2 == 0 else list(reversed(sides))
            for label, run in order:
                await self.before(label)
                await timed(run, timings[label])
                await self.after()
        return Consume(self.target.name, self.count, *timings.values())


# Results --------------------------------------------------------------------------------


def scale_table(results: list[Scale]) -> list[str]:
    head = f"{'broker':<8}  {'workers':>7}  {'msg/s':>7}  {'speedup':>7}  {'retried':>7}  runs"
    lines = [head, "-" * len(head)]
    for result in results:
        [one] = [r for r in results if r.broker == result.broker and r.workers == 1] or [result]
        runs = ", ".join(f"{rate:,.0f}" for rate in result.rates)
        lines.append(
            f"{result.broker:<8}  {result.workers:>7}  {result.rate:>7,.0f}  "
            f"{result.rate / one.rate:>6.2f}x  {result.retries:>7}  {runs}"
        )
    return lines


def latency_table(results: list[Latency]) -> list[str]:
    head = (
        f"{'broker':<8}  {'path':<14}  {'msg/s':>5}  {'msgs':>5}  {'p50 ms':>7}  {'p90 ms':>7}  "
        f"{'p99 ms':>7}  {'max ms':>7}  legs p50/p99 ms: to the broker | on to the commit"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        values = result.total
        legs = ""
        if result.legs is not None:
            out, on = result.legs
            legs = (
                f"{percentile(out, 0.5) * 1e3:.1f}/{percentile(out, 0.99) * 1e3:.1f} | "
                f"{percentile(on, 0.5) * 1e3:.1f}/{percentile(on, 0.99) * 1e3:.1f}"
            )
        lines.append(
            f"{result.broker:<8}  {result.path:<14}  {result.rate:>5g}  {len(values):>5}  "
            f"{percentile(values, 0.5) * 1e3:>7.1f}  {percentile(values, 0.9) * 1e3:>7.1f}  "
            f"{percentile(values, 0.99) * 1e3:>7.1f}  {max(values) * 1e3:>7.1f}  {legs}"
        )
    return lines


def consume_table(results: list[Consume]) -> list[str]:
    head = (
        f"{'broker':<8}  {'side':<22}  {'msg/s':>7}  {'us/msg':>7}  {'ratio':>6}  "
        f"{'cpu us/msg':>10}  {'cpu ratio':>9}"
    )
    lines = [head, "-" * len(head)]
    for result in results:
        for side, timing in (
            ("raw client (floor)", result.raw),
            ("adapter", result.adapter),
            ("worker", result.worker),
            (f"worker, pool_size={IN_FLIGHT}", result.pooled),
        ):
            us = statistics.median(timing.wall) / result.messages / 1e3
            cpu = statistics.median(timing.cpu) / result.messages / 1e3
            lines.append(
                f"{result.broker:<8}  {side:<22}  {result.rate(timing):>7,.0f}  {us:>7.1f}  "
                f"{result.ratio(timing):>6.2f}  {cpu:>10.1f}  {result.cpu_ratio(timing):>9.2f}"
            )
    return lines


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def load_average(when: str) -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # pragma: no cover - not on this platform
        return f"load average {when}: unknown"
    return f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min), {os.cpu_count()} CPUs"


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
        f"W1: {settings.scale_messages:,} messages over {settings.keys:,} keys, "
        f"{'/'.join(map(str, settings.scale_workers))} worker processes, "
        f"{settings.scale_rounds} round(s); W2: {settings.latency_seconds:g} s at a steady "
        f"rate; W3: {settings.consume_messages:,} messages, "
        f"{settings.consume_rounds} rounds, {IN_FLIGHT} at a time",
        load_average("at the start"),
    ]


# The run --------------------------------------------------------------------------------


async def open_targets(prefix: str) -> list[Target]:
    targets: list[Target] = []
    for kind, url in TARGETS:
        target = kind(url, prefix)
        try:
            await asyncio.wait_for(target.open(), CONNECT_TIMEOUT * 2)
        except TimeoutError:
            print(f"skipped: {kind.name} not reachable at {url} (no answer)", flush=True)
            continue
        except Unreachable as error:
            print(f"skipped: {' '.join(str(error).split())}", flush=True)
            continue
        targets.append(target)
    return targets


@dataclass
class Results:
    scale: list[Scale] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    consume: list[Consume] = field(default_factory=list)


async def run(settings: Settings, log_path: Path) -> Results:
    results = Results()
    prefix = f"pybondi_bench_{uuid.uuid4().hex[:12]}_"
    targets = await open_targets(prefix)
    if not targets:
        return results
    try:
        database = await Database.open()
    except Unreachable as error:
        print(f"skipped: {error}", flush=True)
        return results
    with log_path.open("wb") as log:
        processes = Processes(log)
        try:
            for target in targets:
                bench: ConsumeBench | None = None
                try:
                    results.scale += await w1_scale(target, database, processes, settings)
                    for relayed, rate in settings.latency_runs:
                        latency = await w2_latency(
                            target, database, processes, settings, relayed, rate
                        )
                        results.latency.append(latency)
                        print(f"  {target.name}: W2 {latency.path} at {rate:g}/s", flush=True)
                    bench = ConsumeBench(target, database, settings)
                    await bench.prepare()
                    results.consume.append(await bench.compare())
                    print(f"  {target.name}: W3 done", flush=True)
                finally:
                    if bench is not None:
                        await bench.close()
                    await target.cleanup()
        finally:
            processes.close()
            await database.close()
    return results


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run, for a smoke test")
    parser.add_argument(
        "--log",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench_workers.log",
        help="where the worker and relay processes log (default: %(default)s)",
    )
    arguments = parser.parse_args(argv)
    return (QUICK if arguments.quick else FULL), arguments.log


def main(argv: list[str] | None = None) -> int:
    settings, log_path = parse_args(argv)
    print("\n".join(header(settings)), flush=True)
    results = asyncio.run(run(settings, log_path))
    if not (results.scale or results.latency or results.consume):
        print("nothing measured")
        return 0
    for title, lines in (
        ("W1 scale-out: a backlog handled by N worker processes", scale_table(results.scale)),
        (
            "W2 latency: send (or outbox commit) to the handler's commit",
            latency_table(results.latency),
        ),
        ("W3 consume: the raw client, the adapter and the worker", consume_table(results.consume)),
    ):
        print(f"\n{title}\n" + "\n".join(lines))
    print()
    print(load_average("at the end"))
    print(
        f"speedup = msg/s against 1 worker, on {os.cpu_count()} CPUs shared with the servers; "
        "retried = failed attempts retried through the broker (a worker retries a conflict "
        "on a tally itself, at once); "
        "ratio = median time against the raw client's (W3); worker logs in "
        f"{log_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
