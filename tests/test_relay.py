"""The relay, from real SQL outboxes (SQLite, PostgreSQL, MariaDB) to real brokers.

Most tests send to Redis and read back with Redis' own client (tests/brokers.py); the
order-per-topic contract runs on every broker. Rows are committed through `Outbox`, and
the outbox's tables are read with plain queries (tests/outboxes.py). Everything runs on
the broker kit's event loop; leases, backoffs and idle waits are kept to fractions of a
second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from pybondi import Message, Session
from pybondi.exceptions import PublishError
from pybondi.messaging.brokers.redis import RedisBroker
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.messaging.relay import Relay
from pybondi.persistence import SQLStore
from tests.backends import AggregatesOnly, Backend
from tests.brokers import KITS, BrokerKit, RedisKit
from tests.outboxes import Counting, Dying, RelayRig, Slow, aoutbox_rows, eventually, ids

LOGGER = "pybondi.messaging.relay"


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis)])
def kit(request: pytest.FixtureRequest) -> Iterator[BrokerKit]:
    """Redis, with stream names of this test's own, deleted after."""
    made = KITS[request.param]()
    try:
        made.start()
        yield made
    finally:
        made.close()


@pytest.fixture
def rig(sql_backend: Backend, kit: BrokerKit) -> Iterator[RelayRig]:
    made = RelayRig(sql_backend, kit)
    yield made
    made.close()


def numbers(envelopes: Sequence[Envelope]) -> list[int]:
    return [cast(dict[str, int], item.open().payload)["n"] for item in envelopes]


# Sending, in order, marked after --------------------------------------------------------


@pytest.mark.parametrize("store", ["async", "sync"])
def test_the_relay_sends_committed_rows_in_order_and_marks_them_after(
    rig: RelayRig, store: str
) -> None:
    kit = rig.kit
    first, second = kit.topic("orders"), kit.topic("invoices")
    batches = [(first if n % 3 else second, [{"n": n}]) for n in range(30)]
    relay_store = rig.new_store(asynchronous=store == "async")
    messages: list[Message[Any]] = []
    if store == "sync":  # the relay runs a sync store's transactions in threads
        outbox = Outbox(relay_store)
        with Session(publisher=outbox):
            for topic, [payload] in batches:
                messages.append(Message(payload))
                outbox.publish(topic, messages[-1])
    unsent_when_sent: list[bool] = []

    async def before(envelopes: Sequence[Envelope]) -> None:
        # The batch is about to leave: none of its rows is marked sent yet.
        wanted = set(ids(envelopes))
        rows = [row for row in await rig.rows() if row.message_id in wanted]
        unsent_when_sent.append(len(rows) == len(wanted) and all(r.sent_at is None for r in rows))

    async def scenario() -> None:
        if store == "async":
            messages.extend(await rig.publish(*batches))
        relay = Relay(relay_store, Counting(kit.make(), before), batch_size=7)

        assert await relay.run_once() == 30
        assert relay.sent == 30
        in_first = [m for (topic, _), m in zip(batches, messages, strict=True) if topic == first]
        in_second = [m for (topic, _), m in zip(batches, messages, strict=True) if topic == second]
        got_first, got_second = await kit.read(first, 20, 0), await kit.read(second, 10, 0)
        assert ids(got_first) == ids(in_first) and ids(got_second) == ids(in_second)
        assert numbers(got_first) == [n for n in range(30) if n % 3]
        assert got_first[0].headers["message-id"] == str(in_first[0].id)
        assert len(unsent_when_sent) == 5 and all(unsent_when_sent)  # 20 rows in 3, 10 in 2

        rows = await rig.rows()
        assert all(row.sent_at is not None for row in rows)
        cursors = await rig.cursors()
        assert {topic: cursor.sent for topic, cursor in cursors.items()} == {
            first: 20,
            second: 10,
        }

        # Nothing is pending: the next round sends nothing.
        assert await relay.run_once() == 0
        assert await kit.read(first, 0, 0) == [] and await kit.read(second, 0, 0) == []

        # Rows committed later go in the next round, numbered on.
        later = await rig.publish((first, [{"n": 100}, {"n": 101}]))
        assert await relay.run_once() == 2
        assert ids(await kit.read(first, 2, 0)) == ids(later)
        tail = [(r.seq, r.sent_at is not None) for r in await rig.rows() if r.topic == first]
        assert tail[-3:] == [(20, True), (21, True), (22, True)]
        await relay.broker.aclose()

    rig.run(scenario())


