"""A worker's batches (`Worker(batch=N)`): on the memory store and the in-process broker,
then on PostgreSQL and Redis (async, sync and pipelined stores), and on SQLite.

Which messages share a transaction is read from the sessions themselves: a batched
session's `transaction` is a view of its batch's (`.batch`). The broker runs on a
`ManualClock`, so a retry 300 s on is due when the test advances it.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from pybondi import Depends, Message, Root, Session, current_connection
from pybondi.exceptions import NotFound
from pybondi.messaging.brokers.memory import ManualClock, MemoryBroker, Pending
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.worker import Worker
from pybondi.persistence import MemoryStore, SQLStore
from tests.backends import Backend
from tests.brokers import MemoryKit, RedisKit
from tests.outboxes import aoutbox_rows
from tests.workers import Counted, Tally, WorkerRig, eventually, registry, tallies

TOPIC = "tests.batches"


class Run:
    """A worker on a memory store and broker, and what its handler saw."""

    def __init__(self, batch: int, *, key: bool = True, attempts: int = 3, **options: Any):
        self.clock = ManualClock()
        self.broker = MemoryBroker("memory://batches", clock=self.clock)
        self.store = MemoryStore()
        self.consumer = Consumer(
            None,
            registry,
            repository=tallies,
            retry=Retry(attempts=attempts, delay=300),
            key=(lambda message: message.payload.key) if key else None,
            **options,
        )
        self.batch = batch
        self.transactions: dict[int, object] = {}  # message number -> its batch, if any
        self.runs: defaultdict[int, int] = defaultdict(int)  # handler runs per number
        self.committed: list[int] = []  # on_commit actions run, by number

    def handler(self, poisoned: Collection[int] = ()) -> None:
        @self.consumer.subscribe(TOPIC)
        async def count(message: Message[Counted], session: Session = Depends(current_session)):
            key, n = message.payload.key, message.payload.n
            self.runs[n] += 1
            self.transactions[n] = getattr(session.transaction, "batch", None)
            session.on_commit(lambda: self.committed.append(n))
            if n in poisoned:
                raise RuntimeError(f"message {n} always fails")
            try:
                tally = await session.repository.aget(key)
            except NotFound:
                tally = Tally(Root(key))
                session.repository.add(tally)
            tally.numbers.append(n)

    def send(self, *numbers: tuple[str, int]) -> list[Envelope]:
        envelopes = [Envelope.seal(TOPIC, Message(Counted(k, n)), registry) for k, n in numbers]
        self.broker.send(envelopes)
        return envelopes

    async def until(self, worker: Worker, done: Callable[[], bool], what: str) -> None:
        async def check() -> bool:
            pending = self.broker.pending([TOPIC], self.consumer.group)
            return done() and pending.ready == pending.in_flight == 0

        await eventually(check, what=what)

    def work(self, scenario: Callable[[Worker], Awaitable[None]], grace: float = 2) -> Worker:
        async def main() -> Worker:
            worker = Worker(self.consumer, self.broker, self.store, batch=self.batch, grace=grace)
            task = asyncio.create_task(worker.run())
            try:
                await scenario(worker)
            finally:
                worker.stop()
                await task
            return worker

        return asyncio.run(main())

    async def numbers(self, key: str) -> list[int]:
        async with Session(repository=tallies(self.store)) as session:
            try:
                tally = await session.repository.aget(key)
            except NotFound:
                return []
            return list(tally.numbers)

    async def inbox(self, envelopes: list[Envelope]) -> list[bool]:
        group = self.consumer.group
        return await self.store.atransact(
            lambda records: [records.inbox.has(group, envelope.id) for envelope in envelopes]
        )

    def batches(self) -> dict[object, list[int]]:
        """The numbers each batch's transaction handled (the batch's last try of each)."""
        batches: defaultdict[object, list[int]] = defaultdict(list)
        for n, transaction in sorted(self.transactions.items()):
            if transaction is not None:
                batches[transaction].append(n)
        return dict(batches)


def test_messages_received_together_commit_in_batches_of_at_most_the_bound() -> None:
    run = Run(batch=4, in_flight=16)
    run.handler()
    envelopes = run.send(*((f"k{n}", n) for n in range(10)))

    async def scenario(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled == 10, "ten handled")
        assert all(await run.inbox(envelopes))
        for n in range(10):
            assert await run.numbers(f"k{n}") == [n]

    worker = run.work(scenario)
    sizes = sorted(len(numbers) for numbers in run.batches().values())
    assert sizes == [2, 4, 4]  # 10 received at once: 4 + 4 + 2, each in one transaction
    assert (worker.handled, worker.skipped, worker.retried, worker.dead_lettered) == (10, 0, 0, 0)
    assert sorted(run.committed) == list(range(10))  # each on_commit once, after the commit
    assert all(count == 1 for count in run.runs.values())


def test_a_batch_never_holds_two_messages_of_one_key_and_each_key_keeps_its_order() -> None:
    run = Run(batch=16, in_flight=16)
    run.handler()
    run.send(*((f"k{n % 3}", n) for n in range(15)))

    async def scenario(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled == 15, "fifteen handled")
        for k in range(3):
            assert await run.numbers(f"k{k}") == list(range(k, 15, 3))  # in order sent

    run.work(scenario)
    batches = run.batches()
    assert len(batches) == 5  # one message of each key per batch
    for numbers in batches.values():
        assert sorted(n % 3 for n in numbers) == [0, 1, 2], numbers


def test_without_a_key_every_message_received_together_may_share_a_batch() -> None:
    run = Run(batch=16, in_flight=16, key=False)
    run.handler()
    run.send(*(("k", n) for n in range(6)))

    async def scenario(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled == 6, "six handled")

    run.work(scenario)
    assert [sorted(numbers) for numbers in run.batches().values()] == [list(range(6))]


@pytest.mark.parametrize("batch", [1, 8])
def test_a_poisoned_message_fails_its_batch_and_is_retried_then_dead_lettered_alone(
    batch: int,
) -> None:
    """The same outcome with and without batches: only the handler's runs differ."""
    run = Run(batch=batch, in_flight=16, attempts=2)
    run.handler(poisoned={3})
    envelopes = run.send(*((f"k{n}", n) for n in range(6)))

    async def scenario(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled == 5 and worker.retried == 1, "retried")
        assert run.broker.pending([TOPIC], run.consumer.group) == Pending(0, 0, 1, 300.0)
        run.clock.advance(300)
        await run.until(worker, lambda: worker.dead_lettered == 1, "dead-lettered")
        for n in range(6):
            assert await run.numbers(f"k{n}") == ([] if n == 3 else [n])
        assert all(await run.inbox(envelopes))  # the dead letter holds its inbox row
        letters = await run.store.atransact(lambda records: records.dead_letters.page())
        assert [(letter.message_id, letter.attempts) for letter in letters] == [
            (envelopes[3].id, 2)
        ]

    worker = run.work(scenario)
    assert (worker.handled, worker.skipped, worker.retried, worker.dead_lettered) == (5, 0, 1, 1)
    assert sorted(run.committed) == [0, 1, 2, 4, 5]  # never for a batch rolled back
    if batch == 1:
        assert run.runs[3] == 2  # its two attempts
    else:  # it ran in the batch, which failed (no attempt counted), then its two attempts
        assert run.runs[3] == 3
        assert run.runs[0] == 2  # in the batch that failed, then alone
        assert all(transaction is None for transaction in run.transactions.values())


