"""What the worker tests share: a consumer of tallies, a store, and workers on a real broker.

A `Tally` aggregate counts the messages handled for its key and keeps their numbers, in
the order handled. The test's producer knows what it sent; the tallies are what the
workers did, read back from the database with plain SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Aggregate, Event, Message, Root
from pybondi.messaging.consumer import Consumer, Retry
from pybondi.messaging.deadletters import DeadLetter, DeadLetters
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.worker import Worker
from pybondi.persistence import SQLStore, Store
from pybondi.persistence.repositories import StateRepository
from pybondi.persistence.serialization import Registry
from tests.backends import Backend
from tests.brokers import BrokerKit

T = TypeVar("T")

registry = Registry()


@registry.register(name="tests.Counted")
@dataclass
class Counted(Event):
    """What the producer sends: number `n` for the tally `key`."""

    key: str
    n: int


@dataclass
class Tally(Aggregate):
    """The messages handled for one key, by number, in the order handled."""

    root: Root
    numbers: list[int] = field(default_factory=list)


registry.register(Tally, name="tests.Tally")


def tallies(store: Store) -> StateRepository[Tally]:
    """The repository of each message's session."""
    return StateRepository(store, Tally, registry)


class WorkerRig:
    """One test's store (PostgreSQL, async) and broker, and the workers it starts."""

    def __init__(self, backend: Backend, kit: BrokerKit) -> None:
        self.kit = kit
        self.backend = backend
        self.store: SQLStore = self.new_store()
        self.run(self.store.acreate_tables())
        self.workers: list[Worker] = []
        self.tasks: list[asyncio.Task[None]] = []

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.kit.run(work)

    def new_store(self, asynchronous: bool = True, prefix: str | None = None) -> SQLStore:
        store = self.backend.store(asynchronous=asynchronous, prefix=prefix)
        assert isinstance(store, SQLStore)
        return store

    def consumer(self, **options: Any) -> Consumer:
        options.setdefault("retry", Retry(attempts=3, delay=0.2))
        return Consumer(None, registry, repository=tallies, **options)

    def worker(self, consumer: Consumer, **options: Any) -> Worker:
        """A worker on the rig's store and a new adapter to the kit's broker, by default."""
        options.setdefault("redeliver_after", 2.0)
        options.setdefault("grace", 5.0)
        broker = options.pop("broker", None) or self.kit.make()
        worker = Worker(consumer, broker, options.pop("store", self.store), **options)
        self.workers.append(worker)
        return worker

    def start(self, worker: Worker) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(worker.run())
        self.tasks.append(task)
        return task

    async def stop(self, worker: Worker, task: asyncio.Task[None]) -> None:
        worker.stop()
        await asyncio.wait_for(task, 30)

    async def send(self, topic: str, *payloads: object, **headers: str) -> list[Envelope]:
        envelopes = [
            Envelope.seal(topic, Message(payload, headers=dict(headers)), registry)
            for payload in payloads
        ]
        await self.send_envelopes(envelopes)
        return envelopes

    async def send_envelopes(self, envelopes: Sequence[Envelope]) -> None:
        sender = self.kit.make()
        try:
            await sender.asend(envelopes)
        finally:
            await sender.aclose()

    async def numbers(self) -> dict[str, list[int]]:
        """Each tally's numbers, as the database holds them."""
        table = self.store.statements.aggregates
        query = sa.select(table.c.stream, table.c.data)
        rows = await self._fetch(query)
        return {
            stream.removeprefix("tests.Tally-"): json.loads(data)["numbers"]
            for stream, data in rows
        }

    async def inbox(self) -> list[tuple[str, str]]:
        table = self.store.statements.inbox.inbox
        return [
            tuple(row)
            for row in await self._fetch(sa.select(table.c.consumer_group, table.c.message_id))
        ]

    async def dead_letters(self) -> list[DeadLetter]:
        return await DeadLetters(self.store).list(limit=10_000)

    async def drop(self, table: sa.Table) -> None:
        """Drop one of the store's tables, behind the workers' backs."""
        await self._ddl(table.drop)

    async def create(self, table: sa.Table) -> None:
        """Create one of the store's tables again."""
        await self._ddl(table.create)

    async def _ddl(self, change: Callable[[sa.Connection], None]) -> None:
        engine = self.store.engine
        assert isinstance(engine, AsyncEngine)
        async with engine.begin() as connection:
            await connection.run_sync(change)

    async def _fetch(self, query: sa.Select[Any]) -> list[Any]:
        engine = self.store.engine
        assert isinstance(engine, AsyncEngine)
        async with engine.connect() as connection:
            return list((await connection.execute(query)).all())

    def close(self) -> None:
        async def close() -> None:
            for worker in self.workers:
                worker.stop()
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=30)
            await self.store.adrop_tables()
            await self.store.adispose()

        self.run(close())


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A server on 127.0.0.1 that accepts connections and never answers; yields its port."""
    connections: list[asyncio.StreamWriter] = []

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass  # heard, never answered

    server = await asyncio.start_server(listen, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in connections:
            writer.transport.abort()
        await server.wait_closed()


def at_port(url: str, port: int) -> str:
    """`url`, with 127.0.0.1:`port` in place of its server's address."""
    parts = urlsplit(url)
    credentials, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{port}"))


async def eventually(
    check: Callable[[], Coroutine[Any, Any, bool]], timeout: float = 15.0, what: str = ""
) -> None:
    """Wait until the async `check` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout} s: {what or check}")
        await asyncio.sleep(0.05)