def test_batches_hold_at_most_batch_size_rows(rig: RelayRig) -> None:
    kit = rig.kit
    topic = kit.topic()

    async def scenario() -> None:
        await rig.numbers(topic, 250)
        broker = Counting(kit.make())
        relay = rig.relay(broker, batch_size=100)

        assert await relay.run_once() == 250
        assert broker.batches == [100, 100, 50]
        assert numbers(await kit.read(topic, 250, 0)) == list(range(250))
        assert await relay.run_once() == 0
        assert broker.batches == [100, 100, 50]

        # A topic that ends on a whole batch takes no empty batch after it.
        await rig.numbers(topic, 100, start=250)
        assert await relay.run_once() == 100
        assert broker.batches == [100, 100, 50, 100]

    rig.run(scenario())


def test_order_per_topic_holds_on_every_broker(sql_backend: Backend, broker: BrokerKit) -> None:
    rig = RelayRig(sql_backend, broker)
    topics = [broker.topic("orders"), broker.topic("invoices")]

    async def scenario() -> None:
        # Sessions that interleave the topics; each commit numbers its rows after the last.
        published: dict[str, list[Message[Any]]] = {topic: [] for topic in topics}
        for round in range(6):
            batch = [(topics[(round + n) % 2], [{"n": round * 10 + n}]) for n in range(5)]
            for (topic, _), message in zip(batch, await rig.publish(*batch), strict=True):
                published[topic].append(message)
        relay = rig.relay(batch_size=4)

        assert await relay.run_once() == 30
        for topic in topics:
            received = await broker.read(topic, 15)
            assert ids(received) == ids(published[topic])
            assert numbers(received) == sorted(numbers(received))
        assert await relay.run_once() == 0

    try:
        rig.run(scenario())
    finally:
        rig.close()


# Several relays ------------------------------------------------------------------------------


def test_concurrent_relays_send_every_message_once_and_in_order(rig: RelayRig) -> None:
    kit = rig.kit
    topics = [kit.topic(f"t{n}") for n in range(5)]

    async def scenario() -> None:
        relays = [rig.relay(batch_size=25) for _ in range(3)]

        published: dict[str, list[Message[Any]]] = {topic: [] for topic in topics}

        async def publish(rounds: range) -> None:
            for round in rounds:
                batches = [(topic, [{"n": round * 20 + n} for n in range(20)]) for topic in topics]
                messages = iter(await rig.publish(*batches))
                for topic, payloads in batches:
                    published[topic] += [next(messages) for _ in payloads]

        await publish(range(5))  # half before the relays start...
        tasks = [asyncio.create_task(relay.run()) for relay in relays]
        await publish(range(5, 10))  # ...and half while they run
        try:
            await eventually(lambda: sum(r.sent for r in relays) >= 1000, 30, "all sent")
            await asyncio.sleep(0.3)  # time for a second send, if there were one
        finally:
            for relay in relays:
                relay.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)

        assert sum(relay.sent for relay in relays) == 1000
        for topic in topics:
            received = await kit.read(topic, 200, 0)
            assert numbers(received) == list(range(200))
            assert ids(received) == ids(published[topic])
        rows = await rig.rows()
        assert len(rows) == 1000 and all(row.sent_at is not None for row in rows)
        cursors = await rig.cursors()
        assert {topic: (c.sent, c.owner) for topic, c in cursors.items()} == {
            topic: (200, None) for topic in topics
        }

    rig.run(scenario())


