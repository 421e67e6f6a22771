"""The consumer side of the Redis Streams adapter, on the real server.

Messages are sent with the adapter (or, when they must be malformed, with the kit's raw
client) and received through `RedisBroker.subscribe`; what stays in Redis (retry streams,
delayed sets) is checked with the raw client. The kit deletes every key of the test's
prefix afterwards, retry streams and delayed sets included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from functools import partial

import pytest
import redis
import redis.asyncio
from redis.typing import EncodableT, FieldT

from pybondi.messaging.brokers.base import DEFAULT_GROUP
from pybondi.messaging.brokers.redis import RedisBroker
from pybondi.messaging.envelope import Envelope
from tests import brokers
from tests.brokers import RedisKit, envelopes, on_kit, started
from tests.proxy import Proxy

pytestmark = pytest.mark.redis

LOST = (redis.ConnectionError, redis.TimeoutError, OSError)


@pytest.fixture
def kit() -> Iterator[RedisKit]:
    yield from started(RedisKit)


adapter = partial(brokers.adapter, kind=RedisBroker)
take = partial(brokers.take, timeout=3.0, wait=0.1)


def redis_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def raw(kit: RedisKit) -> redis.asyncio.Redis:
    assert kit.client is not None
    return kit.client


# Receiving --------------------------------------------------------------------------


@on_kit
async def test_receives_what_was_sent(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 3, tenant="acme", city="Zürich")
    await broker.asend(sent)  # before the group exists: a new group starts at the oldest
    subscription = kit.subscribe(broker, [topic])

    got = await subscription.receive(10, wait=1.0)

    assert [delivery.envelope for delivery in got] == sent
    assert [(delivery.attempt, delivery.problem) for delivery in got] == [(1, None)] * 3
    for delivery in got:
        await delivery.ack()

    # A receive waiting for messages returns as soon as one comes.
    waiting = asyncio.create_task(subscription.receive(10, wait=5.0))
    await asyncio.sleep(0.1)
    [late] = envelopes(topic, 1)
    sent_at = time.monotonic()
    await broker.asend([late])
    [delivery] = await waiting
    assert delivery.envelope == late
    assert time.monotonic() - sent_at < 1.0
    await delivery.ack()

    # Acknowledged: not even a consumer taking over the silent ones gets them again.
    other = kit.subscribe(broker, [topic], consumer="c2", redeliver_after=0.1)
    await asyncio.sleep(0.2)
    assert await other.receive(10, wait=0.2) == []
    assert await subscription.receive(10, wait=0) == []
    assert await raw(kit).xlen(kit.prefix + topic) == 4  # topic streams are never trimmed


@on_kit
async def test_consumers_of_a_group_share_the_messages(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 20)
    await broker.asend(sent)
    consumers = {name: kit.subscribe(broker, [topic], consumer=name) for name in ("a", "b")}
    seen: dict[str, list[str]] = {"a": [], "b": []}

    deadline = time.monotonic() + 3
    while sum(map(len, seen.values())) < 20 and time.monotonic() < deadline:
        for name, subscription in consumers.items():
            for delivery in await subscription.receive(3, wait=0.1):
                seen[name].append(delivery.envelope.id)
                await delivery.ack()

    assert sorted(seen["a"] + seen["b"]) == sorted(item.id for item in sent)  # each once
    assert seen["a"]
    assert seen["b"]
    for subscription in consumers.values():
        assert await subscription.receive(10, wait=0) == []


@on_kit
async def test_each_group_gets_every_message(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 5)
    await broker.asend(sent)

    for group in ("billing", "shipping"):
        subscription = kit.subscribe(broker, [topic], group)
        got = await take(subscription, 5)
        assert [delivery.envelope for delivery in got] == sent
        for delivery in got:
            await delivery.ack()
        assert await subscription.receive(10, wait=0) == []


@on_kit
async def test_limit_and_in_flight_are_never_exceeded(kit: RedisKit) -> None:
    broker, first, second = adapter(kit), kit.topic(), kit.topic()
    sent = envelopes(first, 5) + envelopes(second, 5)
    await broker.asend(sent)
    subscription = kit.subscribe(broker, [first, second])

    # XREADGROUP's COUNT holds per stream: the adapter shares `limit` among the four
    # streams (two topics, two retry streams), and never hands out more than `limit`.
    batches = [await subscription.receive(3, wait=0.5) for _ in range(6)]

    assert all(1 <= len(batch) <= 3 for batch in batches[:5]), batches
    got = [delivery.envelope for batch in batches for delivery in batch]
    assert sorted(got, key=lambda item: item.id) == sorted(sent, key=lambda item: item.id)
    assert await subscription.receive(0, wait=1.0) == []

    small = kit.subscribe(broker, [first], "small", in_flight=2)
    held = [await small.receive(10, wait=1.0) for _ in range(4)]
    assert all(1 <= len(batch) <= 2 for batch in held)  # in_flight bounds the limit


@on_kit
async def test_a_delivery_kept_too_long_comes_back_through_takeover(kit: RedisKit) -> None:
    broker, first, second = adapter(kit), kit.topic(), kit.topic()
    sent = envelopes(first, 1) + envelopes(second, 1)
    await broker.asend(sent)
    subscription = kit.subscribe(broker, [first, second], redeliver_after=0.2)

    [now] = await subscription.receive(1, wait=1.0)  # reads both, keeps one for later
    await now.ack()
    await asyncio.sleep(0.15)  # longer than half of redeliver_after: dropped, not returned
    assert await subscription.receive(1, wait=0) == []
    [later] = await take(subscription, 1)

    assert [now.envelope, later.envelope] == sent
    assert (now.attempt, later.attempt) == (1, 2)  # taken over from the consumer itself
    await later.ack()
    assert await subscription.receive(10, wait=0.3) == []


# Redelivery and retries -------------------------------------------------------------


@on_kit
async def test_messages_of_a_silent_consumer_go_to_another(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    sent = envelopes(topic, 3)
    await broker.asend(sent)
    first = kit.subscribe(broker, [topic], consumer="first", redeliver_after=0.3)
    second = kit.subscribe(broker, [topic], consumer="second", redeliver_after=0.3)

    read_at = time.monotonic()
    held = await first.receive(10, wait=1.0)
    assert len(held) == 3
    await held[0].ack()
    await first.close()  # the other two stay pending, held by `first`
    assert await second.receive(10, wait=0.1) == []  # not before redeliver_after

    back = await take(second, 2)

    assert time.monotonic() - read_at >= 0.3
    assert [delivery.envelope for delivery in back] == sent[1:]
    assert [delivery.attempt for delivery in back] == [2, 2]  # the takeover counts
    for delivery in back:
        await delivery.ack()
    await asyncio.sleep(0.4)
    assert await second.receive(10, wait=0.1) == []


@on_kit
async def test_a_retry_comes_back_after_its_delay_to_its_group_only(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    # Any bytes as the body, and twice the same message: both must come back.
    odd = Envelope(topic, "m-1", {"message-id": "m-1", "city": "Zürich"}, bytes(range(256)))
    await broker.asend([odd, odd])
    mine = kit.subscribe(broker, [topic], "mine", consumer="a")
    theirs = kit.subscribe(broker, [topic], "theirs", consumer="b")
    retries, delayed = (f"{kit.prefix}{topic}#{kind}#mine" for kind in ("retry", "delayed"))

    got = await mine.receive(10, wait=1.0)
    assert [delivery.attempt for delivery in got] == [1, 1]
    retried_at = time.monotonic()
    for delivery in got:
        await delivery.retry(0.5)
    assert await raw(kit).zcard(delayed) == 2
    await mine.close()  # the retries are in Redis, not in the subscription

    again = kit.subscribe(broker, [topic], "mine", consumer="c")
    assert await again.receive(10, wait=0.2) == []  # not before the delay
    back = await take(again, 2)

    assert 0.5 <= time.monotonic() - retried_at < 1.5  # a real delay, not much longer
    assert [delivery.envelope for delivery in back] == [odd, odd]
    assert [(delivery.attempt, delivery.problem) for delivery in back] == [(2, None)] * 2
    await back[0].ack()
    await back[1].retry(0.1)
    [third] = await take(again, 1)
    assert (third.envelope, third.attempt) == (odd, 3)
    await third.ack()

    # Acknowledged retries are deleted; the topic's stream keeps its entries.
    assert await raw(kit).xlen(retries) == 0
    assert await raw(kit).zcard(delayed) == 0
    assert await raw(kit).xlen(kit.prefix + topic) == 2
    # The other group got each entry once, and none of the retries.
    other = await take(theirs, 2)
    assert [(delivery.envelope, delivery.attempt) for delivery in other] == [(odd, 1)] * 2
    for delivery in other:
        await delivery.ack()
    assert await theirs.receive(10, wait=0.3) == []


# Broken entries and broken connections ------------------------------------------------


@on_kit
async def test_entries_that_are_not_messages_come_with_a_problem(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    stream, client = kit.prefix + topic, raw(kit)
    entries: list[dict[FieldT, EncodableT]] = [
        {"body": b"no headers"},
        {"headers": b"{not json", "body": b"b"},
        {"headers": b'["a list"]', "body": b"c"},
        {"headers": b'{"message-id": "m-9", "n": 1, "ok": "yes"}', "body": b"d"},
        {"headers": b'{"message-id": "m-10"}'},
    ]
    ids = [redis_str(await client.xadd(stream, fields)) for fields in entries]
    [fine] = envelopes(topic, 1)
    await broker.asend([fine])
    subscription = kit.subscribe(broker, [topic])

    got = await take(subscription, 6)

    own = [f"{stream}/{id}" for id in ids]  # the stream's name and the entry id
    assert [delivery.envelope for delivery in got] == [
        Envelope(topic, own[0], {}, b"no headers"),
        Envelope(topic, own[1], {}, b"b"),
        Envelope(topic, own[2], {}, b"c"),
        Envelope(topic, "m-9", {"message-id": "m-9", "ok": "yes"}, b"d"),
        Envelope(topic, "m-10", {"message-id": "m-10"}, b""),
        fine,
    ]
    problems = [delivery.problem for delivery in got]
    # A body alone is a message, from a producer that sends no headers.
    assert problems[0] is None and problems[-1] is None
    for problem, expected in zip(
        problems[1:],
        ["not JSON", "not a JSON object", "not strings", "no body field"],
        strict=False,
    ):
        assert problem is not None
        assert expected in problem
        assert stream in problem
    # A retried message keeps its id, even when the id is the entry's.
    await got[0].retry(0)
    [back] = await take(subscription, 1)
    assert (back.envelope.id, back.envelope.body, back.attempt) == (own[0], b"no headers", 2)
    await back.ack()
    for delivery in got[1:]:
        await delivery.ack()

    # A delayed retry that cannot be read comes back too, as a problem, not as a stuck group.
    await client.zadd(f"{stream}#delayed#{DEFAULT_GROUP}", {"not a retry": 0})
    [unreadable] = await take(subscription, 1)
    assert unreadable.envelope.body == b"not a retry"
    assert unreadable.problem is not None
    assert "its attempt is not a number" in unreadable.problem
    await unreadable.ack()
    assert await client.xlen(f"{stream}#retry#{DEFAULT_GROUP}") == 0


@on_kit
async def test_a_deleted_stream_or_group_is_made_again(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    first, second = envelopes(topic, 2)
    await broker.asend([first])
    subscription = kit.subscribe(broker, [topic])
    [delivery] = await subscription.receive(10, wait=1.0)
    await delivery.ack()

    await kit.destroy(topic)  # the stream, and the group with it
    await broker.asend([second])

    [delivery] = await subscription.receive(10, wait=1.0)
    assert delivery.envelope == second
    await delivery.ack()


@on_kit
async def test_a_lost_connection_raises_then_reconnects(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    [sent] = envelopes(topic, 1)
    await broker.asend([sent])
    with Proxy("127.0.0.1", 6379) as proxy:
        url = kit.url.replace(":6379", f":{proxy.port}")
        assert url != kit.url
        subscription = kit.subscribe(adapter(kit, url), [topic], redeliver_after=0.3)
        [held] = await subscription.receive(10, wait=1.0)

        proxy.cut()
        with pytest.raises(LOST):
            await subscription.receive(10, wait=5.0)
        with pytest.raises(LOST):
            await held.ack()

        proxy.restore()
        [back] = await take(subscription, 1)  # connected again, and took it over
        assert (back.envelope, back.attempt) == (sent, 2)
        await back.ack()
        await subscription.close()

    dead = adapter(kit, kit.dead_url, **kit.impatient)
    with pytest.raises(LOST):
        await kit.subscribe(dead, [topic]).receive(10, wait=0.1)


@on_kit
async def test_a_closing_consumer_leaves_the_group_unless_it_holds_entries(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    stream = kit.prefix + topic
    await broker.asend(envelopes(topic, 2))
    done = kit.subscribe(broker, [topic], consumer="done")
    [first] = await take(done, 1)
    await first.ack()
    await done.close()  # held nothing: gone from the group
    holding = kit.subscribe(broker, [topic], consumer="holding")
    await take(holding, 1)
    await holding.close()  # still holds an entry: stays, so that it can be taken over
    consumers = await raw(kit).xinfo_consumers(stream, DEFAULT_GROUP)
    assert [redis_str(consumer["name"]) for consumer in consumers] == ["holding"]


@on_kit
async def test_a_stream_deleted_during_a_blocked_receive_is_made_again(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    subscription = kit.subscribe(broker, [topic])
    assert await subscription.receive(1, wait=0.1) == []  # the groups exist
    receiving = asyncio.ensure_future(subscription.receive(1, wait=1.5))
    await asyncio.sleep(0.3)
    await raw(kit).delete(kit.prefix + topic)  # Redis unblocks the read: UNBLOCKED
    assert await receiving == []
    sent = envelopes(topic, 1)
    await broker.asend(sent)
    [got] = await take(subscription, 1)
    assert got.envelope == sent[0]
