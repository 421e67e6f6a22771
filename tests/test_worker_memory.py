"""A worker (pybondi.messaging.worker) consuming from the in-process broker into SQLite.

The broker runs on a `ManualClock`: a retry 300 s on is due when the test advances it,
with no real waiting; `MemoryBroker.pending()` tells when everything is settled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pybondi import Depends, Message, Root, Session
from pybondi.cli.running import open_store
from pybondi.exceptions import NotFound
from pybondi.messaging.brokers.memory import ManualClock, Pending
from pybondi.messaging.consumer import Retry, current_session
from pybondi.persistence import SQLStore
from tests.backends import Backend
from tests.brokers import MemoryKit
from tests.workers import Counted, Tally, WorkerRig, eventually

pytestmark = pytest.mark.sqlite


@pytest.fixture
def rig(backends: dict[str, Backend]) -> Iterator[WorkerRig]:
    kit = MemoryKit(clock=ManualClock())
    kit.start()
    try:
        rig = WorkerRig(backends["sqlite"], kit)
        try:
            yield rig
        finally:
            rig.close()
    finally:
        kit.close()


def test_a_worker_consumes_from_the_memory_broker(rig: WorkerRig) -> None:
    failing = {1}  # the first try of message 1 (of k1) fails

    consumer = rig.consumer(retry=Retry(attempts=3, delay=300))
    topic = rig.kit.topic()

    @consumer.subscribe(topic)
    async def count(message: Message[Counted], session: Session = Depends(current_session)):
        key, n = message.payload.key, message.payload.n
        if n in failing:
            failing.remove(n)
            raise RuntimeError(f"message {n} fails once")
        try:
            tally = await session.repository.aget(key)
        except NotFound:
            tally = Tally(Root(key))
            session.repository.add(tally)
        tally.numbers.append(message.payload.n)

    async def test() -> None:
        assert isinstance(rig.kit, MemoryKit)
        broker, clock = rig.kit.shared(), rig.kit.clock
        assert isinstance(clock, ManualClock)
        await rig.send(topic, *(Counted(f"k{n % 3}", n) for n in range(9)))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def settled() -> bool:
            pending = broker.pending([topic], consumer.group)
            return pending == Pending(0, 0, 1, 300.0) and worker.handled == 8

        await eventually(settled, what="everything settled but the retry")
        assert worker.retried == 1
        clock.advance(300)  # message 1 waits 300 s on the broker's clock, not ours

        async def done() -> bool:
            pending = broker.pending([topic], consumer.group)
            return pending == Pending(0, 0, 0, None) and worker.handled == 9

        await eventually(done, what="the retry handled")
        await rig.stop(worker, task)
        numbers = await rig.numbers()
        assert sorted(n for values in numbers.values() for n in values) == list(range(9))
        assert numbers["k1"][-1] == 1  # the retried message last
        assert (worker.handled, worker.retried, worker.dead_lettered) == (9, 1, 0)
        assert len(await rig.inbox()) == 9

    rig.run(test())


@pytest.mark.parametrize(("pool_size", "warned"), [(4, True), (18, False)])
def test_a_worker_warns_when_the_stores_pool_keeps_fewer_connections_than_its_messages_in_flight(
    rig: WorkerRig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    pool_size: int,
    warned: bool,
) -> None:
    caplog.set_level(logging.WARNING, "pybondi.messaging.worker")
    store = SQLStore(f"sqlite:///{tmp_path}/pool.db", asynchronous=True, pool_size=pool_size)
    assert store.connections == pool_size
    consumer = rig.consumer(in_flight=16)

    @consumer.subscribe(rig.kit.topic())
    async def nothing(message: Message[Counted]) -> None: ...

    async def test() -> None:
        await store.acreate_tables()
        worker = rig.worker(consumer, store=store)
        await rig.stop(worker, rig.start(worker))
        await store.adispose()

    rig.run(test())
    warnings = [r.getMessage() for r in caplog.records if "pool_size=18" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0), warnings


@pytest.mark.parametrize("database", ["pool.db", ""], ids=["file", "in-memory"])
def test_the_clis_store_keeps_a_connection_per_message_in_flight_on_sqlite(
    tmp_path: Path, database: str
) -> None:
    """`pybondi worker` sizes a SQLite file's pool as a server's (its warning says it does).

    An in-memory database keeps its one connection, whose pool takes no size.
    """
    url = f"sqlite:///{tmp_path / database}" if database else "sqlite://"
    arguments = argparse.Namespace(store=url, schema=None, prefix="pybondi_")
    store = open_store(arguments, asynchronous=True, connections=18)
    assert store is not None
    assert store.connections == (18 if database else None)
    asyncio.run(store.adispose())