def test_a_dead_relay_s_topics_wait_for_its_lease_then_go_on_from_its_last_batch(
    rig: RelayRig,
) -> None:
    kit = rig.kit
    topic = kit.topic()

    async def scenario() -> None:
        messages = await rig.numbers(topic, 10)
        # The first relay sends one batch of four, then dies without giving its lease back.
        dead = rig.relay(Dying(kit.make(), alive=1), batch_size=4, lease=0.5, name="dead")
        assert await dead.run_once() == 4  # the second batch failed: the topic waits
        # ...and it dies holding the topic's lease: a killed relay does not give it back.
        await rig.hold(topic, "dead", 0.5)
        loop = asyncio.get_running_loop()
        died = loop.time()
        assert numbers(await kit.read(topic, 4, 0)) == [0, 1, 2, 3]
        cursor = (await rig.cursors())[topic]
        assert (cursor.sent, cursor.owner) == (4, "dead")

        heir = rig.relay(batch_size=100, lease=0.5, name="heir")
        assert await heir.run_once() == 0  # the lease still holds
        while (sent := await heir.run_once()) == 0:
            assert loop.time() - died < 3, "the lease never expired"
            await asyncio.sleep(0.02)
        waited = loop.time() - died

        assert sent == 6
        assert 0.35 < waited < 2, waited
        received = await kit.read(topic, 6, 0)
        assert numbers(received) == [4, 5, 6, 7, 8, 9]  # from the last confirmed row on
        assert ids(received) == ids(messages[4:])
        cursor = (await rig.cursors())[topic]
        assert (cursor.sent, cursor.owner) == (10, "heir")

    rig.run(scenario())


def test_a_slow_send_keeps_its_lease_and_a_lost_lease_confirms_nothing(
    rig: RelayRig, caplog: pytest.LogCaptureFixture
) -> None:
    kit = rig.kit
    topic = kit.topic()
    caplog.set_level(logging.WARNING, LOGGER)

    async def scenario() -> None:
        await rig.numbers(topic, 5)
        slow = rig.relay(Slow(kit.make(), 0.8), lease=0.2, name="slow")
        sending = asyncio.create_task(slow.run_once())
        await asyncio.sleep(0.4)  # four times the lease: the slow relay keeps renewing it
        fast = rig.relay(lease=0.2, name="fast")
        assert await fast.run_once() == 0
        # Someone takes the lease anyway (a relay whose clock runs ahead, say): the slow
        # relay's batch reaches the broker, but it cannot mark it sent.
        await rig.steal(topic, "thief")
        assert await sending == 0

        cursor = (await rig.cursors())[topic]
        assert (cursor.sent, cursor.owner) == (0, "thief")
        assert numbers(await kit.read(topic, 5)) == [0, 1, 2, 3, 4]
        lost = [r.getMessage() for r in caplog.records if "lost the lease" in r.getMessage()]
        assert lost == [f"Relay slow lost the lease on {topic!r} while sending; another "
                        f"relay resends seq 1..5"]  # fmt: skip

    rig.run(scenario())


