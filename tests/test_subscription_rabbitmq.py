"""The consumer side of the RabbitMQ adapter, on the real server: what only it does.

What every broker does is the contract suite's (tests/test_broker_contract.py). Messages
are sent with the adapter (or, when they must be malformed, with aio-pika) and received
through `RabbitMQBroker.subscribe`; the queues' contents are checked with the kit's own
client (tests/brokers.py).
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
async def test_a_closed_subscription_s_deliveries_cannot_be_settled(kit: RabbitMQKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 2)
    await broker.asend(sent)
    gone = kit.subscribe(broker, [topic], consumer="gone")
    held = await take(gone, 2)

    await gone.close()
    with pytest.raises(ConnectionError):
        await held[0].ack()  # its channel is closed: the message went back
    with pytest.raises(ConnectionError):
        await held[1].retry(0.1)
    with pytest.raises(RuntimeError, match="closed"):
        await gone.receive(10, wait=0)

    heir = kit.subscribe(broker, [topic], consumer="heir")
    back = await take(heir, 2)
    assert [(delivery.envelope, delivery.attempt) for delivery in back] == [(e, 2) for e in sent]


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
