"""Sending to brokers, on the in-process one and on real Redis, RabbitMQ and NATS JetStream.

Every check reads back with the broker's own client (see tests/brokers.py): a send is
confirmed only if the message is then there to read, headers and body intact, in order.
The in-process broker cannot be made to fail: the tests of failures skip on it, saying so.
What subscriptions do is the contract suite's (tests/test_broker_contract.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pybondi import AsyncRequired, Command, Message, Messagebus, Repository, Session
from pybondi.exceptions import PublishError
from pybondi.messaging.brokers import Broker, BrokerPublisher, connect
from pybondi.messaging.envelope import JSON_TYPE, Envelope
from pybondi.persistence.serialization import Registry
from pybondi.tracing import handling
from tests.brokers import WITH_MEMORY, BrokerKit, needs_failures, on_broker, started

registry = Registry()


@pytest.fixture(
    params=[
        pytest.param(name, marks=() if name == "memory" else getattr(pytest.mark, name))
        for name in WITH_MEMORY
    ]
)
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerKit]:
    """Each broker: in this process, then the real servers (conftest's has those only)."""
    yield from started(WITH_MEMORY[request.param])


@registry.register(name="tests.Shipped", version=2)
@dataclass(frozen=True)
class Shipped:
    order: str
    amount: Decimal
    at: datetime


@dataclass
class Ship(Command):
    topic: str
    order: str


def envelope(topic: str, payload: object) -> Envelope:
    return Envelope.seal(topic, Message(payload), registry)


def payloads(envelopes: list[Envelope]) -> list[object]:
    return [item.open(registry).payload for item in envelopes]


# Sending, confirmed ----------------------------------------------------------------------


@on_broker
async def test_a_send_returns_once_the_message_is_readable(broker: BrokerKit) -> None:
    adapter, topic = broker.make(), broker.topic()
    sent = envelope(topic, {"n": 1})

    await adapter.asend([sent])

    assert await broker.read(topic, 1, timeout=0) == [sent]  # no waiting: it was confirmed
    await adapter.asend([])  # nothing to send is not an error
    await adapter.aclose()
    again = envelope(topic, {"n": 2})
    await adapter.asend([again])  # a closed adapter connects again
    assert await broker.read(topic, 1, timeout=0) == [again]
    assert await broker.read(topic, 0, timeout=0) == []


@on_broker
async def test_headers_and_body_round_trip(broker: BrokerKit) -> None:
    adapter, topic = broker.make(), broker.topic()
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    registered = Message(
        Shipped("o-1", Decimal("9.50"), at),
        sender="shipping",
        headers={
            "tenant": "acme",
            "city": "Zürich",
            "correlation-id": "chain-7",
            "causation-id": "cmd-3",
        },
    )
    plain = Message({"order": "o-2", "lines": [1, 2.5, None, True], "note": "café ☕"})
    sent = [Envelope.seal(topic, registered, registry), Envelope.seal(topic, plain)]

    await adapter.asend(sent)
    received = await broker.read(topic, 2, timeout=0)

    assert received == sent
    first, second = received
    assert first.id == str(registered.id)
    assert first.headers == {
        "message-id": str(registered.id),
        "message-type": "tests.Shipped",
        "message-version": "2",
        "timestamp": registered.timestamp.isoformat(),
        "sender": "shipping",
        "correlation-id": "chain-7",
        "causation-id": "cmd-3",
        "tenant": "acme",
        "city": "Zürich",
    }
    assert second.headers["message-type"] == JSON_TYPE
    assert second.headers["message-version"] == "1"
    assert second.headers["correlation-id"] == str(plain.id)  # a chain of its own
    assert "sender" not in second.headers and "causation-id" not in second.headers

    opened = first.open(registry)
    assert opened.payload == registered.payload
    assert (opened.id, opened.sender, opened.timestamp) == (
        registered.id,
        registered.sender,
        registered.timestamp,
    )
    assert opened.headers == registered.headers
    opened = second.open()
    assert (opened.payload, opened.id, opened.timestamp) == (
        plain.payload,
        plain.id,
        plain.timestamp,
    )


@on_broker
async def test_header_values_arrive_unchanged(broker: BrokerKit) -> None:
    adapter, topic = broker.make(), broker.topic()
    values = ["", "in between", "ünïcødé ☕", "a=b; c,d", "x" * 4000]
    sent = [
        Envelope.seal(topic, Message(n, headers={"note": value})) for n, value in enumerate(values)
    ]

    await adapter.asend(sent)

    received = await broker.read(topic, len(sent), timeout=0)
    assert [item.headers["note"] for item in received] == values


@on_broker
async def test_order_is_kept_per_topic_across_batches(broker: BrokerKit) -> None:
    adapter, topics = broker.make(), (broker.topic("left"), broker.topic("right"))
    sent: dict[str, list[int]] = {topic: [] for topic in topics}
    batch: list[Envelope] = []
    for n in range(500):
        topic = topics[(n * 7 // 3) % 2]  # interleaved, irregularly
        sent[topic].append(n)
        batch.append(envelope(topic, n))
        if len(batch) == 1 + n % 90:  # batches of 1 to 90 messages
            await adapter.asend(batch)
            batch = []
    await adapter.asend(batch)

    for topic in topics:
        received = await broker.read(topic, len(sent[topic]), timeout=0)
        assert payloads(received) == sent[topic]
    assert sum(map(len, sent.values())) == 500 and all(sent.values())


# The publisher ----------------------------------------------------------------------------


@on_broker
async def test_messages_published_while_handling_join_its_chain(broker: BrokerKit) -> None:
    publisher, topic = BrokerPublisher(broker.make(), registry), broker.topic()
    incoming = Message({"order": "o-1"}, headers={"correlation-id": "request-42"})
    first_in_chain = Message({"order": "o-2"})
    with handling(incoming):
        publisher.publish(topic, caused := Message({"step": 1}))
    with handling(first_in_chain):
        publisher.publish(topic, Message({"step": 2}))
    publisher.publish(topic, alone := Message({"step": 3}))

    await publisher.acommit()
    one, two, three = await broker.read(topic, 3, timeout=0)

    assert one.id == str(caused.id)
    assert one.headers["correlation-id"] == "request-42"
    assert one.headers["causation-id"] == str(incoming.id)
    assert two.headers["correlation-id"] == str(first_in_chain.id)
    assert two.headers["causation-id"] == str(first_in_chain.id)
    assert three.headers["correlation-id"] == str(alone.id)
    assert "causation-id" not in three.headers
    assert one.open(registry).headers == {
        "correlation-id": "request-42",
        "causation-id": str(incoming.id),
    }


def shipping(publisher: BrokerPublisher) -> Messagebus:
    bus = Messagebus()

    @bus.register(Ship)
    def ship(command: Ship) -> None:
        publisher.publish(command.topic, Message({"shipped": command.order}))

    return bus


@on_broker
async def test_an_async_session_sends_on_commit_and_nothing_on_rollback(
    broker: BrokerKit,
) -> None:
    publisher, topic = BrokerPublisher(broker.make(), registry), broker.topic()
    bus = shipping(publisher)

    async with Session(bus, Repository(), publisher) as session:
        await session.aexecute(Ship(topic, "o-1"))
        await session.aexecute(Ship(topic, "o-2"))
        assert await broker.read(topic, 0, timeout=0) == []  # nothing before commit
    assert payloads(await broker.read(topic, 2, timeout=0)) == [
        {"shipped": "o-1"},
        {"shipped": "o-2"},
    ]

    with pytest.raises(RuntimeError, match="changed my mind"):
        async with Session(bus, Repository(), publisher) as session:
            await session.aexecute(Ship(topic, "o-3"))
            raise RuntimeError("changed my mind")
    assert publisher.pending() == []
    assert await broker.read(topic, 0, timeout=0) == []


def test_a_sync_session_needs_a_sync_client(broker: BrokerKit) -> None:
    publisher, topic = BrokerPublisher(broker.make(), registry), broker.topic()
    bus = shipping(publisher)

    if broker.sync:
        with Session(bus, Repository(), publisher) as session:
            session.execute(Ship(topic, "o-1"))
        assert payloads(broker.run(broker.read(topic, 1, timeout=0))) == [{"shipped": "o-1"}]
    else:
        with (
            pytest.raises(AsyncRequired, match=r"send synchronously.*outbox"),
            Session(bus, Repository(), publisher) as session,
        ):
            session.execute(Ship(topic, "o-1"))
        assert publisher.pending() == []  # the session rolled the publisher back
        assert broker.run(broker.read(topic, 0, timeout=0)) == []


# Unconfirmed messages ---------------------------------------------------------------------


def buffered(adapter: Broker, good: str, bad: str) -> tuple[BrokerPublisher, list[str]]:
    """A publisher holding "before" for the good topic, "failing" for the bad, "after" good."""
    publisher, ids = BrokerPublisher(adapter, registry), []
    for topic, payload in ((good, "before"), (bad, "failing"), (good, "after")):
        publisher.publish(topic, message := Message(payload))
        ids.append(str(message.id))
    return publisher, ids


def check_unconfirmed(
    broker: BrokerKit, publisher: BrokerPublisher, error: PublishError, ids: list[str]
) -> None:
    """The error names the failing message; it and the ones after it stay buffered."""
    good, bad = error.unconfirmed[1].topic, error.unconfirmed[0].topic
    assert [item.id for item in error.unconfirmed] == ids[1:]
    assert error.broker == repr(publisher.broker)
    assert ids[1] in str(error) and repr(bad) in str(error)
    if "@" in broker.url:  # the password stays out of the message
        password = broker.url.partition("://")[2].rpartition("@")[0].partition(":")[2]
        assert f":{password}@" not in str(error) and ":***@" in str(error)
    assert [(topic, str(item.id)) for topic, item in publisher.pending()] == [
        (bad, ids[1]),
        (good, ids[2]),
    ]


async def check_resent(
    broker: BrokerKit, publisher: BrokerPublisher, good: str, bad: str, on_good: list[Envelope]
) -> None:
    """After the second commit, every message is on the broker, at least once, in order."""
    assert publisher.pending() == []
    assert payloads(await broker.read(bad, 1, timeout=0)) == ["failing"]
    # "after" may have reached the broker the first time too: at least once, never lost.
    on_good += await broker.read(good, 0, timeout=0)
    assert list(dict.fromkeys(payloads(on_good))) == ["before", "after"]


@on_broker
async def test_unconfirmed_messages_raise_and_stay_buffered(broker: BrokerKit) -> None:
    needs_failures(broker)
    adapter, good, bad = await broker.undeliverable()
    publisher, ids = buffered(adapter, good, bad)

    with pytest.raises(PublishError) as raised:
        await publisher.acommit()

    assert raised.value.topic == bad
    check_unconfirmed(broker, publisher, raised.value, ids)
    on_good = await broker.read(good, 1, timeout=0)
    assert payloads(on_good)[:1] == ["before"]
    assert await broker.read(bad, 0, timeout=0) == []

    await broker.repair(bad)
    await publisher.acommit()  # commit again: the rest is sent
    await check_resent(broker, publisher, good, bad, on_good)


def test_a_sync_commit_keeps_what_was_not_confirmed(broker: BrokerKit) -> None:
    needs_failures(broker)
    adapter, good, bad = broker.run(broker.undeliverable())
    publisher, ids = buffered(adapter, good, bad)

    if not broker.sync:
        with pytest.raises(AsyncRequired):
            publisher.commit()
        assert [str(item.id) for _, item in publisher.pending()] == ids  # nothing is lost
        return
    with pytest.raises(PublishError) as raised:
        publisher.commit()

    assert raised.value.topic == bad
    check_unconfirmed(broker, publisher, raised.value, ids)
    on_good = broker.run(broker.read(good, 1, timeout=0))
    assert payloads(on_good)[:1] == ["before"]

    broker.run(broker.repair(bad))
    publisher.commit()
    broker.run(check_resent(broker, publisher, good, bad, on_good))


@on_broker
async def test_sending_a_message_again_is_not_an_error(broker: BrokerKit) -> None:
    adapter, topic = broker.make(), broker.topic()
    once, other = envelope(topic, "once"), envelope(topic, "other")

    await adapter.asend([once, once, other])
    await adapter.asend([once])  # a retry after a lost confirmation

    received = await broker.read(topic, 2, timeout=0)
    # A broker may drop repeats (JetStream, by message id), but never a message.
    assert [item for item in received if item != once] == [other]
    assert received[0] == once


@on_broker
async def test_concurrent_sends_on_one_adapter_keep_each_order(broker: BrokerKit) -> None:
    adapter, topics = broker.make(), [broker.topic(f"t{n}") for n in range(4)]

    async def send(topic: str) -> None:
        for batch in range(5):
            await adapter.asend([envelope(topic, batch * 20 + n) for n in range(20)])

    await asyncio.gather(*(send(topic) for topic in topics))

    for topic in topics:
        assert payloads(await broker.read(topic, 100, timeout=0)) == list(range(100))


@on_broker
async def test_an_unreachable_server_is_a_publish_error(broker: BrokerKit) -> None:
    needs_failures(broker)
    adapter, topic = broker.make(broker.dead_url, **broker.impatient), broker.topic()
    sent = [envelope(topic, 1), envelope(topic, 2)]

    with pytest.raises(PublishError) as raised:
        await asyncio.wait_for(adapter.asend(sent), 5)

    assert raised.value.unconfirmed == sent
    assert raised.value.topic == topic
    assert "Connect call failed" in str(raised.value)  # the reason: the refused connection


@on_broker
async def test_a_retry_succeeds_after_the_destination_was_deleted(broker: BrokerKit) -> None:
    needs_failures(broker)
    adapter, topic = broker.make(), broker.topic()
    await adapter.asend([envelope(topic, "first")])
    await broker.destroy(topic)  # an operator (or an expiry policy) deletes the queue/stream

    again = [envelope(topic, "second")]
    try:
        await adapter.asend(again)
    except PublishError:
        await adapter.asend(again)  # what a relay does: retry, with nothing more

    assert payloads(await broker.read(topic, 1, timeout=0)) == ["second"]


def test_an_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="foo") as raised:
        connect("foo://somewhere")
    for scheme in ("redis", "rediss", "amqp", "amqps", "nats", "tls", "memory"):
        assert scheme in str(raised.value)


@pytest.mark.parametrize(
    ("client", "url", "extra"),
    [
        ("redis", "redis://127.0.0.1:6379", "redis"),
        ("aio_pika", "amqp://guest:guest@127.0.0.1:5672/", "rabbitmq"),
        ("nats", "nats://127.0.0.1:4222", "nats"),
    ],
)
def test_a_missing_client_names_the_extra_to_install(client: str, url: str, extra: str) -> None:
    # A fresh interpreter without the client, as without pybondi[<extra>]: the core, the
    # envelope and the broker package import; connecting names the extra.
    script = f"""
import sys
sys.modules[{client!r}] = None
import pybondi, pybondi.messaging.envelope, pybondi.tracing, pybondi.messaging.brokers
try:
    pybondi.messaging.brokers.connect({url!r})
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("MissingDependency"), result.stdout + result.stderr
    assert f"pip install 'pybondi[{extra}]'" in result.stdout
