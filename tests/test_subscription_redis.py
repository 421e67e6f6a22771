"""The consumer side of the Redis Streams adapter, on the real server: what only it does.

What every broker does is the contract suite's (tests/test_broker_contract.py). Messages
are sent with the adapter (or, when they must be malformed, with the kit's raw client)
and received through `RedisBroker.subscribe`; what stays in Redis (retry streams,
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


# Takeovers and retries ---------------------------------------------------------------


@on_kit
async def test_retries_wait_in_redis_and_go_once_acknowledged(kit: RedisKit) -> None:
    broker, topic = adapter(kit), kit.topic()
    # Twice the same message, any bytes as the body: each retry is one of its own.
    odd = Envelope(topic, "m-1", {"message-id": "m-1", "city": "Zürich"}, bytes(range(256)))
    await broker.asend([odd, odd])
    subscription = kit.subscribe(broker, [topic], "mine")
    retries, delayed = (f"{kit.prefix}{topic}#{kind}#mine" for kind in ("retry", "delayed"))

    got = await take(subscription, 2)
    retried_at = time.monotonic()
    for delivery in got:
        await delivery.retry(0.5)
    assert await raw(kit).zcard(delayed) == 2  # durable: in the group's delayed set
    back = await take(subscription, 2)

    assert 0.5 <= time.monotonic() - retried_at < 1.5  # moved once due, not much later
    assert [(delivery.envelope, delivery.attempt) for delivery in back] == [(odd, 2)] * 2
    assert await raw(kit).xlen(retries) == 2  # due: in the group's retry stream
    await back[0].ack()
    await back[1].retry(0.1)
    [third] = await take(subscription, 1)
    assert (third.envelope, third.attempt) == (odd, 3)
    await third.ack()

    # Acknowledged retries are deleted; the topic's stream keeps its entries, for every group.
    assert await raw(kit).xlen(retries) == 0
    assert await raw(kit).zcard(delayed) == 0
    assert await raw(kit).xlen(kit.prefix + topic) == 2


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
