"""What the broker contract suite needs of an adapter: a `BrokerTarget`; and its helpers.

See `pybondi.testing.contracts.brokers`, which runs the suite on a target. `Case` is one
test's view of the target: it makes adapters and subscriptions through it, and closes
them at the test's end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from pybondi.messaging.brokers.base import DEFAULT_GROUP, Broker, Delivery, Subscription
from pybondi.messaging.envelope import Envelope
from pybondi.publisher import Message

__all__ = ["RETRY_DELAYS", "BrokerTarget", "Case", "ack", "contract", "envelopes", "skip_unless"]

T = TypeVar("T")

RETRY_DELAYS = (0.5, 3.0)
"""The delays, in seconds, the suite retries with (to clean up RabbitMQ-style delay queues)."""


class BrokerTarget(ABC):
    """The adapter under test, and what the suite should expect of it.

    Override `broker()`; the other methods have defaults. The flags say what the broker
    can do; each defaults to what most brokers do.

    Attributes:
        prefix: a name of this target's own, for your adapter to put before its names.
        sync_client: `send()` works (Redis, memory); else it raises `AsyncRequired`.
        redelivers_after_silence: a message held by a consumer that neither acknowledged
            nor extended it for `redeliver_after` goes to another consumer, though the
            first one is still connected (Redis, NATS, memory). False for a broker that
            notices a dead consumer by its connection only (RabbitMQ).
        returns_on_close: what a closed subscription held comes back at once (RabbitMQ,
            memory), rather than after `redeliver_after` (Redis, NATS).
        counts_redeliveries: a message that comes back unacknowledged comes at
            attempt + 1, as it does after `retry()`.
        new_groups_read_history: a group's first subscription gets the messages sent
            before it, from the oldest kept (Redis, NATS, memory). On RabbitMQ only the
            default group's queue exists before any consumer.
        holds_at_most_in_flight: a subscription holds no more than `in_flight`
            deliveries unacknowledged, across receives (RabbitMQ, memory); else
            `in_flight` bounds each receive, and the worker keeps the rest of the bound.
    """

    sync_client = False
    redelivers_after_silence = True
    returns_on_close = False
    counts_redeliveries = True
    new_groups_read_history = True
    holds_at_most_in_flight = False

    def __init__(self) -> None:
        self.prefix = f"contract_{uuid.uuid4().hex[:12]}_"
        self._topics = 0

    @abstractmethod
    def broker(self) -> Broker:
        """A new adapter, for this test alone; the suite closes it with `aclose()`."""

    def topic(self, name: str = "orders") -> str:
        """A topic no other test uses; the suite asks for several in some tests."""
        self._topics += 1
        return f"{name}.{self.prefix.rstrip('_')}-{self._topics}"

    def subscribe(
        self, broker: Broker, topics: Sequence[str], group: str, *, consumer: str, **options: Any
    ) -> Subscription:
        """`broker.subscribe(...)`; override it to note what is made, for your cleanup."""
        return broker.subscribe(topics, group, consumer=consumer, **options)

    async def publish_bare(self, topic: str, body: bytes) -> str | None:
        """Publish a body with no id nor headers, as a producer that is not pybondi would.

        Returns the broker's own id of the message where it has one. By default the
        target cannot, and the test that needs it is skipped.
        """
        raise NotImplementedError

    async def elapse(self, seconds: float) -> None:
        """Let `seconds` pass for the broker: sleep, or move the broker's clock."""
        await asyncio.sleep(seconds)

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a test on the event loop your adapters and clients use (a new one here)."""
        return asyncio.run(work)


class Case:
    """One test's adapters and subscriptions, closed at its end, and its helpers."""

    def __init__(self, target: BrokerTarget) -> None:
        self.target = target
        self.brokers: list[Broker] = []
        self.subscriptions: list[Subscription] = []

    def broker(self) -> Broker:
        """A new adapter, from the target; closed at the test's end."""
        broker = self.target.broker()
        self.brokers.append(broker)
        return broker

    def topic(self, name: str = "orders") -> str:
        """A topic of this test's own, from the target."""
        return self.target.topic(name)

    def subscribe(
        self,
        broker: Broker,
        topics: list[str],
        group: str = DEFAULT_GROUP,
        consumer: str = "c1",
        **options: Any,
    ) -> Subscription:
        """A subscription through the target; closed at the test's end."""
        subscription = self.target.subscribe(broker, topics, group, consumer=consumer, **options)
        self.subscriptions.append(subscription)
        return subscription

    async def connected(self, *subscriptions: Subscription) -> None:
        """Have each subscription connect, and declare what it needs, before any send."""
        for subscription in subscriptions:
            assert await subscription.receive(10, wait=0) == []

    async def take(
        self, subscription: Subscription, count: int, timeout: float = 10.0
    ) -> list[Delivery]:
        """Receive until `count` deliveries came, at most `timeout` seconds; none acked."""
        deadline = time.monotonic() + timeout
        got: list[Delivery] = []
        while len(got) < count and time.monotonic() < deadline:
            got += await subscription.receive(count - len(got), wait=0.2)
        assert len(got) == count, f"{len(got)} of {count} deliveries came: {got}"
        return got

    async def elapse(self, seconds: float) -> None:
        """Let `seconds` pass for the broker; see `BrokerTarget.elapse`."""
        await self.target.elapse(seconds)

    async def run(self, body: Callable[[Any, Case], Awaitable[None]], suite: Any) -> None:
        """Run a test's body, then close what it made."""
        try:
            await body(suite, self)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the subscriptions, then the adapters; raise the first failure, if any."""
        failures: list[Exception] = []
        closes = [each.close for each in self.subscriptions] + [
            each.aclose for each in self.brokers
        ]
        for close in closes:  # the subscriptions first, each even if another fails
            try:
                await close()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]


def contract(
    body: Callable[[Any, Case], Awaitable[None]],
) -> Callable[[Any, BrokerTarget], None]:
    """A test of the suite: `body` run on the target's event loop (pytest runs sync tests)."""

    def test(self: Any, broker_target: BrokerTarget) -> None:
        broker_target.run(Case(broker_target).run(body, self))

    test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
    return test


def envelopes(topic: str, count: int, **headers: str) -> list[Envelope]:
    """`count` messages for `topic`: payloads {"n": 0}, {"n": 1}..., with `headers`."""
    return [Envelope.seal(topic, Message({"n": n}, headers=headers)) for n in range(count)]


async def ack(deliveries: Sequence[Delivery]) -> None:
    """Acknowledge each delivery, in order."""
    for delivery in deliveries:
        await delivery.ack()


def skip_unless(target: BrokerTarget, capability: str, reason: str) -> None:
    """Skip the test unless the target has `capability`, saying which and why."""
    if not getattr(target, capability):
        pytest.skip(f"{type(target).__name__}.{capability} is False: {reason}")
