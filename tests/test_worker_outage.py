"""The database out of reach for seconds mid-stream: the worker waits for it, then goes on.

A worker (in-process, on a real broker) reaches PostgreSQL through a TCP proxy
(tests/proxy.py) while it handles numbered messages, each in a session that takes a
little while. Once messages flow, the proxy drops every connection and refuses new ones
for longer than `redeliver_after`, then forwards again. What the assertions prove:

- no attempt was spent on the outage: no dead letter, no retry, and every message
  handled exactly once (each number once in the tallies). At most the messages under
  way at the cut are skipped as handled already: a commit cut off before its answer
  came may have committed, and the inbox finds it when the message is tried again;
- the worker took no new delivery while the store was down;
- it went on within seconds of the restore;
- the log stayed small: a few lines for the whole outage, not one per failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pybondi import Depends, Message, Root, Session
from pybondi.exceptions import NotFound
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.persistence import SQLStore
from tests.backends import POSTGRES_URL, Backend
from tests.brokers import BrokerKit
from tests.proxy import Proxy
from tests.workers import Counted, Tally, WorkerRig, at_port, eventually

pytestmark = pytest.mark.postgres

NUMBERS = 160
IN_FLIGHT = 4
HANDLING = 0.1  # seconds each session takes: messages are under way when the cut comes
BEFORE_CUT = 30  # messages handled before the cut
OUTAGE = 5.0  # seconds; more than redeliver_after (2 s)
NOTICED_WITHIN = 1.5  # seconds after the cut by which the worker knows
RESUMED_WITHIN = 5.0  # seconds after the restore by which it handled a message again


@pytest.fixture
def rig(backends: dict[str, Backend], broker: BrokerKit) -> Iterator[WorkerRig]:
    rig = WorkerRig(backends["postgres"], broker)
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy("127.0.0.1", 5432) as made:
        yield made


@pytest.fixture
def store(rig: WorkerRig, backends: dict[str, Backend], proxy: Proxy) -> Iterator[SQLStore]:
    """A store on the rig's tables, through the proxy."""
    made = SQLStore(
        at_port(POSTGRES_URL, proxy.port),
        asynchronous=True,
        schema=backends["postgres"].namespace,
        prefix=rig.store.prefix,
    )
    try:
        yield made
    finally:
        rig.run(made.adispose())


def slow_counting(rig: WorkerRig, topic: str) -> Consumer:
    """A consumer whose sessions take HANDLING seconds, so that some are under way."""
    consumer = rig.consumer(in_flight=IN_FLIGHT, retry=Retry(attempts=2, delay=0.2))

    @consumer.subscribe(topic)
    async def handle(message: Message[Counted], session: Session = Depends(current_session)):
        repository = session.repository
        try:
            tally = await repository.aget(message.payload.key)
        except NotFound:
            tally = Tally(Root(message.payload.key))
            repository.add(tally)
        await asyncio.sleep(HANDLING)
        tally.numbers.append(message.payload.n)

    return consumer


def test_a_worker_waits_out_a_database_outage_and_loses_no_attempt(
    rig: WorkerRig,
    store: SQLStore,
    proxy: Proxy,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    caplog.set_level(logging.WARNING)
    topic = rig.kit.topic()
    consumer = slow_counting(rig, topic)
    times: dict[str, float] = {}
    received: dict[str, int] = {}
    skipped = [0]

    async def outage() -> None:
        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(NUMBERS)))
        worker = rig.worker(consumer, store=store)
        task = rig.start(worker)

        async def flowing() -> bool:
            return worker.handled >= BEFORE_CUT

        await eventually(flowing, what=f"{BEFORE_CUT} messages handled")
        times["cut"] = time.time()
        proxy.cut()
        await asyncio.sleep(NOTICED_WITHIN)
        received["noticed"], handled = worker.received, worker.handled
        await asyncio.sleep(OUTAGE - NOTICED_WITHIN)
        received["restore"] = worker.received
        assert worker.handled == handled, "messages were handled without the database"
        times["restore"] = time.time()
        proxy.restore()

        async def resumed() -> bool:
            return worker.handled > handled

        await eventually(resumed, RESUMED_WITHIN, "a message handled after the restore")
        times["resumed"] = time.time()

        async def all_handled() -> bool:  # or skipped: see test_a_commit_cut_off_...
            return worker.handled + worker.skipped == NUMBERS

        await eventually(all_handled, 60, "every message handled")
        await rig.stop(worker, task)
        assert (worker.retried, worker.dead_lettered) == (0, 0)
        assert worker.skipped <= IN_FLIGHT
        skipped[0] = worker.skipped

    rig.run(outage())
    assert received["restore"] == received["noticed"], "deliveries were taken while it was down"
    assert rig.run(rig.dead_letters()) == []
    numbers = rig.run(rig.numbers())
    assert numbers == {f"k{n}": [n] for n in range(NUMBERS)}  # each handled exactly once
    during = [
        record
        for record in caplog.records
        if times["cut"] <= record.created <= times["resumed"] + 1
    ]
    messages = [record.getMessage() for record in during]
    assert any("store unreachable" in text for text in messages), messages
    assert any("store reachable again" in text for text in messages), messages
    assert len(during) <= 10, messages
    # pybondi raises a lost connection's error once: psycopg adds nothing per connection.
    assert not [record for record in during if record.name.startswith("psycopg")], messages
    note = {
        "broker": rig.kit.name,
        "log_records_in_outage": len(during),
        "resumed_after_restore_s": round(times["resumed"] - times["restore"], 2),
        "connections_refused_in_outage": proxy.refused,
        "skipped": skipped[0],
    }
    for key, value in note.items():
        record_property(key, value)
    print(f"worker outage test: {json.dumps(note)}")