# Failures, retention, stopping -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_while_the_broker_is_down_the_relay_backs_off_then_catches_up(
    rig: RelayRig, caplog: pytest.LogCaptureFixture
) -> None:
    kit = rig.kit
    topic = kit.topic()
    caplog.set_level(logging.DEBUG, LOGGER)  # every attempt (warnings: 1st, 5th, 10th...)
    retry = re.compile(r"retrying in ([\d.]+) s \(attempt (\d+)\)")

    async def scenario() -> None:
        messages = await rig.numbers(topic, 20)
        down = RedisBroker(f"redis://127.0.0.1:{closed_port()}", socket_connect_timeout=0.5)
        relay = rig.relay(down, batch_size=8, max_backoff=0.8)
        task = asyncio.create_task(relay.run())
        try:
            await asyncio.sleep(1.0)
            logged = [r.getMessage() for r in caplog.records if r.name == LOGGER]
            retries = [(float(m[1]), int(m[2])) for m in map(retry.search, logged) if m]
            attempts = [attempt for _, attempt in retries]
            assert attempts == list(range(1, len(attempts) + 1))
            # Backing off: a handful of attempts in a second, not a busy loop...
            assert 3 <= len(attempts) <= 12, retries
            # ...each wait at most 0.1 s, 0.2 s, 0.4 s... up to max_backoff (full jitter)...
            for delay, attempt in retries:
                assert 0 <= delay <= min(0.8, 0.1 * 2 ** (attempt - 1)) + 0.005, retries
            # ...and the waits grow past the first one's bound.
            assert max(delay for delay, _ in retries) > 0.1, retries
            assert len(retries) == len(logged), logged
            assert f"topic {topic!r} waits at seq 1" in logged[0], logged
            assert "Connect call failed" in logged[0], logged

            assert relay.sent == 0
            assert all(row.sent_at is None for row in await rig.rows())
            assert (await rig.cursors())[topic].sent == 0
            assert await kit.read(topic, 0, 0) == []

            relay.broker = kit.make()  # the broker is back
            await eventually(lambda: relay.sent == 20, 5, "caught up")
        finally:
            relay.stop()
            await asyncio.wait_for(task, 5)
            await down.aclose()
        received = await kit.read(topic, 20, 0)
        assert ids(received) == ids(messages)
        assert all(row.sent_at is not None for row in await rig.rows())

    rig.run(scenario())


def test_sent_rows_past_retention_are_deleted_and_unsent_ones_never(rig: RelayRig) -> None:
    kit = rig.kit
    sent, held = kit.topic("sent"), kit.topic("held")

    async def scenario() -> None:
        await rig.numbers(sent, 5)
        await rig.numbers(held, 3)
        await rig.hold(held, "elsewhere", 60)  # another relay's, for the whole test

        keeping = rig.relay(retention=timedelta(hours=1))
        assert await keeping.run_once() == 5
        rows = await rig.rows()
        assert [(r.topic, r.seq, r.sent_at is not None) for r in rows if r.topic == sent] == [
            (sent, seq, True) for seq in range(1, 6)
        ]

        purging = rig.relay(retention=timedelta(0))
        assert await purging.run_once() == 0  # purges as it starts: once a minute after
        rows = await rig.rows()
        assert [(r.topic, r.seq, r.sent_at) for r in rows] == [
            (held, seq, None) for seq in range(1, 4)
        ]

        # Numbering goes on after the purge (the relay holding the topic sends on), and
        # the next purge (forced: a minute has not passed) deletes those rows once sent.
        await rig.numbers(sent, 2, start=5)
        assert await keeping.run_once() == 2
        assert numbers(await kit.read(sent, 7, 0)) == list(range(7))
        rows = await rig.rows()
        assert [(r.topic, r.seq) for r in rows if r.sent_at is not None] == [(sent, 6), (sent, 7)]
        purging._purged_at = None
        assert await purging.run_once() == 0
        rows = await rig.rows()
        assert [(r.topic, r.seq) for r in rows] == [(held, seq) for seq in range(1, 4)]
        cursor = (await rig.cursors())[sent]
        assert cursor.sent == 7

    rig.run(scenario())


