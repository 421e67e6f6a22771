"""What the outbox and relay tests share: reading the outbox's tables, and a relay's world.

The readers go around pybondi: plain SQLAlchemy queries on the outbox's tables, through
a store of their own when a test wants a second connection. `RelayRig` gives one relay
test an outbox on one SQL backend and a broker kit, both used on the kit's event loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Message, Session
from pybondi.messaging.brokers import Broker
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.messaging.relay import Relay
from pybondi.persistence import SQLStore, Store
from tests.backends import Backend
from tests.brokers import BrokerKit

T = TypeVar("T")


class OutboxRow(NamedTuple):
    topic: str
    seq: int
    message_id: str
    headers: dict[str, str]
    body: str
    sent_at: datetime | None


class Cursor(NamedTuple):
    """A topic's row of `outbox_relay`: the last seq confirmed, and the lease."""

    sent: int
    owner: str | None
    lease_until: datetime | None


def _sql(store: Store) -> SQLStore:
    assert isinstance(store, SQLStore), store
    return store


def _rows_query(store: Store) -> sa.Select[Any]:
    table = _sql(store).statements.outbox.outbox
    return sa.select(
        table.c.topic,
        table.c.seq,
        table.c.message_id,
        table.c.headers,
        table.c.body,
        table.c.sent_at,
    ).order_by(table.c.topic, table.c.seq)


def _rows(result: Sequence[Any]) -> list[OutboxRow]:
    return [
        OutboxRow(topic, seq, message_id, json.loads(headers), body, sent_at)
        for topic, seq, message_id, headers, body, sent_at in result
    ]


def _cursors_query(store: Store) -> sa.Select[Any]:
    table = _sql(store).statements.outbox.relay
    return sa.select(table.c.topic, table.c.sent, table.c.owner, table.c.lease_until)


def _cursors(result: Sequence[Any]) -> dict[str, Cursor]:
    return {topic: Cursor(sent, owner, until) for topic, sent, owner, until in result}


def _fetch(store: Store, query: sa.Select[Any]) -> list[Any]:
    engine = _sql(store).engine
    assert isinstance(engine, sa.Engine), "a sync store reads without an event loop"
    with engine.connect() as connection:
        return list(connection.execute(query).all())


async def _afetch(store: Store, query: sa.Select[Any]) -> list[Any]:
    engine = _sql(store).engine
    if not isinstance(engine, AsyncEngine):
        return await asyncio.to_thread(_fetch, store, query)
    async with engine.connect() as connection:
        return list((await connection.execute(query)).all())


def outbox_rows(store: Store) -> list[OutboxRow]:
    """Every outbox row of a sync store, by topic and seq."""
    return _rows(_fetch(store, _rows_query(store)))


async def aoutbox_rows(store: Store) -> list[OutboxRow]:
    """Every outbox row of a store, sync or async, by topic and seq."""
    return _rows(await _afetch(store, _rows_query(store)))


def cursors(store: Store) -> dict[str, Cursor]:
    """Each topic's relay cursor, of a sync store."""
    return _cursors(_fetch(store, _cursors_query(store)))


async def acursors(store: Store) -> dict[str, Cursor]:
    """Each topic's relay cursor, of a store sync or async."""
    return _cursors(await _afetch(store, _cursors_query(store)))


def seqs(rows: Sequence[OutboxRow], topic: str) -> list[int]:
    return [row.seq for row in rows if row.topic == topic]


def ids(items: Sequence[OutboxRow | Envelope | Message[Any]]) -> list[str]:
    """The message ids of rows, envelopes or messages, in order."""
    return [
        item.message_id
        if isinstance(item, OutboxRow)
        else item.id
        if isinstance(item, Envelope)
        else str(item.id)
        for item in items
    ]


# Brokers that wrap a real one -------------------------------------------------------------