def test_a_message_delivered_twice_in_one_batch_is_handled_once() -> None:
    run = Run(batch=8, in_flight=8, key=False)
    run.handler()
    (envelope,) = run.send(("k", 1))
    run.broker.send([envelope])  # the producer sent it again

    async def scenario(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled + worker.skipped == 2, "both settled")
        assert await run.numbers("k") == [1]

    worker = run.work(scenario)
    assert (worker.handled, worker.skipped) == (1, 1)
    assert run.runs[1] == 1


def test_a_stop_lets_a_batch_under_way_commit_and_acknowledges_it() -> None:
    run = Run(batch=8, in_flight=8)
    started, release = asyncio.Event(), asyncio.Event()

    @run.consumer.subscribe(TOPIC)
    async def slow(message: Message[Counted], session: Session = Depends(current_session)):
        run.transactions[message.payload.n] = getattr(session.transaction, "batch", None)
        started.set()
        await release.wait()
        session.repository.add(Tally(Root(message.payload.key), [message.payload.n]))

    run.send(*((f"k{n}", n) for n in range(4)))

    async def scenario(worker: Worker) -> None:
        await asyncio.wait_for(started.wait(), 5)
        worker.stop()  # within the grace: the batch goes on, commits, and is acknowledged
        release.set()
        await run.until(worker, lambda: worker.handled == 4, "the batch settled")

    worker = run.work(scenario)
    assert worker.handled == 4
    assert len(run.batches()) == 1
    assert run.broker.pending([TOPIC], run.consumer.group) == Pending(0, 0, 0, None)