def test_an_idle_topic_s_head_and_cursor_go_and_a_topic_used_again_starts_anew(
    rig: RelayRig,
) -> None:
    kit = rig.kit
    idle, held, busy = kit.topic("idle"), kit.topic("held"), kit.topic("busy")

    async def forget(relay: Relay) -> None:
        relay._purged_at = None  # purged once a minute: this is the next time
        assert await relay.run_once() == 0

    async def scenario() -> None:
        for topic in (idle, held, busy):
            await rig.numbers(topic, 2)
        sender = rig.relay()
        assert await sender.run_once() == 6
        sender.stop()
        await sender.run()  # gives its leases back
        await rig.hold(held, "elsewhere", 60)  # a lease still held: the topic stays
        purging = rig.relay(retention=timedelta(0))
        # A transaction writing to `busy` while the purge runs keeps the topic: the purge
        # waits for the head it holds, and then finds it moved.
        writing = await rig.store.abegin()
        envelope = Envelope.seal(busy, Message({"n": 2}))
        await writing.arun(lambda records: records.outbox.enqueue([envelope]))
        purge = asyncio.ensure_future(forget(purging))  # rows purged; `idle` forgotten
        await asyncio.sleep(0.5)
        await writing.acommit()
        await writing.aclose()
        await purge
        assert set(await rig.cursors()) == {held, busy}

        await rig.numbers(idle, 1, start=5)  # used again: numbered from 1
        assert [(r.topic, r.seq) for r in await rig.rows() if r.topic != held] == [
            (busy, 3),
            (idle, 1),
        ]
        assert await rig.relay().run_once() == 2
        assert numbers(await kit.read(idle, 3, 0)) == [0, 1, 5]
        assert numbers(await kit.read(busy, 3, 0)) == [0, 1, 2]

    rig.run(scenario())


def test_run_returns_after_stop_and_gives_the_leases_back(rig: RelayRig) -> None:
    kit = rig.kit
    topics = [kit.topic("a"), kit.topic("b")]

    async def scenario() -> None:
        await rig.numbers(topics[0], 3)
        relay = rig.relay(lease=30)
        task = asyncio.create_task(relay.run())
        await eventually(lambda: relay.sent == 3, 5, "first rows sent")
        await rig.numbers(topics[1], 4)  # committed while it runs
        await eventually(lambda: relay.sent == 7, 5, "later rows sent")
        cursors = await rig.cursors()
        assert {topic: (c.sent, c.owner) for topic, c in cursors.items()} == {
            topics[0]: (3, relay.name),
            topics[1]: (4, relay.name),
        }

        relay.stop()
        await asyncio.wait_for(task, 2)
        cursors = await rig.cursors()
        assert {topic: (c.owner, c.lease_until) for topic, c in cursors.items()} == {
            topic: (None, None) for topic in topics
        }
        # Given back, not expired (the lease was 30 s): another relay goes on at once.
        await rig.numbers(topics[0], 2, start=3)
        assert await rig.relay(lease=30).run_once() == 2
        assert numbers(await kit.read(topics[0], 5, 0)) == list(range(5))

    rig.run(scenario())


@pytest.mark.parametrize(
    "sql_backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)], indirect=True
)  # no SQL of its own: the relay's loop decides
def test_a_stop_as_run_starts_is_not_lost(rig: RelayRig) -> None:
    async def scenario() -> None:
        relay = rig.relay()
        task = asyncio.create_task(relay.run())
        relay.stop()  # shutting down while the relay is starting: run() has not begun yet
        try:
            await asyncio.wait_for(asyncio.shield(task), 1)
        except TimeoutError:
            relay.stop()  # it does stop when asked again, once running
            await asyncio.wait_for(task, 2)
            raise AssertionError("run() forgot the stop() made before it ran") from None

    rig.run(scenario())


def test_a_relay_needs_an_outbox_and_a_positive_batch_size(tmp_path: Path) -> None:
    store, broker = AggregatesOnly(), RedisBroker("redis://127.0.0.1:6379")
    with pytest.raises(TypeError, match="keeps no outbox") as refused:
        Relay(store, broker)  # type: ignore[arg-type]
    assert repr(store) in str(refused.value)
    sql = SQLStore(f"sqlite:///{tmp_path / 'outbox.db'}")
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        Relay(sql, broker, batch_size=0)
    sql.dispose()


# The command line ------------------------------------------------------------------------------


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pybondi", "relay", *arguments]


