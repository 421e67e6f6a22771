"""What only the in-process broker does: its clock, `pending()`, shared names, threads.

What every broker does is the contract suite's (tests/test_broker_contract.py), which
runs on this one too; tests/test_worker_memory.py runs a worker on it. This module needs
pybondi and pytest only: no broker client, no database driver.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pybondi import Message
from pybondi.exceptions import PublishError
from pybondi.messaging.brokers import MemoryBroker, connect
from pybondi.messaging.brokers.base import Delivery
from pybondi.messaging.brokers.memory import ManualClock, Pending, forget, shared
from pybondi.messaging.envelope import Envelope

START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def run(test: Coroutine[Any, Any, None]) -> None:
    asyncio.run(test)


def envelopes(topic: str, count: int) -> list[Envelope]:
    """`count` messages for `topic`: payloads {"n": 0}, {"n": 1}..."""
    return [Envelope.seal(topic, Message({"n": n})) for n in range(count)]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def broker(clock: ManualClock) -> MemoryBroker:
    return MemoryBroker(clock=clock)


# The clock ------------------------------------------------------------------------------


def test_a_retry_300_s_on_comes_when_the_clock_is_advanced_300_s(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    async def test() -> None:
        [sent] = envelopes("orders", 1)
        await broker.asend([sent])
        subscription = broker.subscribe(["orders"], "billing", consumer="c1")
        [first] = await subscription.receive(10, wait=0)
        assert first.timestamp == START  # the clock's time when sent

        await first.retry(300)
        clock.advance(299.5)
        assert await subscription.receive(10, wait=0) == []
        # A receive waiting for 30 real seconds wakes up as soon as the retry is due.
        waiting = asyncio.ensure_future(subscription.receive(10, wait=30.0))
        await asyncio.sleep(0.05)
        clock.advance(0.5)
        [again] = await asyncio.wait_for(waiting, 5.0)
        assert (again.envelope, again.attempt, again.timestamp) == (sent, 2, START)
        assert clock.now() == START + timedelta(seconds=300)

    run(test())


def test_a_manual_clock_only_goes_forward() -> None:
    clock = ManualClock()
    for wrong in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="only moves forward"):
            clock.advance(wrong)
    with pytest.raises(ValueError, match="time zone"):
        ManualClock(datetime(2024, 5, 1))
    clock.advance(0)
    assert clock.monotonic() == 0.0


# pending() --------------------------------------------------------------------------------


def test_pending_says_what_a_group_has_ready_in_flight_and_delayed(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    async def test() -> None:
        topics = ["orders", "refunds"]
        await broker.asend(envelopes("orders", 3) + envelopes("refunds", 1))
        # A group that never subscribed gets every message kept: all ready.
        assert broker.pending(topics, "billing") == Pending(4, 0, 0, None)

        subscription = broker.subscribe(topics, "billing", consumer="c1", redeliver_after=60)
        first, second, third = await subscription.receive(3, wait=0)
        assert broker.pending(topics, "billing") == Pending(1, 3, 0, None)
        await first.ack()
        await second.retry(30)
        assert broker.pending(topics, "billing") == Pending(1, 1, 1, 30.0)
        assert broker.pending(["orders"], "billing") == Pending(0, 1, 1, 30.0)

        clock.advance(30)  # the retry is due
        assert broker.pending(topics, "billing") == Pending(2, 1, 0, None)
        clock.advance(30)  # `third` was held for redeliver_after: back, ready
        assert broker.pending(topics, "billing") == Pending(3, 0, 0, None)
        await third.ack()  # a delivery handed out again can still be settled
        assert broker.pending(topics, "billing") == Pending(2, 0, 0, None)

        for delivery in await subscription.receive(10, wait=0):
            await delivery.ack()
        assert broker.pending(topics, "billing") == Pending(0, 0, 0, None)  # done
        assert broker.pending(topics, "shipping") == Pending(4, 0, 0, None)  # another group

    run(test())


# Deliveries handed out again, closed subscriptions -------------------------------------


def test_a_delivery_handed_out_again_settles_its_message_once(
    broker: MemoryBroker, clock: ManualClock
) -> None:
    async def test() -> None:
        [sent] = envelopes("orders", 1)
        await broker.asend([sent])
        slow = broker.subscribe(["orders"], "billing", consumer="slow", redeliver_after=10)
        quick = broker.subscribe(["orders"], "billing", consumer="quick", redeliver_after=10)
        [stale] = await slow.receive(10, wait=0)
        clock.advance(10)
        [current] = await quick.receive(10, wait=0)
        assert current.attempt == 2

        await stale.extend()  # not its own any more: nothing
        clock.advance(10)
        [third] = await slow.receive(10, wait=0)  # `quick` went silent too
        assert third.attempt == 3
        await stale.ack()  # as on Redis: whoever acknowledges, the message is done
        await current.retry(0)  # settled already: nothing more
        await third.ack()
        assert broker.pending(["orders"], "billing") == Pending(0, 0, 0, None)

    run(test())


def test_a_closed_subscription_gives_back_at_once_and_settles_nothing(
    broker: MemoryBroker,
) -> None:
    async def test() -> None:
        await broker.asend(envelopes("orders", 1))
        gone = broker.subscribe(["orders"], "billing", consumer="gone", redeliver_after=600)
        [held] = await gone.receive(10, wait=0)
        await gone.close()

        with pytest.raises(ConnectionError, match="is closed"):
            await held.ack()
        with pytest.raises(ConnectionError, match="is closed"):
            await held.retry(1)
        with pytest.raises(RuntimeError, match="subscribe again"):
            await gone.receive(10, wait=0)
        heir = broker.subscribe(["orders"], "billing", consumer="heir")
        [back] = await heir.receive(10, wait=0)  # at once, not after redeliver_after
        assert (back.envelope, back.attempt) == (held.envelope, 2)

    run(test())


# What is kept -----------------------------------------------------------------------------


def test_the_broker_keeps_copies_and_refuses_what_no_broker_carries(
    broker: MemoryBroker,
) -> None:
    async def test() -> None:
        first, second = envelopes("orders", 2)
        bad = Envelope("orders", "m-3", {"count": 3}, b"{}")  # type: ignore[dict-item]
        with pytest.raises(PublishError, match="not text names and values") as raised:
            await broker.asend([first, bad, second])
        assert raised.value.unconfirmed == [bad, second]
        assert broker.messages("orders") == [first]  # what came before the bad one

        first.headers["tenant"] = "changed after sending"
        [kept] = broker.messages("orders")
        assert "tenant" not in kept.headers
        subscription = broker.subscribe(["orders"], "billing", consumer="c1")
        [delivery] = await subscription.receive(10, wait=0)
        delivery.envelope.headers["note"] = "changed by a handler"
        assert broker.messages("orders") == [kept]

        await broker.asend([Envelope("orders", "", {}, b"bare")])
        assert broker.messages("orders")[-1].id == "orders/2"  # the broker's own id

    run(test())


def test_broker_options_are_checked(broker: MemoryBroker) -> None:
    with pytest.raises(ValueError, match="list of topics"):
        broker.subscribe("orders", "billing", consumer="c1")
    with pytest.raises(ValueError, match="group and a consumer"):
        broker.subscribe(["orders"], "", consumer="c1")
    with pytest.raises(ValueError, match="redeliver_after"):
        broker.subscribe(["orders"], "billing", consumer="c1", redeliver_after=0)


# Shared by name ---------------------------------------------------------------------------


def test_connect_gives_the_process_s_broker_of_a_name() -> None:
    url = "memory://test-shared"
    clock = ManualClock()
    try:
        first = connect(url, clock=clock)
        assert isinstance(first, MemoryBroker)
        assert connect(url) is first
        assert connect("MEMORY://test-shared") is first
        assert shared(url, clock=clock) is first
        assert repr(first) == "<MemoryBroker memory://test-shared>"
        with pytest.raises(ValueError, match="in use with .*forget"):
            connect(url, clock=ManualClock())
        with pytest.raises(ValueError, match="no memory:// URL"):
            shared("redis://localhost")

        first.send(envelopes("orders", 1))
        forget(url)
        again = connect(url)
        assert isinstance(again, MemoryBroker)
        assert again is not first
        assert again.messages("orders") == []
        assert len(first.messages("orders")) == 1  # whoever holds it keeps it working
    finally:
        forget(url)


# Threads ----------------------------------------------------------------------------------


def test_a_receive_on_another_thread_s_loop_is_woken_by_a_send(broker: MemoryBroker) -> None:
    subscription = broker.subscribe(["orders"], "billing", consumer="c1")
    got: list[Delivery] = []
    waiting = threading.Event()

    async def receive() -> None:
        waiting.set()
        got.extend(await subscription.receive(10, wait=30.0))

    consumer = threading.Thread(target=asyncio.run, args=(receive(),))
    consumer.start()
    assert waiting.wait(5.0)
    [sent] = envelopes("orders", 1)
    broker.send([sent])  # from this thread, with no event loop
    consumer.join(5.0)
    assert not consumer.is_alive()  # woken, not after 30 s
    assert [delivery.envelope for delivery in got] == [sent]


def test_neither_the_memory_broker_nor_the_contract_suite_needs_a_broker_client() -> None:
    # A fresh interpreter where no broker client nor database driver can be imported.
    script = """
import sys
for name in ("redis", "aio_pika", "aiormq", "nats", "sqlalchemy"):
    sys.modules[name] = None
import pybondi.testing.contracts.brokers
from pybondi.messaging.brokers import connect
print(type(connect("memory://orders")).__name__)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (0, "MemoryBroker\n"), result.stderr
