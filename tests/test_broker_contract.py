"""The broker contract suite (pybondi.testing.contracts.brokers) on every broker.

Memory twice: on a `ManualClock`, where waiting takes no real time, and on real time;
then the real Redis, RabbitMQ and NATS JetStream servers, each test with names of its own
(tests/brokers.py), deleted afterwards. What only one broker does is tested in
tests/test_subscription_<broker>.py and tests/test_memory_broker.py.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from pybondi.messaging.brokers import Broker
from pybondi.messaging.brokers.base import Subscription
from pybondi.messaging.brokers.clock import ManualClock
from pybondi.testing.contracts.brokers import BrokerContract, BrokerTarget
from tests.brokers import BrokerKit, MemoryKit, NATSKit, RabbitMQKit, RedisKit

T = TypeVar("T")

# What each broker does where brokers differ (see BrokerTarget).
CAPABILITIES: dict[str, dict[str, bool]] = {
    "memory": {
        "sync_client": True,
        "returns_on_close": True,
        "holds_at_most_in_flight": True,
    },
    "redis": {"sync_client": True},
    "rabbitmq": {
        "redelivers_after_silence": False,
        "returns_on_close": True,
        "new_groups_read_history": False,
        "holds_at_most_in_flight": True,
    },
    "nats": {},
}


# Where an adapter of ours does not keep the contract yet: each an expected failure
# (strict: once the adapter is fixed, the test passes and the entry must go).
GAPS: dict[tuple[str, str], str] = {}


class KitTarget(BrokerTarget):
    """A broker kit (tests/brokers.py) as the suite's target."""

    def __init__(self, kit: BrokerKit) -> None:
        super().__init__()
        self.kit = kit
        for capability, value in CAPABILITIES[kit.name].items():
            setattr(self, capability, value)

    def broker(self) -> Broker:
        return self.kit.make()

    def topic(self, name: str = "orders") -> str:
        return self.kit.topic(name)

    def subscribe(
        self, broker: Broker, topics: Sequence[str], group: str, *, consumer: str, **options: Any
    ) -> Subscription:
        return self.kit.subscribe(broker, list(topics), group, consumer, **options)

    async def publish_bare(self, topic: str, body: bytes) -> str | None:
        return await self.kit.publish_bare(topic, body)

    async def elapse(self, seconds: float) -> None:
        await self.kit.elapse(seconds)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.kit.run(work)


def manual_memory() -> MemoryKit:
    return MemoryKit(clock=ManualClock())


KINDS: dict[str, Callable[[], BrokerKit]] = {
    "memory": manual_memory,
    "memory-realtime": MemoryKit,
    "redis": RedisKit,
    "rabbitmq": RabbitMQKit,
    "nats": NATSKit,
}


class TestBrokerContract(BrokerContract):
    @pytest.fixture(
        params=[
            "memory",
            "memory-realtime",
            pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
            pytest.param("nats", marks=pytest.mark.nats),
        ]
    )
    def broker_target(self, request: pytest.FixtureRequest) -> Iterator[BrokerTarget]:
        if gap := GAPS.get((request.param, request.function.__name__)):
            request.applymarker(pytest.mark.xfail(reason=gap, strict=True))
        kit = KINDS[request.param]()
        try:
            kit.start()
            yield KitTarget(kit)
        finally:
            kit.close()