def test_the_cli_relays_until_sigterm_then_exits_0(rig: RelayRig) -> None:
    kit, backend = rig.kit, rig.backend
    # The kit's prefix reaches the adapter as a broker option: the stream is the kit's
    # own, which it deletes after the test.
    topic, stream_key = "cli", f"{kit.prefix}cli"
    schema = ["--schema", backend.namespace] if backend.namespace else []
    command = cli(
        *("--store", backend.url, "--broker", kit.url, "--prefix", rig.prefix, *schema),
        *("--batch-size", "7", "--lease", "5", "--broker-option", f"prefix={kit.prefix}"),
    )

    async def stream() -> list[int]:
        assert isinstance(kit, RedisKit) and kit.client is not None
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await kit.client.xrange(stream_key))
        return [json.loads(fields[b"body"])["n"] for _, fields in entries]

    async def scenario() -> None:
        await rig.numbers(topic, 20)
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:

            async def all_sent(count: int) -> None:
                deadline = time.monotonic() + 20
                while len(await stream()) < count:
                    assert process.poll() is None, f"the relay exited: {process.communicate()}"
                    assert time.monotonic() < deadline, "the relay did not send"
                    await asyncio.sleep(0.05)

            await all_sent(20)
            await rig.numbers(topic, 15, start=20)
            await all_sent(35)
            process.send_signal(signal.SIGTERM)
            _, errors = await asyncio.to_thread(process.communicate, timeout=5)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0, errors
        assert "stopped after sending 35 message(s)" in errors
        assert await stream() == list(range(35))
        rows = await aoutbox_rows(rig.store)
        assert len(rows) == 35 and all(row.sent_at is not None for row in rows)
        assert (await rig.cursors())[topic].owner is None

    rig.run(scenario())