def test_a_stop_during_an_outage_leaves_the_waiting_messages_to_the_group(
    rig: WorkerRig, store: SQLStore, proxy: Proxy
) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        consumer = slow_counting(rig, topic)
        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(20)))
        first = rig.worker(consumer, store=store)
        task = rig.start(first)

        async def flowing() -> bool:
            return first.handled >= 5

        await eventually(flowing, what="5 messages handled")
        proxy.cut()
        await asyncio.sleep(NOTICED_WITHIN)
        stopped = time.monotonic()
        await rig.stop(first, task)
        took = time.monotonic() - stopped
        assert took < 1.0, f"run() returned {took:.1f} s after stop()"  # nothing to wait for
        proxy.restore()
        second = rig.worker(consumer)  # on the rig's own store

        async def all_counted() -> bool:
            return len(await rig.numbers()) == 20

        task = rig.start(second)
        await eventually(all_counted, 30, "every message handled by the second worker")
        await rig.stop(second, task)
        assert await rig.numbers() == {f"k{n}": [n] for n in range(20)}
        assert await rig.dead_letters() == []
        assert first.retried == second.retried == 0

    rig.run(test())


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
def test_a_commit_cut_off_before_its_answer_is_skipped_when_tried_again(
    rig: WorkerRig, backends: dict[str, Backend], proxy: Proxy, pipelined: bool
) -> None:
    """The server commits a message's session, and the worker never learns it.

    The message waits out the outage as the others do; when it is tried again, its
    inbox row, committed, skips it. Each number once in the tallies, and every message
    settled: handled, or skipped (the outage test above used to wait for every message
    handled, which a cut that lands on a COMMIT made impossible).
    """
    store = SQLStore(
        at_port(POSTGRES_URL, proxy.port),
        asynchronous=True,
        schema=backends["postgres"].namespace,
        prefix=rig.store.prefix,
        pipelined=pipelined,
    )

    async def test() -> None:
        topic = rig.kit.topic()
        consumer = slow_counting(rig, topic)
        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(20)))
        worker = rig.worker(consumer, store=store)
        task = rig.start(worker)

        async def flowing() -> bool:  # past the inbox purge at the start, which commits
            return worker.handled >= 2

        await eventually(flowing, what="2 messages handled")
        proxy.cut_after(b"COMMIT")

        async def cut() -> bool:
            return proxy.refused > 0

        await eventually(cut, what="the cut after a COMMIT")
        await asyncio.sleep(OUTAGE / 2)
        proxy.restore()

        async def all_settled() -> bool:
            return worker.handled + worker.skipped == 20

        await eventually(all_settled, 30, "every message handled or skipped")
        await rig.stop(worker, task)
        assert 1 <= worker.skipped <= IN_FLIGHT  # the one cut off, found in the inbox
        assert (worker.retried, worker.dead_lettered) == (0, 0)

    try:
        rig.run(test())
    finally:
        rig.run(store.adispose())
    assert rig.run(rig.numbers()) == {f"k{n}": [n] for n in range(20)}
    assert rig.run(rig.dead_letters()) == []
