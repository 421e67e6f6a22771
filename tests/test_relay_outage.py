"""The broker out of reach for two seconds mid-stream: the relay retries, then catches up.

The relay (in-process, on PostgreSQL) reaches the broker through a TCP proxy
(tests/proxy.py), while sessions on a thread keep committing numbered messages to two
topics. Once messages are flowing, the proxy drops every connection and closes new ones
for two seconds, then forwards again. What the assertions prove:

- the outage was real: no batch was confirmed through the cut proxy, and the adapter's
  attempts to reconnect were refused;
- the relay noticed and retried: it logged its retries during the outage, not an error
  that ended it;
- it caught up: once the proxy forwards again, every committed row is confirmed within
  seconds, and `run()` still stops cleanly;
- nothing was lost: each topic holds all its numbers, the first occurrences in commit
  order, and every copy of a number (a batch resent after the cut) has one message id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from pybondi import Message, Messagebus, Session
from pybondi.messaging.brokers import connect
from pybondi.messaging.outbox import Outbox
from pybondi.messaging.relay import Relay
from pybondi.persistence import SQLStore
from tests.backends import Backend
from tests.brokers import BrokerKit
from tests.proxy import Proxy

pytestmark = pytest.mark.postgres

NUMBERS = 600
SESSIONS_PAUSE = 0.02  # seconds between the publisher's sessions (1 to 5 messages each)
BEFORE_CUT = 100  # messages confirmed through the proxy before the cut
OUTAGE = 2.0  # seconds
CATCH_UP = 20.0  # seconds the relay may take to send the rest once the broker is back

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "amqp": 5672, "amqps": 5671, "nats": 4222}


@pytest.fixture
def proxy(broker: BrokerKit) -> Iterator[Proxy]:
    """A proxy to the kit's broker."""
    address = urlsplit(broker.url)
    with Proxy(
        address.hostname or "127.0.0.1", address.port or DEFAULT_PORTS[address.scheme]
    ) as made:
        yield made


def through(url: str, proxy: Proxy) -> str:
    """`url`, with the proxy's address in place of the server's."""
    parts = urlsplit(url)
    credentials, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{proxy.port}"))


def publish(store: SQLStore, topics: list[str], stop: threading.Event) -> None:
    """Commit messages 0..NUMBERS-1, `topics[n % len(topics)]`, a few per session."""
    outbox, published = Outbox(store), 0
    while published < NUMBERS and not stop.is_set():
        count = min(random.randint(1, 5), NUMBERS - published)
        with Session(Messagebus(), None, outbox):
            for n in range(published, published + count):
                outbox.publish(topics[n % len(topics)], Message({"n": n}))
        published += count
        time.sleep(SESSIONS_PAUSE)


def test_the_relay_retries_through_an_outage_then_catches_up_losing_nothing(
    broker: BrokerKit,
    backends: dict[str, Backend],
    proxy: Proxy,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    caplog.set_level(logging.WARNING, logger="pybondi.messaging.relay")
    backend, prefix = backends["postgres"], f"o{uuid.uuid4().hex[:8]}_"
    store, astore = backend.store(prefix=prefix), backend.store(asynchronous=True, prefix=prefix)
    assert isinstance(store, SQLStore) and isinstance(astore, SQLStore)
    store.create_tables()
    topics = [broker.topic("numbers"), broker.topic("numbers")]
    adapter = connect(through(broker.url, proxy), **broker.options())
    broker.brokers.append(adapter)  # the kit closes it
    relay = Relay(astore, adapter, batch_size=10, idle=0.05, max_backoff=0.5)
    stop_publishing = threading.Event()
    publisher = threading.Thread(target=publish, args=(store, topics, stop_publishing))
    times: dict[str, float] = {}
    counts: dict[str, int] = {}

    async def outage() -> None:
        running = asyncio.create_task(relay.run())
        try:
            publisher.start()
            await until(lambda: relay.sent >= BEFORE_CUT, 10, "messages to flow", running)
            times["cut"] = time.time()
            proxy.cut()
            await asyncio.sleep(0.5)  # a batch confirmed just before the cut may finish
            counts["sent_early_in_outage"] = relay.sent
            await asyncio.sleep(OUTAGE - 0.5)
            counts["sent_late_in_outage"] = relay.sent
            times["restore"] = time.time()
            proxy.restore()
            await until(
                lambda: relay.sent > counts["sent_late_in_outage"], CATCH_UP, "a batch", running
            )
            times["resumed"] = time.time()
            await asyncio.to_thread(publisher.join)
            await until(lambda: relay.sent >= NUMBERS, CATCH_UP, "the relay to catch up", running)
            times["caught_up"] = time.time()
        finally:
            relay.stop()
            stop_publishing.set()
            await asyncio.wait_for(running, 10)

    try:
        broker.run(outage())
        expected = {
            topic: list(range(index, NUMBERS, len(topics))) for index, topic in enumerate(topics)
        }
        received = {
            topic: broker.run(broker.read(topic, len(expected[topic]), timeout=5))
            for topic in topics
        }
    finally:
        stop_publishing.set()
        if publisher.is_alive():
            publisher.join(30)
        store.dispose()
        broker.run(astore.adispose())

    assert counts["sent_late_in_outage"] == counts["sent_early_in_outage"], (
        "the cut let batches through"
    )
    assert proxy.refused >= 1, "the adapter never tried to reconnect during the outage"
    retries = [
        record
        for record in caplog.records
        if record.name == "pybondi.messaging.relay"
        and "retrying" in record.getMessage()
        and times["cut"] <= record.created <= times["restore"]
    ]
    assert retries, f"no retry logged during the outage: {caplog.text}"

    duplicates = 0
    for topic in topics:
        numbers = [json.loads(envelope.body)["n"] for envelope in received[topic]]
        wanted = expected[topic]
        assert set(numbers) == set(wanted), (
            f"{topic}: missing {sorted(set(wanted) - set(numbers))}, "
            f"unexpected {sorted(set(numbers) - set(wanted))}"
        )
        assert list(dict.fromkeys(numbers)) == wanted, f"{topic}: out of commit order: {numbers}"
        ids: dict[int, str] = {}
        for n, envelope in zip(numbers, received[topic], strict=True):
            assert ids.setdefault(n, envelope.id) == envelope.id, f"{n} was committed twice"
        duplicates += len(numbers) - len(wanted)

    note = {
        "broker": broker.name,
        "retries_logged_in_outage": len(retries),
        "connections_refused_in_outage": proxy.refused,
        "first_batch_after_restore_s": round(times["resumed"] - times["restore"], 2),
        "caught_up_s": round(times["caught_up"] - times["restore"], 2),
        "duplicates": duplicates,
    }
    for key, value in note.items():
        record_property(key, value)
    print(f"relay outage test: {json.dumps(note)}")


async def until(
    check: Callable[[], bool], timeout: float, what: str, running: asyncio.Task[None]
) -> None:
    """Wait for `check()`; fail after `timeout` seconds, or as soon as the relay ended."""
    deadline = time.monotonic() + timeout
    while not check():
        if running.done():
            running.result()  # its exception, if it raised one
            pytest.fail(f"the relay returned while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.02)
