"""The consumer side of the NATS JetStream adapter, on the real server: what only it does.

What every broker does is the contract suite's (tests/test_broker_contract.py).
Messages are sent with the adapter (or, when they must lack pybondi's headers, with the
kit's raw client) and received through `NATSBroker.subscribe`; the consumers the
subscriptions made are checked with the raw client. The kit deletes every stream of the
test's prefix afterwards, and the consumers go with them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial

import pytest

import pybondi.messaging.brokers.nats.subscription
from pybondi import Message
from pybondi.messaging.brokers.nats import NATSBroker
from pybondi.messaging.envelope import Envelope
from tests import brokers
from tests.brokers import NATSKit, ack, envelopes, on_kit, started
from tests.proxy import Proxy

pytestmark = pytest.mark.nats


@pytest.fixture
def kit() -> Iterator[NATSKit]:
    yield from started(NATSKit)


adapter = partial(brokers.adapter, kind=NATSBroker)
take = partial(brokers.take, limit=100)


@on_kit
async def test_sent_messages_are_received_as_sent(kit: NATSKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    registered = Envelope.seal(
        topic, Message({"n": 1}, sender="billing", headers={"tenant": "acme", "city": "Zürich"})
    )
    sent = [registered, *envelopes(topic, 2)]
    await broker.asend(sent)
    # Messages from elsewhere: without any header, and with only JetStream's id.
    js = kit._js()
    bare = await js.publish(topic, b"bare")
    await js.publish(topic, b"raw", headers={"Nats-Msg-Id": "raw-1", "custom": "yes"})

    subscription = kit.subscribe(broker, [topic])
    got = await take(subscription, 5)

    assert [delivery.envelope for delivery in got[:3]] == sent  # no Nats-Msg-Id header
    assert [(delivery.attempt, delivery.problem) for delivery in got] == [(1, None)] * 5
    assert got[3].envelope == Envelope(topic, f"{bare.stream}/{bare.seq}", {}, b"bare")
    assert got[4].envelope == Envelope(topic, "raw-1", {"custom": "yes"}, b"raw")
    await ack(got)
    assert await subscription.receive(10, wait=0.2) == []


@on_kit
async def test_stored_messages_with_a_status_line_come_with_a_problem(kit: NATSKit) -> None:
    # JetStream answers pull requests with control messages whose header block begins
    # with a status line; a raw HPUB can store such a message in a stream too.
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic])
    assert await subscription.receive(10, wait=0) == []  # declares the stream
    statuses = ["503", "404 No Messages", "408 Request Timeout", "100 Idle Heartbeat"]
    good = envelopes(topic, len(statuses) + 1)
    for status, envelope in zip(statuses, good, strict=False):
        header = f"NATS/1.0 {status}\r\nmessage-id: bad-{status[:3]}\r\n\r\n"
        await kit.publish_raw(topic, header.encode(), b"{}")
        await broker.asend([envelope])
    await kit.publish_raw(topic, b"NATS/1.0 503\r\n\r\n", b"bare")
    # An ordinary header named Status is no status line.
    await kit.publish_raw(topic, b"NATS/1.0\r\nStatus: shipped\r\n\r\n", b"odd")
    await broker.asend(good[-1:])

    got = await take(subscription, 11, timeout=10.0)  # raises if the connection dropped

    fine = [delivery for delivery in got if delivery.problem is None]
    bad = [delivery for delivery in got if delivery.problem is not None]
    assert [delivery.envelope for delivery in fine if delivery.envelope in good] == good
    [odd] = [delivery.envelope for delivery in fine if delivery.envelope not in good]
    assert (odd.headers, odd.body) == ({"Status": "shipped"}, b"odd")
    assert [delivery.envelope.id for delivery in bad[:-1]] == [
        "bad-503",
        "bad-404",
        "bad-408",
        "bad-100",
    ]
    for delivery, status in zip(bad, ["503", "404", "408", "100", "503"], strict=True):
        assert delivery.problem == (
            f"its NATS header block begins with a status line {status}, which JetStream "
            f"uses for control messages"
        )
        assert "Status" not in delivery.envelope.headers
    last = bad[-1].envelope
    assert (last.headers, last.body) == ({}, b"bare")
    assert last.id.startswith(kit.stream(topic) + "/")  # no message-id: stream/sequence
    await ack(got)
    assert await subscription.receive(10, wait=0.5) == []


@on_kit
async def test_a_subscription_made_before_any_message_declares_what_it_needs(
    kit: NATSKit,
) -> None:
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic], "billing.v2", redeliver_after=5.0)

    started = time.monotonic()
    assert await subscription.receive(10, wait=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.0  # waited, but not much longer

    # The stream is the one a send would declare, and the consumer is named after the group
    # (with a hash of the name, as the dot had to go: group billing_v2 is another one).
    stream, durable = kit.stream(topic), "billing_v2_08175fd3"
    assert subscription.consumers == {topic: (stream, durable)}
    info = await kit._js().consumer_info(stream, durable)
    config = info.config
    assert (config.filter_subject, config.ack_policy, config.deliver_policy) == (
        topic,
        "explicit",
        "all",
    )
    assert (config.ack_wait, config.max_deliver, config.max_ack_pending) == (5.0, -1, 10_000)

    [sent] = envelopes(topic, 1)
    started = time.monotonic()
    await broker.asend([sent])
    [delivery] = await subscription.receive(10, wait=2.0)
    assert time.monotonic() - started < 0.5  # the waiting fetch got it at once
    assert delivery.envelope == sent
    await delivery.ack()


@on_kit
async def test_a_replayed_message_is_not_dropped_as_a_duplicate(kit: NATSKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    [sent] = envelopes(topic, 1)
    replayed = Envelope(
        topic, sent.id, {**sent.headers, "replayed-at": "2030-01-01T00:00:00+00:00"}, sent.body
    )
    await broker.asend([sent])
    await broker.asend([sent])  # a relay sending again: dropped
    await broker.asend([replayed])  # same message id, replayed: kept
    await broker.asend([replayed])  # that replay sent again: dropped

    subscription = kit.subscribe(broker, [topic])
    got = await take(subscription, 3, timeout=1.0)
    assert [delivery.envelope for delivery in got] == [sent, replayed]
    await ack(got)


@on_kit
async def test_topics_of_a_stream_of_their_own_get_a_consumer_each(kit: NATSKit) -> None:
    # A stream someone else made, keeping several topics: the adapter sends to it.
    one, two = f"shared.{kit.id}.one", f"shared.{kit.id}.two"
    kit.topics += [one, two]
    await kit._js().add_stream(name=f"{kit.prefix}shared", subjects=[f"shared.{kit.id}.>"])
    broker = adapter(kit)
    sent = envelopes(one, 2) + envelopes(two, 2)
    await broker.asend(sent)

    subscription = kit.subscribe(broker, [one, two], "billing")
    got = await take(subscription, 4)
    assert sorted(delivery.envelope.id for delivery in got) == sorted(e.id for e in sent)
    stream = f"{kit.prefix}shared"
    names = {topic: subscription.consumers[topic][1] for topic in (one, two)}
    assert subscription.consumers == {one: (stream, names[one]), two: (stream, names[two])}
    assert names[one].startswith(f"billing_shared_{kit.id}_one_")
    assert names[two].startswith(f"billing_shared_{kit.id}_two_")
    await ack(got)
    assert await subscription.receive(10, wait=0.2) == []


@on_kit
async def test_groups_whose_names_differ_only_where_nats_refuses_them_stay_apart(
    kit: NATSKit,
) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 3)
    await broker.asend(sent)
    for group in ("billing.eu", "billing_eu"):  # each group gets every message
        got = await take(kit.subscribe(broker, [topic], group), 3)
        assert sorted(delivery.envelope.id for delivery in got) == sorted(e.id for e in sent)
        await ack(got)


@on_kit
async def test_a_lost_connection_raises_then_reconnects(kit: NATSKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    first, second = envelopes(topic, 2)
    await broker.asend([first])
    with Proxy("127.0.0.1", 4222) as proxy:
        url = kit.url.replace(":4222", f":{proxy.port}")
        assert url != kit.url
        behind = adapter(kit, url, timeout=1.0)
        subscription = kit.subscribe(behind, [topic], redeliver_after=0.5)
        [held] = await subscription.receive(10, wait=1.0)
        assert held.envelope == first

        proxy.cut()
        with pytest.raises(ConnectionError):
            await subscription.receive(10, wait=5.0)  # the fetch fails with the connection
        with pytest.raises(ConnectionError):
            await subscription.receive(10, wait=5.0)  # connecting again fails
        with pytest.raises(ConnectionError):
            await held.ack()

        proxy.restore()
        await broker.asend([second])
        got = await take(subscription, 2)  # connected again
        got.sort(key=lambda delivery: delivery.attempt, reverse=True)  # in either order
        assert [(d.envelope, d.attempt) for d in got] == [(first, 2), (second, 1)]
        await ack(got)
        assert await subscription.receive(10, wait=0.7) == []


@on_kit
async def test_a_deleted_stream_is_declared_again(kit: NATSKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    first, second = envelopes(topic, 2)
    await broker.asend([first])
    subscription = kit.subscribe(broker, [topic])
    [delivery] = await subscription.receive(10, wait=1.0)
    await delivery.ack()

    await kit.destroy(topic)  # as an operator may: the consumer goes with it
    with pytest.MonkeyPatch.context() as patch:
        # Not 10 s: at once.
        patch.setattr(pybondi.messaging.brokers.nats.subscription, "_CHECK_AFTER", 0.0)
        with pytest.raises(ConnectionError, match="is gone.*declares it again"):
            for _ in range(5):  # a fetch that brought nothing makes the check
                assert await subscription.receive(10, wait=0.2) == []
    assert await subscription.receive(10, wait=0.2) == []  # declared again
    await broker.asend([second])
    [delivery] = await subscription.receive(10, wait=1.0)
    assert (delivery.envelope, delivery.attempt) == (second, 1)
    await delivery.ack()


@on_kit
async def test_what_cannot_be_consumed_says_why(kit: NATSKit) -> None:
    topic = kit.topic()
    undeclared = kit.subscribe(adapter(kit, declare_streams=False), [topic])
    with pytest.raises(ConnectionError, match="no JetStream stream keeps the subject"):
        await undeclared.receive(10, wait=0.1)

    dead = kit.subscribe(adapter(kit, kit.dead_url, timeout=0.5), [topic])
    with pytest.raises(ConnectionError):
        await dead.receive(10, wait=0.1)

    broker = adapter(kit)
    with pytest.raises(ValueError, match="list of topics"):
        broker.subscribe(topic, "billing", consumer="c1")
    with pytest.raises(ValueError, match="list of topics"):
        broker.subscribe([], "billing", consumer="c1")
    with pytest.raises(ValueError, match="needs a name"):
        broker.subscribe([topic], "..", consumer="c1")
    with pytest.raises(ValueError, match="in_flight"):
        broker.subscribe([topic], "billing", consumer="c1", in_flight=0)