def test_the_cli_refuses_a_batch_size_below_1(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'outbox.db'}"
    done = subprocess.run(
        cli("--store", store, "--broker", "redis://127.0.0.1:6379", "--batch-size", "0"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "argument --batch-size: must be at least 1, got 0" in done.stderr
    assert not (tmp_path / "outbox.db").exists()


def test_the_cli_refuses_a_broker_url_it_has_no_adapter_for(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'outbox.db'}"
    done = subprocess.run(
        cli("--store", store, "--broker", "kafka://localhost:9092", "--create-tables"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "argument --broker: No broker adapter for 'kafka://localhost:9092'" in done.stderr
    # A mistake in the command line is told as one, before anything is touched.
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "outbox.db").exists()


def test_the_cli_refuses_a_store_without_the_outbox_tables(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    done = subprocess.run(
        cli("--store", store, "--broker", "redis://127.0.0.1:1"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "lacks the tables" in done.stderr and "pybondi_outbox" in done.stderr
    assert "--create-tables" in done.stderr
    assert "Traceback" not in done.stderr


class Broken(Counting):
    """A broker whose adapter has a bug: it fails the same way every time."""

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        raise TypeError("unexpected keyword argument 'nope'")


def test_an_error_that_would_fail_every_time_ends_run_instead_of_retrying(
    rig: RelayRig, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        await rig.numbers("t", 3)
        relay = Relay(rig.store, Broken(rig.kit.make()), max_backoff=0.01)
        with pytest.raises(TypeError, match="nope"):
            await asyncio.wait_for(relay.run(), 10)
        assert "retrying" not in caplog.text
        assert all(cursor.owner is None for cursor in (await rig.cursors()).values())

    rig.run(scenario())


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql+pymysql://root@127.0.0.1/test", "requires an async driver"),
        ("nosuch://host/db", "Can't load plugin"),
        ("not a url", "Could not parse"),
    ],
)
def test_the_cli_refuses_a_store_url_it_cannot_use_in_one_line(url: str, problem: str) -> None:
    done = subprocess.run(
        cli("--store", url, "--broker", "redis://127.0.0.1:1"),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"pybondi relay: cannot use --store {url}: ")
    assert problem in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers: a broker that hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_the_cli_stops_within_its_grace_even_while_the_broker_hangs(
    rig: RelayRig, silent_port: int
) -> None:
    backend = rig.backend
    schema = ["--schema", backend.namespace] if backend.namespace else []
    rig.run(rig.numbers("hanging", 3))
    command = cli(
        *("--store", backend.url, "--prefix", rig.prefix, *schema),
        *("--broker", f"redis://127.0.0.1:{silent_port}", "--grace", "0.5"),
    )
    for signals, status in (((signal.SIGTERM,), 0), ((signal.SIGINT, signal.SIGINT), 130)):
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        try:
            assert process.stderr is not None
            while "started" not in process.stderr.readline():
                assert process.poll() is None, process.communicate()
            time.sleep(0.5)  # the relay is waiting on the broker
            began = time.monotonic()
            for each in signals:
                process.send_signal(each)
                time.sleep(0.1)
            _, errors = process.communicate(timeout=10)
            # SIGTERM: within the grace (one second at least, for the leases); a second
            # Ctrl-C: at once.
            assert process.returncode == status, errors
            assert time.monotonic() - began < 3
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.parametrize(
    "command",
    [["relay"], ["worker", "tests.worker_app:consumer"]],
    ids=["relay", "worker"],
)
def test_a_sigterm_while_the_store_is_awaited_at_start_exits_0_at_once(
    command: list[str],
) -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1
    process = subprocess.Popen(
        [sys.executable, "-m", "pybondi", *command, "--store", unreachable],
        env={**os.environ, "PYBONDI_BROKER_URL": "redis://127.0.0.1:1"},
        cwd=Path(__file__).parent.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        while "Cannot reach the store" not in process.stderr.readline():
            assert process.poll() is None, process.communicate()
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=10)
        assert process.returncode == 0, errors
        assert time.monotonic() - began < 2
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_relay_that_cannot_reach_the_broker_leaves_its_topics_to_one_that_can(
    rig: RelayRig,
) -> None:
    kit = rig.kit
    topics = [kit.topic() for _ in range(2)]

    async def scenario() -> None:
        for topic in topics:
            await rig.numbers(topic, 5)
        cut_off = rig.relay(RedisBroker(f"redis://127.0.0.1:{closed_port()}"), name="cut-off")
        healthy = rig.relay(name="healthy")
        assert await cut_off.run_once() == 0  # fails both topics, and gives their leases back
        assert all(cursor.owner is None for cursor in (await rig.cursors()).values())
        assert await healthy.run_once() == 10  # at once: no lease to wait for
        for topic in topics:
            assert numbers(await kit.read(topic, 5, 0)) == [0, 1, 2, 3, 4]
        await cut_off.broker.aclose()

    rig.run(scenario())


def test_topics_failing_one_after_another_mean_the_broker_is_down(rig: RelayRig) -> None:
    kit = rig.kit

    async def scenario() -> None:
        for _ in range(6):
            await rig.numbers(kit.topic(), 2)
        relay = rig.relay(RedisBroker(f"redis://127.0.0.1:{closed_port()}"))
        # Three topics in a row: the round ends, and `run` backs off as a whole, rather
        # than trying every topic against a broker that is not there.
        with pytest.raises(PublishError, match="Connect call failed"):
            await relay.run_once()
        assert len(relay._held) == 3
        await relay.broker.aclose()

    rig.run(scenario())


def test_a_topic_with_a_backlog_gives_way_to_the_others(rig: RelayRig) -> None:
    kit = rig.kit
    busy, quiet = kit.topic("busy"), kit.topic("quiet")

    async def scenario() -> None:
        await rig.numbers(busy, 150)
        await rig.numbers(quiet, 1)
        relay = rig.relay(batch_size=10)
        # Ten batches of the busy topic at most, whichever comes first: the quiet
        # topic's message does not wait for the whole backlog.
        assert await relay.run_once() == 101
        assert numbers(await kit.read(quiet, 1, 0)) == [0]
        while await relay.run_once():
            pass
        assert numbers(await kit.read(busy, 150, 0)) == list(range(150))

    rig.run(scenario())