def test_a_batch_still_under_way_after_the_grace_rolls_back_and_comes_back() -> None:
    run = Run(batch=8, in_flight=8)
    started, stuck = asyncio.Event(), {0}

    @run.consumer.subscribe(TOPIC)
    async def handle(message: Message[Counted], session: Session = Depends(current_session)):
        n = message.payload.n
        run.runs[n] += 1
        if n in stuck:
            started.set()
            await asyncio.sleep(60)  # past the grace: cancelled
        session.repository.add(Tally(Root(message.payload.key), [n]))

    envelopes = run.send(*((f"k{n}", n) for n in range(4)))

    async def stopped(worker: Worker) -> None:
        await asyncio.wait_for(started.wait(), 5)
        worker.stop()

    first = run.work(stopped, grace=0.2)
    assert first.handled == 0
    assert run.broker.pending([TOPIC], run.consumer.group).in_flight == 0
    assert not any(asyncio.run(run.inbox(envelopes)))  # nothing of the batch committed
    stuck.clear()

    async def drained(worker: Worker) -> None:
        await run.until(worker, lambda: worker.handled == 4, "all four handled")
        for n in range(4):
            assert await run.numbers(f"k{n}") == [n]

    second = run.work(drained)
    assert (second.handled, second.skipped) == (4, 0)


@pytest.mark.parametrize("batch", [0, -1, True, 2.0])
def test_a_worker_refuses_a_batch_that_is_no_count(batch: Any) -> None:
    consumer = Consumer(None, registry)

    @consumer.subscribe(TOPIC)
    async def nothing(message: Message[Counted]) -> None: ...

    with pytest.raises(ValueError, match="batch is how many messages"):
        Worker(consumer, MemoryBroker(), MemoryStore(), batch=batch)


# On PostgreSQL and Redis ---------------------------------------------------------------


@pytest.fixture
def rig(backends: dict[str, Backend]) -> Iterator[WorkerRig]:
    kit = RedisKit()
    kit.start()
    try:
        rig = WorkerRig(backends["postgres"], kit)
        try:
            yield rig
        finally:
            rig.close()
    finally:
        kit.close()


@pytest.mark.postgres
def test_batches_on_postgresql_and_redis_commit_together_and_fall_back_alone(
    rig: WorkerRig,
) -> None:
    """Batches of one transaction each; a poisoned message's batch goes on one by one."""
    poisoned, seen = 7, defaultdict[int, list[object]](list)
    topic, out = rig.kit.topic(), rig.kit.topic("out")
    consumer = rig.consumer(
        in_flight=16, key=lambda message: message.payload.key, retry=Retry(attempts=2, delay=0.2)
    )

    @consumer.subscribe(topic)
    async def handle(
        message: Message[Counted],
        session: Session = Depends(current_session),
        connection: AsyncConnection = Depends(current_connection),
    ) -> None:
        n = message.payload.n
        seen[n].append(getattr(session.transaction, "batch", None))
        await connection.exec_driver_sql("SELECT 1")  # the batch's own connection
        session.publisher.publish(out, Message({"seen": n}))  # in the batch's outbox
        if n == poisoned:
            raise RuntimeError("poisoned")
        try:
            tally = await session.repository.aget(message.payload.key)
        except NotFound:
            tally = Tally(Root(message.payload.key))
            session.repository.add(tally)
        tally.numbers.append(n)

    async def test() -> None:
        sent = await rig.send(topic, *(Counted(f"k{n % 6}", n) for n in range(60)))
        worker = rig.worker(consumer, batch=8)
        task = rig.start(worker)

        async def settled() -> bool:
            return worker.handled == 59 and worker.dead_lettered == 1

        await eventually(settled, what="59 handled, 1 dead-lettered")
        await rig.stop(worker, task)
        numbers = await rig.numbers()
        assert numbers == {f"k{k}": [n for n in range(k, 60, 6) if n != poisoned] for k in range(6)}
        assert sorted(await rig.inbox()) == sorted((consumer.group, e.id) for e in sent)
        assert [letter.attempts for letter in await rig.dead_letters()] == [2]
        assert (worker.retried, worker.skipped) == (1, 0)
        published = [row for row in await aoutbox_rows(rig.store) if row.topic == out]
        causes = sorted(row.headers["causation-id"] for row in published)
        assert causes == sorted(e.id for n, e in enumerate(sent) if n != poisoned)

    rig.run(test())
    committed = defaultdict(list)  # each message's last run: the one that committed
    for n, transactions in seen.items():
        if transactions[-1] is not None:
            committed[transactions[-1]].append(n)
    assert committed, "no batch committed"
    assert max(len(numbers) for numbers in committed.values()) > 1
    for numbers in committed.values():
        assert len(numbers) <= 8
        assert len({n % 6 for n in numbers}) == len(numbers)  # one message per key
    assert seen[poisoned][-2:] == [None, None]  # its two attempts, each alone