class Counting(Broker):
    """A real broker that notes the size of every batch, and may inspect it first."""

    def __init__(
        self,
        inner: Broker,
        before: Callable[[Sequence[Envelope]], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.inner, self.url, self.before = inner, inner.url, before
        self.batches: list[int] = []

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        if self.before is not None:
            await self.before(envelopes)
        self.batches.append(len(envelopes))
        await self.inner.asend(envelopes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Dying(Counting):
    """A real broker that sends `alive` batches, then fails every send, as a dead relay."""

    def __init__(self, inner: Broker, alive: int) -> None:
        super().__init__(inner)
        self.alive = alive

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        if len(self.batches) >= self.alive:
            raise self._unconfirmed(envelopes, 0, "the relay died")
        await super().asend(envelopes)


class Slow(Counting):
    """A real broker that takes `seconds` before each send."""

    def __init__(self, inner: Broker, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        await asyncio.sleep(self.seconds)
        await super().asend(envelopes)


# One relay test's world -------------------------------------------------------------------


class RelayRig:
    """An outbox on one SQL backend and a broker kit, used on the kit's event loop.

    `store` is the async store the tests publish through; each relay gets a store of its
    own on the same tables (`new_store`). `close()` disposes of them all and drops the
    tables.
    """

    def __init__(self, backend: Backend, kit: BrokerKit) -> None:
        self.backend, self.kit = backend, kit
        self.prefix = f"o{uuid.uuid4().hex[:8]}_"
        self.stores: list[SQLStore] = []
        self.store = self.new_store()
        self.run(self.store.acreate_tables())

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.kit.run(work)

    def new_store(self, asynchronous: bool = True) -> SQLStore:
        """Another store on the same tables (a connection pool of its own)."""
        store = _sql(self.backend.store(asynchronous=asynchronous, prefix=self.prefix))
        self.stores.append(store)
        return store

    def relay(self, broker: Broker | None = None, **options: Any) -> Relay:
        """A relay with a store and a broker adapter of its own; `idle` kept short."""
        options.setdefault("idle", 0.05)
        return Relay(self.new_store(), broker or self.kit.make(), **options)

    async def publish(self, *batches: tuple[str, Sequence[object]]) -> list[Message[Any]]:
        """Commit one session publishing each `(topic, payloads)` to the outbox, in order."""
        outbox, messages = Outbox(self.store), []
        async with Session(publisher=outbox):
            for topic, payloads in batches:
                for payload in payloads:
                    messages.append(Message(payload))
                    outbox.publish(topic, messages[-1])
        return messages

    async def numbers(self, topic: str, count: int, start: int = 0) -> list[Message[Any]]:
        """Commit `count` messages `{"n": start}`, `{"n": start + 1}`... on `topic`."""
        return await self.publish((topic, [{"n": n} for n in range(start, start + count)]))

    async def rows(self) -> list[OutboxRow]:
        return await aoutbox_rows(self.store)

    async def cursors(self) -> dict[str, Cursor]:
        return await acursors(self.store)

    async def hold(self, topic: str, owner: str, seconds: float) -> None:
        """Take a topic's lease for `owner` and never give it back: a relay that died."""
        now = datetime.now(UTC)
        transaction = await self.store.abegin()
        try:
            await transaction.arun(
                lambda records: records.outbox.claim(
                    topic, owner, now=now, until=now + timedelta(seconds=seconds), limit=1
                )
            )
            await transaction.acommit()
        finally:
            await transaction.aclose()

    async def steal(self, topic: str, owner: str, seconds: float = 60) -> None:
        """Give a topic's lease to `owner` whoever holds it (a relay whose clock is ahead)."""
        relay = self.store.statements.outbox.relay
        until = (datetime.now(UTC) + timedelta(seconds=seconds)).replace(tzinfo=None)
        engine = self.store.engine
        assert isinstance(engine, AsyncEngine)
        async with engine.begin() as connection:
            await connection.execute(
                relay.update().where(relay.c.topic == topic).values(owner=owner, lease_until=until)
            )

    def close(self) -> None:
        async def close() -> None:
            for store in self.stores:
                await store.adispose()
            await self.store.adrop_tables()
            await self.store.adispose()

        self.run(close())


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait until `check()` holds, or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {what or check}")
        await asyncio.sleep(0.02)
