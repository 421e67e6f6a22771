"""The consumer side of the RabbitMQ adapter, on the real server.

Messages are sent with the adapter (or, when they must be malformed, with aio-pika) and
received through `RabbitMQBroker.subscribe`; the queues' contents are checked with the
kit's own client (tests/brokers.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aio_pika
import aio_pika.exceptions
import pytest

from pybondi.exceptions import PublishError
from pybondi.messaging.brokers.base import DEFAULT_GROUP
from pybondi.messaging.brokers.rabbitmq import ATTEMPT_HEADER, RabbitMQBroker, RabbitMQSubscription
from pybondi.messaging.envelope import Envelope
from tests import brokers
from tests.brokers import RabbitMQKit, on_kit, started, take
from tests.proxy import Proxy

pytestmark = pytest.mark.rabbitmq

LOST = (ConnectionError, aio_pika.exceptions.AMQPConnectionError)


@pytest.fixture
def kit() -> Iterator[RabbitMQKit]:
    yield from started(RabbitMQKit)


adapter = partial(brokers.adapter, kind=RabbitMQBroker)
envelopes = partial(brokers.envelopes, tenant="acme")


async def connected(*subscriptions: RabbitMQSubscription) -> None:
    """Have each subscription connect (and declare its queues) before anything is sent."""
    for subscription in subscriptions:
        assert await subscription.receive(10, wait=0) == []


@on_kit
async def test_receives_what_was_sent(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 3)
    await broker.asend(sent)  # before any consumer: the topic's queue keeps them
    subscription = kit.subscribe(broker, [topic])

    first = await subscription.receive(limit=2, wait=2.0)
    assert 1 <= len(first) <= 2
    received = first + await take(subscription, 3 - len(first))

    assert [delivery.envelope for delivery in received] == sent  # topic, id, headers, body
    assert all(delivery.attempt == 1 and delivery.problem is None for delivery in received)
    for delivery in received:
        await delivery.ack()
    assert await subscription.receive(10, wait=0.2) == []
    await subscription.close()
    assert await kit.read(topic, 0, timeout=0) == []  # acked: gone from the queue


@on_kit
async def test_consumers_of_a_group_split_the_messages(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    one = kit.subscribe(broker, [topic], consumer="c1", in_flight=4)
    two = kit.subscribe(broker, [topic], consumer="c2", in_flight=4)
    await connected(one, two)
    sent = envelopes(topic, 20)
    await broker.asend(sent)

    got: dict[str, list[str]] = {"c1": [], "c2": []}
    deadline = time.monotonic() + 10
    while len(got["c1"]) + len(got["c2"]) < 20 and time.monotonic() < deadline:
        for name, subscription in (("c1", one), ("c2", two)):
            for delivery in await subscription.receive(10, wait=0.05):
                got[name].append(delivery.envelope.id)
                await delivery.ack()

    assert sorted(got["c1"] + got["c2"]) == sorted(envelope.id for envelope in sent)  # once each
    assert got["c1"] and got["c2"]
    assert await one.receive(10, wait=0.2) == [] and await two.receive(10, wait=0) == []


@on_kit
async def test_another_group_gets_its_own_copies(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    default = kit.subscribe(broker, [topic])
    audit = kit.subscribe(broker, [topic], group="audit")
    assert broker.group_queue(topic, "audit") == f"{broker.queue(topic)}#audit"
    await connected(default, audit)  # the audit group's queue exists from here on
    sent = envelopes(topic, 3)
    await broker.asend(sent)

    for subscription in (default, audit):
        received = await take(subscription, 3)
        assert [delivery.envelope for delivery in received] == sent
        for delivery in received:
            await delivery.ack()
        assert await subscription.receive(10, wait=0.2) == []


@on_kit
async def test_unacked_messages_of_a_closed_subscription_come_back(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 2)
    await broker.asend(sent)
    gone = kit.subscribe(broker, [topic], consumer="gone")
    held = await take(gone, 2)
    assert [delivery.envelope.id for delivery in held] == [envelope.id for envelope in sent]

    await gone.close()
    with pytest.raises(ConnectionError):
        await held[0].ack()  # its channel is closed: the message went back

    heir = kit.subscribe(broker, [topic], consumer="heir")
    back = await take(heir, 2)
    assert [delivery.envelope for delivery in back] == sent
    assert [delivery.attempt for delivery in back] == [2, 2]  # quorum queues count them


@on_kit
async def test_in_flight_bounds_what_a_consumer_holds(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    await broker.asend(envelopes(topic, 5))
    small = kit.subscribe(broker, [topic], consumer="small", in_flight=2)

    held = await take(small, 2)
    assert len(held) == 2
    assert await small.receive(10, wait=0.3) == []  # 3 are waiting, but it holds 2 unacked
    other = kit.subscribe(broker, [topic], consumer="other")
    assert len(await take(other, 3)) == 3  # they went to nobody else

    await held[0].ack()
    await broker.asend(envelopes(topic, 1))  # `other` holds 3 of its 16: either may get it
    more = await small.receive(10, wait=0.3) + await other.receive(10, wait=0.3)
    assert len(more) == 1


@on_kit
async def test_a_retry_comes_back_after_its_delay_to_its_group_only(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    groups = {DEFAULT_GROUP: 0.6, "audit": 0.3}  # each retries after its own delay
    subscriptions = {group: kit.subscribe(broker, [topic], group=group) for group in groups}
    for group, delay in groups.items():
        kit.other_queues.append(f"{broker.group_queue(topic, group)}#retry#{round(delay * 1000)}")
    await connected(*subscriptions.values())
    [sent] = envelopes(topic, 1)
    await broker.asend([sent])

    retried: dict[str, float] = {}
    for group, subscription in subscriptions.items():
        [delivery] = await take(subscription, 1)
        retried[group] = time.monotonic()  # the delay runs from before retry() returns
        await delivery.retry(groups[group])
        assert await subscription.receive(10, wait=0) == []  # acked: not back at once

    for group, subscription in subscriptions.items():
        [again] = await take(subscription, 1)
        assert time.monotonic() - retried[group] >= groups[group]
        assert again.attempt == 2 and again.problem is None
        assert again.envelope == sent  # no x-death, no attempt header
        await again.retry(0.1)  # once more: the copy comes back once, at attempt 3
        kit.other_queues.append(f"{broker.group_queue(topic, group)}#retry#100")
        [third] = await take(subscription, 1)
        assert third.attempt == 3 and third.envelope == sent
        await third.ack()

    for subscription in subscriptions.values():  # one copy per group, not one per retry
        assert await subscription.receive(10, wait=0.8) == []


@on_kit
async def test_unreadable_messages_come_with_a_problem(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic])
    await connected(subscription)  # declares and binds the topic's queue
    assert kit.channel is not None
    exchange = await kit.channel.get_exchange(kit.exchange)
    bad_headers: dict[str, Any] = {
        "message-id": "bad-1",
        "tenant": bytearray(b"\xff\xfe"),  # not UTF-8
        "when": datetime(2024, 5, 1, tzinfo=UTC),  # an AMQP timestamp, not text
        "count": 3,
        "note": "fine",
        ATTEMPT_HEADER: 2,
    }
    await exchange.publish(aio_pika.Message(b"{}", headers=bad_headers), routing_key=topic)
    await exchange.publish(aio_pika.Message(b"[]"), routing_key=topic)  # no headers
    await exchange.publish(
        aio_pika.Message(b"1", headers={ATTEMPT_HEADER: "two"}, message_id="amqp-id"),
        routing_key=topic,
    )

    bad, bare, odd = await take(subscription, 3)
    assert bad.envelope == Envelope(
        topic, "bad-1", {"message-id": "bad-1", "count": "3", "note": "fine"}, b"{}"
    )
    assert bad.attempt == 2
    assert bad.problem is not None
    assert "tenant" in bad.problem and "when" in bad.problem and "bad-1" in bad.problem

    assert bare.problem is None and bare.envelope.headers == {} and bare.envelope.body == b"[]"
    assert bare.envelope.id  # the AMQP message_id (aio-pika makes one when there is none)

    assert odd.envelope.id == "amqp-id" and odd.attempt == 1
    assert odd.problem is not None and ATTEMPT_HEADER in odd.problem

    kit.other_queues.append(f"{broker.queue(topic)}#retry#50")
    await bad.retry(0.05)  # what could not be read travels with the copy
    [again] = await take(subscription, 1)
    assert again.attempt == 3 and again.problem == bad.problem
    assert again.envelope == bad.envelope
    await again.ack()
    await bare.ack()
    await odd.ack()


@on_kit
async def test_what_a_producer_sets_to_count_attempts_only_brings_the_last_one_sooner(
    kit: RabbitMQKit,
) -> None:
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic])
    await connected(subscription)
    assert kit.channel is not None
    exchange = await kit.channel.get_exchange(kit.exchange)
    # A producer's x-delivery-count on a first delivery is not RabbitMQ's: ignored.
    forged: dict[str, Any] = {"x-delivery-count": 7, "tenant": "acme"}
    await exchange.publish(aio_pika.Message(b"1", headers=forged), routing_key=topic)
    # Its attempt header is taken: it can only bring the message's last attempt sooner.
    await exchange.publish(aio_pika.Message(b"2", headers={ATTEMPT_HEADER: 9}), routing_key=topic)

    counted, sooner = await take(subscription, 2)
    assert (counted.attempt, counted.envelope.headers, counted.problem) == (
        1,
        {"tenant": "acme"},
        None,
    )
    assert (sooner.attempt, sooner.envelope.headers, sooner.problem) == (9, {}, None)
    await subscription.close()  # unacknowledged: RabbitMQ counts the redelivery

    heir = kit.subscribe(broker, [topic], consumer="heir")
    back = await take(heir, 2)
    assert sorted(delivery.attempt for delivery in back) == [2, 10]
    for delivery in back:
        await delivery.ack()


@on_kit
async def test_a_classic_queue_in_the_way_says_what_to_do(kit: RabbitMQKit) -> None:
    # As an older pybondi declared the topics' queues: classic, which RabbitMQ cannot
    # make quorum queues.
    broker, topic = adapter(kit), kit.topic()
    assert kit.channel is not None
    classic = await kit.channel.declare_queue(kit.prefix + topic, durable=True)
    what_to_do = rf"queue '{kit.prefix + topic}' exists, but not as pybondi declares it.*delete it"

    with pytest.raises(PublishError, match=what_to_do) as raised:
        await broker.asend(envelopes(topic, 1))
    assert "declare_queues=False" in str(raised.value)
    subscription = kit.subscribe(broker, [topic])
    with pytest.raises(ConnectionError, match=what_to_do):
        await subscription.receive(10, wait=0)

    # Kept as it is, without declarations: it works, but redeliveries go uncounted.
    await classic.bind(kit.exchange, routing_key=topic)
    as_is = adapter(kit, declare_queues=False)
    [sent] = envelopes(topic, 1)
    await as_is.asend([sent])
    [delivery] = await take(kit.subscribe(as_is, [topic]), 1)
    assert (delivery.envelope, delivery.attempt) == (sent, 1)
    await delivery.ack()


@on_kit
async def test_a_lost_connection_raises_then_reconnects(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    [sent] = envelopes(topic, 1)
    await broker.asend([sent])
    with Proxy("127.0.0.1", 5672) as proxy:
        url = kit.url.replace(":5672", f":{proxy.port}")
        assert url != kit.url
        subscription = kit.subscribe(adapter(kit, url), [topic])
        [held] = await take(subscription, 1)

        proxy.cut()
        started = time.monotonic()
        with pytest.raises(LOST):
            await subscription.receive(10, wait=5.0)
        assert time.monotonic() - started < 2.5  # woken by the loss, not after 5 s
        with pytest.raises(ConnectionError):
            await held.ack()
        with pytest.raises(LOST):
            await subscription.receive(10, wait=0)  # cannot connect while cut

        proxy.restore()
        [back] = await take(subscription, 1)  # connected again; RabbitMQ put it back
        assert back.envelope == sent
        await back.ack()
        await subscription.close()
    assert await kit.read(topic, 0, timeout=0) == []


@on_kit
async def test_a_deleted_queue_is_declared_again(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic])
    await connected(subscription)

    await kit.destroy(topic)  # RabbitMQ cancels the consumer
    with pytest.raises(ConnectionError, match="cancelled"):
        await subscription.receive(10, wait=5.0)
    await connected(subscription)  # declares the queue again
    [sent] = envelopes(topic, 1)
    await broker.asend([sent])
    [delivery] = await take(subscription, 1)
    assert delivery.envelope == sent
    await delivery.ack()


def test_group_names_cannot_take_another_queue_name() -> None:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(ValueError, match="#"):
        broker.subscribe(["orders"], "retry#100", consumer="c1")
    with pytest.raises(ValueError, match="in_flight"):
        broker.subscribe(["orders"], "billing", consumer="c1", in_flight=0)
    assert broker.group_queue("orders", DEFAULT_GROUP) == "orders"
    assert broker.group_queue("orders", "billing") == "orders#billing"
