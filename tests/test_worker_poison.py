"""Bad input from anyone who can publish, on Redis, RabbitMQ and NATS, with PostgreSQL.

Each bad message is published with the broker's own client, as an attacker (or a broken
producer) would: it must end as a dead letter whose reason names its problem, without a
handler running and without holding anything up, and a good message published behind
them must be handled within two seconds. The `stress` test floods each broker with
2,000 of them before 100 good ones.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

import aio_pika
import pytest
from redis.typing import EncodableT, FieldT

from pybondi import Depends, Message, Session
from pybondi.messaging.brokers.rabbitmq import ATTEMPT_HEADER
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.messaging.envelope import Envelope
from tests.backends import Backend
from tests.brokers import BrokerKit, NATSKit, RabbitMQKit, RedisKit
from tests.workers import Counted, WorkerRig, eventually, registry

pytestmark = pytest.mark.postgres

Publish = Callable[[BrokerKit, str, int], Awaitable[None]]


@pytest.fixture
def rig(backends: dict[str, Backend], broker: BrokerKit) -> Iterator[WorkerRig]:
    rig = WorkerRig(backends["postgres"], broker)
    try:
        yield rig
    finally:
        rig.close()


def sealed(topic: str, n: int) -> Envelope:
    return Envelope.seal(topic, Message(Counted("k", n)), registry)


def changed(**headers: str) -> Publish:
    """A good message but for these headers, published as it is."""

    async def publish(kit: BrokerKit, topic: str, n: int) -> None:
        envelope = sealed(topic, n)
        await kit.publish_as_is(topic, {**envelope.headers, **headers}, envelope.body)

    return publish


def body(text: bytes) -> Publish:
    """A message with good headers and this body."""

    async def publish(kit: BrokerKit, topic: str, n: int) -> None:
        await kit.publish_as_is(topic, {**sealed(topic, n).headers}, text)

    return publish


# What every broker carries: (what, how it is published, what its dead letter says).
BAD: list[tuple[str, Publish, str]] = [
    ("a body that is not JSON", body(b"{not json"), "the data is not valid JSON"),
    ("a body that is no object", body(b"[1, 2]"), "the data must be a JSON object"),
    ("a payload that does not fit", body(b'{"key": "k", "n": "one"}'), "Cannot build Counted"),
    ("an unknown type", changed(**{"message-type": "nope"}), "registered under the name 'nope'"),
    ("an id of 300 characters", changed(**{"message-id": "x" * 300}), "has 300 characters"),
    ("a version that is no number", changed(**{"message-version": "two"}), "malformed"),
    ("a time that is no time", changed(timestamp="yesterday"), "Invalid isoformat"),
]


async def redis_fields(kit: BrokerKit, topic: str, fields: dict[FieldT, EncodableT]) -> None:
    assert isinstance(kit, RedisKit)
    await kit._client().xadd(kit.prefix + topic, fields)


async def rabbitmq_headers(kit: BrokerKit, topic: str, headers: dict[str, object]) -> None:
    assert isinstance(kit, RabbitMQKit) and kit.channel is not None
    await kit.declare(topic)
    exchange = await kit.channel.get_exchange(kit.exchange)
    message = aio_pika.Message(b"{}", headers=headers)  # type: ignore[arg-type]
    await exchange.publish(message, routing_key=topic)


def nats_status(status: str) -> Publish:
    """A message whose header block begins with a status line, as JetStream's own do."""

    async def publish(kit: BrokerKit, topic: str, n: int) -> None:
        assert isinstance(kit, NATSKit)
        await kit.add_stream(topic)
        await kit.publish_raw(topic, f"NATS/1.0 {status}\r\n\r\n".encode(), b"{}")

    return publish


# What only one broker's format allows.
OWN: dict[str, list[tuple[str, Publish, str]]] = {
    "redis": [
        (
            "headers that are not JSON",
            lambda kit, topic, n: redis_fields(kit, topic, {"headers": "{oops", "body": "{}"}),
            "has headers that are not JSON",
        ),
        (
            "headers that are not text",
            lambda kit, topic, n: redis_fields(kit, topic, {"headers": '{"a": 1}', "body": "{}"}),
            "has headers whose values are not strings",
        ),
        (
            "no body",
            lambda kit, topic, n: redis_fields(kit, topic, {"headers": "{}"}),
            "has no body field",
        ),
    ],
    "rabbitmq": [
        (
            "a header that is no text",
            lambda kit, topic, n: rabbitmq_headers(kit, topic, {"tenant": {"a": 1}}),
            "header tenant is {'a': 1}, not text",
        ),
        (
            "an attempt that is no number",
            lambda kit, topic, n: rabbitmq_headers(kit, topic, {ATTEMPT_HEADER: "lots"}),
            "not an attempt",
        ),
    ],
    "nats": [
        (
            f"a status line {status}",
            nats_status(status),
            f"begins with a status line {status}",
        )
        for status in ("503", "404", "408", "100")
    ],
}


def counting(rig: WorkerRig, topic: str, ran: list[int]) -> Consumer:
    consumer = Consumer(None, registry, retry=Retry(attempts=3, delay=0.2), in_flight=16)
    consumer.repository = rig.consumer().repository

    @consumer.subscribe(topic)
    async def handle(message: Message[Counted], session: Session = Depends(current_session)):
        ran.append(message.payload.n)

    return consumer


def test_bad_input_is_dead_lettered_naming_its_problem_and_holds_nothing_up(
    rig: WorkerRig,
) -> None:
    kit = rig.kit
    cases = BAD + OWN[kit.name]

    async def test() -> None:
        topic, ran = kit.topic(), list[int]()
        worker = rig.worker(counting(rig, topic, ran))
        task = rig.start(worker)
        for n, (_, publish, _) in enumerate(cases):
            await publish(kit, topic, n)
        good = sealed(topic, 1000)
        sent = time.monotonic()
        await kit.publish_as_is(topic, good.headers, good.body)

        async def handled() -> bool:
            return 1000 in ran

        await eventually(handled, timeout=2.0, what="the good message handled within 2 s")
        took = time.monotonic() - sent

        async def all_dead() -> bool:
            return len(await rig.dead_letters()) == len(cases)

        await eventually(all_dead, what=f"{len(cases)} dead letters")
        await rig.stop(worker, task)
        assert ran == [1000] and took < 2.0  # no handler ran for the bad ones
        errors = [letter.error for letter in await rig.dead_letters()]
        for what, _, reason in cases:
            assert any(reason in error for error in errors), (what, reason, errors)
        assert worker.retried == 0

    rig.run(test())


@pytest.mark.stress
def test_a_flood_of_poison_never_stops_good_messages(rig: WorkerRig) -> None:
    kit = rig.kit
    poison, good = 2_000, 100

    async def test() -> None:
        topic, ran = kit.topic(), list[int]()
        worker = rig.worker(counting(rig, topic, ran))
        task = rig.start(worker)
        kinds = [publish for _, publish, _ in BAD + OWN[kit.name]]
        for n in range(poison):
            await kinds[n % len(kinds)](kit, topic, n)
        for n in range(good):
            envelope = sealed(topic, 10_000 + n)
            await kit.publish_as_is(topic, envelope.headers, envelope.body)

        async def settled() -> bool:
            return len(ran) == good and len(await rig.dead_letters()) == poison

        await eventually(settled, timeout=180.0, what="every good one handled, every bad one dead")
        await rig.stop(worker, task)
        assert sorted(ran) == [10_000 + n for n in range(good)]
        letters = await rig.dead_letters()
        assert len(letters) == poison and all(letter.attempts == 1 for letter in letters)

    rig.run(test())