@pytest.mark.postgres
def test_a_sync_store_runs_its_batches_in_a_thread(rig: WorkerRig) -> None:
    store = rig.new_store(asynchronous=False, prefix=rig.store.prefix)  # the same tables
    consumer = Consumer(None, registry, repository=tallies, in_flight=8)
    topic = rig.kit.topic()
    batches: list[object] = []

    @consumer.subscribe(topic)
    def handle(message: Message[Counted], session: Session = Depends(current_session)) -> None:
        batches.append(getattr(session.transaction, "batch", None))
        session.repository.add(Tally(Root(message.payload.key), [message.payload.n]))

    async def test() -> None:
        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(8)))
        worker = rig.worker(consumer, store=store, batch=8)
        task = rig.start(worker)

        async def done() -> bool:
            return worker.handled == 8

        await eventually(done, what="8 handled")
        await rig.stop(worker, task)
        store.dispose()
        assert await rig.numbers() == {f"k{n}": [n] for n in range(8)}

    rig.run(test())
    shared = Counter(id(batch) for batch in batches if batch is not None)
    assert shared and max(shared.values()) > 1, batches  # messages shared a transaction


def tally_poisoned_at_3(consumer: Consumer, topic: str) -> list[object]:
    """Subscribe a handler that tallies each number but fails on 3; the batches it ran in.

    Each item is the batch's transaction a message was handled in, None when alone.
    """
    batches: list[object] = []

    @consumer.subscribe(topic)
    async def handle(message: Message[Counted], session: Session = Depends(current_session)):
        batches.append(getattr(session.transaction, "batch", None))
        if message.payload.n == 3:
            raise RuntimeError("poisoned")
        session.repository.add(Tally(Root(message.payload.key), [message.payload.n]))

    return batches


@pytest.mark.postgres
def test_batches_on_a_pipelined_store_commit_and_fall_back_alike(rig: WorkerRig) -> None:
    store = rig.backend.store(asynchronous=True, prefix=rig.store.prefix, pipelined=True)
    consumer = rig.consumer(in_flight=8, retry=Retry(attempts=1))
    topic = rig.kit.topic()
    batches = tally_poisoned_at_3(consumer, topic)

    async def test() -> None:
        sent = await rig.send(topic, *(Counted(f"k{n}", n) for n in range(8)))
        worker = rig.worker(consumer, store=store, batch=8)
        task = rig.start(worker)

        async def done() -> bool:
            return worker.handled == 7 and worker.dead_lettered == 1

        await eventually(done, what="7 handled, 1 dead-lettered")
        await rig.stop(worker, task)
        assert isinstance(store, SQLStore)
        await store.adispose()
        assert await rig.numbers() == {f"k{n}": [n] for n in range(8) if n != 3}
        assert sorted(await rig.inbox()) == sorted((consumer.group, e.id) for e in sent)

        # Then a batch that commits, on the same pipelined connections.
        more = await rig.send(topic, *(Counted(f"j{n}", n) for n in range(10, 18)))
        worker = rig.worker(consumer, store=store, batch=8)
        task = rig.start(worker)

        async def all_handled() -> bool:
            return worker.handled == 8

        await eventually(all_handled, what="8 more handled")
        await rig.stop(worker, task)
        await store.adispose()
        assert len(await rig.inbox()) == len(sent) + len(more)

    rig.run(test())
    assert any(batch is not None for batch in batches)


@pytest.mark.sqlite
def test_batches_on_sqlite_commit_and_fall_back_alike(backends: dict[str, Backend]) -> None:
    kit = MemoryKit(clock=ManualClock())
    kit.start()
    rig = WorkerRig(backends["sqlite"], kit)
    consumer = rig.consumer(in_flight=8, retry=Retry(attempts=1))
    topic = kit.topic()
    batches = tally_poisoned_at_3(consumer, topic)

    async def test() -> None:
        sent = await rig.send(topic, *(Counted(f"k{n}", n) for n in range(8)))
        worker = rig.worker(consumer, batch=8)
        task = rig.start(worker)

        async def done() -> bool:
            return worker.handled == 7 and worker.dead_lettered == 1

        await eventually(done, what="7 handled, 1 dead-lettered")
        await rig.stop(worker, task)
        assert await rig.numbers() == {f"k{n}": [n] for n in range(8) if n != 3}
        assert sorted(await rig.inbox()) == sorted((consumer.group, e.id) for e in sent)

    try:
        rig.run(test())
    finally:
        rig.close()
        kit.close()
    batched = [batch for batch in batches if batch is not None]
    assert len(batched) >= 2 and len(set(map(id, batched))) == 1  # the batch that failed
