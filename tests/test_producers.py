"""Producers that do not speak pybondi: plain JSON, no type header, ids of their own.

Another team's service writes `{"ref": ..., "qty": ...}` to a topic with its broker's
plain client. A subscription bound to a type (or to a function of the body) gets typed
payloads; the id is the header the consumer names, else the broker's own; the time is
the broker's. Run on Redis, RabbitMQ and NATS, with PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pybondi import Command, Message, Messagebus
from pybondi.messaging.consumer import Consumer, Retry
from pybondi.persistence.serialization import Registry
from tests.backends import Backend
from tests.brokers import BrokerKit
from tests.workers import WorkerRig, eventually

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class BatchCreated:
    ref: str
    sku: str
    qty: int


@dataclass(frozen=True)
class BatchDropped:
    ref: str


@dataclass(frozen=True)
class Allocate(Command):
    orderid: str
    sku: str
    qty: int


types = Registry()
for kind in (BatchCreated, BatchDropped, Allocate):
    types.register(kind, name=f"allocation.{kind.__name__}")


@pytest.fixture
def rig(backends: dict[str, Backend], broker: BrokerKit) -> Iterator[WorkerRig]:
    rig = WorkerRig(backends["postgres"], broker)
    try:
        yield rig
    finally:
        rig.close()


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_plain_json_feeds_typed_subscriptions(rig: WorkerRig) -> None:
    kit = rig.kit
    batches, events, loose = kit.topic("batches"), kit.topic("events"), kit.topic("loose")
    got: list[Message[Any]] = []
    consumer = Consumer(None, types, retry=Retry(attempts=2, delay=0.1))

    @consumer.subscribe(batches, payload=BatchCreated, id_header="x-request-id")
    @consumer.subscribe(
        events, payload=lambda body: BatchCreated if "qty" in body else BatchDropped
    )
    @consumer.subscribe(loose)  # no type: the body as plain JSON
    def keep(message: Message[Any]) -> None:
        got.append(message)

    async def test() -> None:
        before = datetime.now(UTC) - timedelta(seconds=5)
        await kit.publish_as_is(batches, {}, body(ref="b1", sku="LAMP", qty=10))
        await kit.publish_as_is(
            batches, {"x-request-id": "req-42"}, body(ref="b2", sku="LAMP", qty=5)
        )
        await kit.publish_as_is(events, {}, body(ref="b1"))
        await kit.publish_as_is(events, {}, body(ref="b3", sku="SOFA", qty=1))
        await kit.publish_as_is(loose, {}, body(anything=[1, 2]))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def all_five() -> bool:
            return len(got) == 5

        await eventually(all_five, what="five messages handled")
        await rig.stop(worker, task)
        assert worker.dead_lettered == 0
        payloads = sorted((type(m.payload).__name__, repr(m.payload)) for m in got)
        assert payloads == sorted(
            [
                ("BatchCreated", repr(BatchCreated("b1", "LAMP", 10))),
                ("BatchCreated", repr(BatchCreated("b2", "LAMP", 5))),
                ("BatchDropped", repr(BatchDropped("b1"))),
                ("BatchCreated", repr(BatchCreated("b3", "SOFA", 1))),
                ("dict", repr({"anything": [1, 2]})),
            ]
        )
        ids = {str(m.id) for m in got}
        assert "req-42" in ids and len(ids) == 5  # the named header, else the broker's id
        assert all(before <= m.timestamp <= datetime.now(UTC) for m in got)
        assert sorted(id for _, id in await rig.inbox()) == sorted(ids)

    rig.run(test())


def test_a_dispatched_topic_without_a_type_says_how_to_bind_one(rig: WorkerRig) -> None:
    kit = rig.kit
    orders, typed = kit.topic("orders"), kit.topic("typed")
    allocated: list[Allocate] = []
    bus = Messagebus()

    @bus.register
    def allocate(command: Allocate) -> None:
        allocated.append(command)

    consumer = Consumer(bus, types, retry=Retry(attempts=2, delay=0.1))
    consumer.dispatch(orders)  # unbound: a body without message-type is plain JSON
    consumer.dispatch(typed, payload=Allocate)

    async def test() -> None:
        await kit.publish_as_is(orders, {}, body(orderid="o1", sku="LAMP", qty=1))
        await kit.publish_as_is(typed, {}, body(orderid="o2", sku="LAMP", qty=2))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def both() -> bool:
            return worker.handled + worker.dead_lettered == 2

        await eventually(both, what="one handled, one dead letter")
        await rig.stop(worker, task)
        assert allocated == [Allocate("o2", "LAMP", 2)]
        [letter] = await rig.dead_letters()
        assert letter.topic == orders
        assert "has no message-type header, so its body is plain JSON" in letter.error
        assert f"consumer.dispatch({orders!r}, payload=YourCommand)" in letter.error
        assert "name=''" not in letter.error

    rig.run(test())
