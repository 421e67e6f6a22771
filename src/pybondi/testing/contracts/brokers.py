"""The broker contract, as a pytest suite that your own adapter can run.

Every broker adapter of pybondi passes it (memory, Redis, RabbitMQ, NATS JetStream). To
run it on yours, describe your adapter in a `BrokerTarget` and subclass `BrokerContract`
with a fixture `broker_target` that gives one:

    import pytest
    from pybondi.testing.contracts.brokers import BrokerContract, BrokerTarget

    class MyTarget(BrokerTarget):
        sync_client = False                  # what your adapter can do: see BrokerTarget

        def broker(self) -> Broker:
            return MyBroker("my://localhost", prefix=self.prefix)

    class TestMyBroker(BrokerContract):
        @pytest.fixture
        def broker_target(self) -> Iterator[MyTarget]:
            target = MyTarget()
            yield target
            delete_everything_named(target.prefix)   # what the tests made on the server

Each test runs on its own event loop (`BrokerTarget.run`) and closes the subscriptions
and adapters it made. What a broker cannot do is a capability flag of the target; a test
of something the target says it cannot do is skipped, with the reason. How an adapter
reads malformed transport data (a delivery with a `problem`) depends on its transport,
so that stays in the adapter's own tests.

The suite takes time where the contract is about time: a retry's delay, `redeliver_after`.
It lets that time pass through `BrokerTarget.elapse`, which sleeps, unless your broker
runs on a clock the target moves (as the `MemoryBroker` on a `ManualClock` does).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pybondi.exceptions import AsyncRequired
from pybondi.messaging.brokers.base import DEFAULT_GROUP, Delivery, Subscription
from pybondi.messaging.envelope import Envelope
from pybondi.testing.contracts.brokertarget import (
    RETRY_DELAYS,
    BrokerTarget,
    Case,
    ack,
    contract,
    envelopes,
    skip_unless,
)

__all__ = ["RETRY_DELAYS", "BrokerContract", "BrokerTarget"]


class BrokerContract:
    """The suite: subclass it as `TestYourBroker` with a fixture `broker_target`."""

    @pytest.fixture
    def broker_target(self) -> BrokerTarget:
        """Your target: override this fixture in your subclass of BrokerContract."""
        raise NotImplementedError(
            f"{type(self).__name__} needs a fixture broker_target that gives a BrokerTarget "
            f"for your adapter; see pybondi.testing.contracts.brokers."
        )

    # Sending and receiving ---------------------------------------------------------

    @contract
    async def test_messages_come_as_sent_in_order(self, case: Case) -> None:
        """Messages sent before a group subscribed come to it in order, as sent."""
        broker, topic = case.broker(), case.topic()
        sent = envelopes(topic, 3, tenant="acme", city="Zürich")
        await broker.asend(sent)  # before any subscription: the group reads from the oldest
        subscription = case.subscribe(broker, [topic])

        first = await subscription.receive(2, wait=5.0)
        assert 1 <= len(first) <= 2  # what is ready comes at once, up to the limit
        got = first + await case.take(subscription, 3 - len(first))

        assert [delivery.envelope for delivery in got] == sent  # topic, id, headers, body
        assert [(delivery.attempt, delivery.problem) for delivery in got] == [(1, None)] * 3
        for delivery in got:  # when the broker took it, where it says
            assert delivery.timestamp is None or delivery.timestamp.utcoffset() is not None
        await ack(got)
        assert await subscription.receive(10, wait=0.3) == []

    @contract
    async def test_a_message_sent_is_kept_once_the_send_returns(self, case: Case) -> None:
        """`asend` returns once the broker has the messages; after `aclose` it connects again."""
        broker, topic = case.broker(), case.topic()
        subscription = case.subscribe(broker, [topic])
        await case.connected(subscription)
        first, second = envelopes(topic, 2)

        await broker.asend([])  # nothing to send is not an error
        await broker.asend([first])
        await broker.aclose()
        await broker.asend([second])  # a closed adapter connects again

        got = await case.take(subscription, 2)
        assert [delivery.envelope for delivery in got] == [first, second]
        await ack(got)

    @contract
    async def test_a_sync_send_needs_a_sync_client(self, case: Case) -> None:
        """`send` works from sync code where the client is sync; else it says to await."""
        broker, topic = case.broker(), case.topic()
        [sent] = envelopes(topic, 1)
        if not case.target.sync_client:
            with pytest.raises(AsyncRequired):
                broker.send([sent])
            return
        subscription = case.subscribe(broker, [topic])
        await case.connected(subscription)
        receiving = asyncio.ensure_future(subscription.receive(10, wait=10.0))
        await asyncio.sleep(0.1)
        try:
            await asyncio.to_thread(broker.send, [sent])  # from another thread, as sync code
        finally:
            broker.close()
        [delivery] = await receiving
        assert delivery.envelope == sent
        await delivery.ack()

    @contract
    async def test_a_waiting_receive_returns_as_soon_as_a_message_comes(self, case: Case) -> None:
        """A receive waits up to `wait` for a message, and no longer than it takes one to come."""
        broker, topic = case.broker(), case.topic()
        subscription = case.subscribe(broker, [topic])
        await case.connected(subscription)
        loop = asyncio.get_running_loop()

        started = loop.time()
        assert await subscription.receive(10, wait=0.5) == []
        assert loop.time() - started >= 0.4  # it waited for something to come

        receiving = asyncio.ensure_future(subscription.receive(10, wait=10.0))
        await asyncio.sleep(0.2)
        [late] = envelopes(topic, 1)
        sent_at = loop.time()
        await broker.asend([late])
        [delivery] = await receiving
        assert loop.time() - sent_at < 5.0  # woken by the message, not at the end of the wait
        assert delivery.envelope == late
        await delivery.ack()

    @contract
    async def test_a_quiet_topic_does_not_hold_up_a_busy_one(self, case: Case) -> None:
        """A receive returns what one topic has without waiting on another."""
        broker, busy, quiet = case.broker(), case.topic("busy"), case.topic("quiet")
        subscription = case.subscribe(broker, [busy, quiet])
        await case.connected(subscription)
        sent = envelopes(busy, 12)
        await broker.asend(sent)

        got: list[Delivery] = []
        started = time.monotonic()
        while len(got) < len(sent):
            batch = await subscription.receive(4, wait=5.0)
            assert batch
            assert len(batch) <= 4
            await ack(batch)
            got += batch
        assert time.monotonic() - started < 7.5  # not 5 s per receive, waiting on `quiet`
        assert [delivery.envelope for delivery in got] == sent

        [late] = envelopes(quiet, 1)
        await broker.asend([late])
        [delivery] = await subscription.receive(4, wait=5.0)
        assert delivery.envelope == late
        await delivery.ack()

    @contract
    async def test_no_receive_returns_more_than_its_limit(self, case: Case) -> None:
        """A receive returns `limit` deliveries at most, from any of its topics, in order."""
        broker, one, two = case.broker(), case.topic("one"), case.topic("two")
        subscription = case.subscribe(broker, [one, two])
        await case.connected(subscription)
        sent = envelopes(one, 5) + envelopes(two, 5)
        await broker.asend(sent)

        got: list[Delivery] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            batch = await subscription.receive(3, wait=0.5)
            assert len(batch) <= 3
            got += batch
        for topic in (one, two):  # all of them, in order within each topic
            mine = [delivery.envelope for delivery in got if delivery.envelope.topic == topic]
            assert mine == [envelope for envelope in sent if envelope.topic == topic]
        assert len(got) == len(sent)
        assert await subscription.receive(0, wait=0.5) == []
        await ack(got)

    @contract
    async def test_no_receive_returns_more_than_in_flight(self, case: Case) -> None:
        """A receive returns `in_flight` deliveries at most, whatever its limit."""
        broker, topic = case.broker(), case.topic()
        small = case.subscribe(broker, [topic], in_flight=2)
        await case.connected(small)
        sent = envelopes(topic, 5)
        await broker.asend(sent)

        got: list[Delivery] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            batch = await small.receive(10, wait=0.5)
            assert len(batch) <= 2
            await ack(batch)
            got += batch
        assert [delivery.envelope for delivery in got] == sent

    @contract
    async def test_a_consumer_holds_no_more_than_in_flight(self, case: Case) -> None:
        """A subscription holding `in_flight` unacknowledged deliveries gets no more."""
        skip_unless(
            case.target,
            "holds_at_most_in_flight",
            "in_flight bounds each receive on this broker, not what a consumer holds",
        )
        broker, topic = case.broker(), case.topic()
        small = case.subscribe(broker, [topic], consumer="small", in_flight=2)
        await case.connected(small)
        await broker.asend(envelopes(topic, 5))

        held = await case.take(small, 2)
        assert await small.receive(10, wait=0.3) == []  # 3 are waiting, but it holds 2
        other = case.subscribe(broker, [topic], consumer="other")
        assert len(await case.take(other, 3)) == 3  # they went to nobody else

        await held[0].ack()  # a slot is free: the next message may go to either
        await broker.asend(envelopes(topic, 1))
        more = await small.receive(10, wait=1.0) + await other.receive(10, wait=1.0)
        assert len(more) == 1
        await ack(more)

    @contract
    async def test_bad_subscriptions_are_refused(self, case: Case) -> None:
        """Subscribing to no topic, or with `in_flight` below 1, raises ValueError."""
        broker, topic = case.broker(), case.topic()
        with pytest.raises(ValueError):
            broker.subscribe([], DEFAULT_GROUP, consumer="c1")
        with pytest.raises(ValueError, match="in_flight"):
            broker.subscribe([topic], DEFAULT_GROUP, consumer="c1", in_flight=0)

    # Groups ------------------------------------------------------------------------

    @contract
    async def test_every_group_gets_every_message(self, case: Case) -> None:
        """Each group gets each message once, in order."""
        broker, topic = case.broker(), case.topic()
        groups = {group: case.subscribe(broker, [topic], group) for group in ("bill", "ship")}
        await case.connected(*groups.values())
        sent = envelopes(topic, 5)
        await broker.asend(sent)

        for subscription in groups.values():
            got = await case.take(subscription, 5)
            assert [delivery.envelope for delivery in got] == sent
            assert [delivery.attempt for delivery in got] == [1] * 5
            await ack(got)
        for subscription in groups.values():
            assert await subscription.receive(10, wait=0.3) == []

    @contract
    async def test_a_new_group_starts_from_the_oldest_message(self, case: Case) -> None:
        """A group's first subscription gets the messages kept from before it."""
        skip_unless(
            case.target,
            "new_groups_read_history",
            "a group gets the messages sent from its first subscription on, on this broker",
        )
        broker, topic = case.broker(), case.topic()
        sent = envelopes(topic, 3)
        await broker.asend(sent)

        for group in ("audit", "late"):  # the second comes after the first acknowledged all
            subscription = case.subscribe(broker, [topic], group)
            got = await case.take(subscription, 3)
            assert [delivery.envelope for delivery in got] == sent
            await ack(got)

    @contract
    async def test_the_consumers_of_a_group_share_its_messages(self, case: Case) -> None:
        """Within a group, each message goes to one of its consumers."""
        broker, topic = case.broker(), case.topic()
        consumers = {
            name: case.subscribe(broker, [topic], consumer=name, in_flight=4)
            for name in ("c1", "c2")
        }
        await case.connected(*consumers.values())  # both there before the messages
        sent = envelopes(topic, 20)
        await broker.asend(sent)

        seen: dict[str, list[str]] = {name: [] for name in consumers}
        deadline = time.monotonic() + 15
        while sum(map(len, seen.values())) < len(sent) and time.monotonic() < deadline:
            for name, subscription in consumers.items():
                for delivery in await subscription.receive(3, wait=0.1):
                    seen[name].append(delivery.envelope.id)
                    await delivery.ack()

        assert sorted(seen["c1"] + seen["c2"]) == sorted(item.id for item in sent)  # each once
        assert seen["c1"]
        assert seen["c2"]
        for subscription in consumers.values():
            assert await subscription.receive(10, wait=0.3) == []

    # Acknowledging, retrying, redelivering --------------------------------------------

    @contract
    async def test_acknowledged_messages_do_not_come_back(self, case: Case) -> None:
        """An acknowledged message does not come back, even past `redeliver_after`."""
        broker, topic = case.broker(), case.topic()
        subscription = case.subscribe(broker, [topic], redeliver_after=1.0)
        await case.connected(subscription)
        await broker.asend(envelopes(topic, 2))
        await ack(await case.take(subscription, 2))

        await case.elapse(1.5)  # past redeliver_after

        other = case.subscribe(broker, [topic], consumer="c2", redeliver_after=1.0)
        assert await other.receive(10, wait=0.5) == []
        assert await subscription.receive(10, wait=0) == []

    @contract
    async def test_a_retry_comes_back_after_its_delay_to_its_group_only(self, case: Case) -> None:
        """`retry(delay)` brings the message back to its group after `delay`, at attempt + 1."""
        broker, topic = case.broker(), case.topic()
        mine = case.subscribe(broker, [topic], "mine", redeliver_after=1.0)
        theirs = case.subscribe(broker, [topic], "theirs", consumer="c2")
        await case.connected(mine, theirs)
        # Any bytes as the body: a broker carries bytes, whatever the retries do with them.
        sent = Envelope(topic, "m-1", {"message-id": "m-1", "city": "Zürich"}, bytes(range(256)))
        await broker.asend([sent])

        [first] = await case.take(mine, 1)
        assert first.attempt == 1
        longer, shorter = sorted(RETRY_DELAYS, reverse=True)
        await first.retry(longer)  # longer than redeliver_after: it waits for the delay
        assert await mine.receive(10, wait=0.3) == []  # not at once
        await case.elapse(longer / 2)  # past redeliver_after: it is no redelivery either
        assert await mine.receive(10, wait=0.1) == []
        await case.elapse(longer / 2)
        [again] = await case.take(mine, 1)
        assert (again.envelope, again.attempt, again.problem) == (sent, 2, None)

        await again.retry(shorter)
        await mine.close()  # the broker keeps the retry, not the subscription
        heir = case.subscribe(broker, [topic], "mine", consumer="c3")
        await case.elapse(shorter)
        [third] = await case.take(heir, 1)
        assert (third.envelope, third.attempt) == (sent, 3)
        await third.ack()

        # The other group got the message once, at attempt 1, and none of the retries.
        [once] = await case.take(theirs, 1)
        assert (once.envelope, once.attempt) == (sent, 1)
        await once.ack()
        assert await theirs.receive(10, wait=0.5) == []
        assert await heir.receive(10, wait=0) == []

    @contract
    async def test_what_a_closed_subscription_held_comes_back(self, case: Case) -> None:
        """What a closed subscription held goes to another consumer, at attempt + 1."""
        target = case.target
        # Long enough, where it comes back at once, to show that it does not wait for it.
        redeliver_after = 30.0 if target.returns_on_close else 2.0
        broker, topic = case.broker(), case.topic()
        sent = envelopes(topic, 3)
        await broker.asend(sent)
        gone = case.subscribe(broker, [topic], consumer="gone", redeliver_after=redeliver_after)
        held = await case.take(gone, 3)
        assert [delivery.envelope for delivery in held] == sent
        await held[0].ack()

        await gone.close()
        await gone.close()  # closing again does nothing

        heir = case.subscribe(broker, [topic], consumer="heir", redeliver_after=redeliver_after)
        if not target.returns_on_close:
            assert await heir.receive(10, wait=0.3) == []  # not before redeliver_after
            await case.elapse(redeliver_after)
        back = await case.take(heir, 2)
        assert [delivery.envelope for delivery in back] == sent[1:]
        if target.counts_redeliveries:
            assert [delivery.attempt for delivery in back] == [2, 2]
        await ack(back)
        await case.elapse(min(redeliver_after, 2.0) + 0.5)
        assert await heir.receive(10, wait=0.3) == []

    @contract
    async def test_what_a_silent_consumer_held_goes_to_another(self, case: Case) -> None:
        """What a consumer held past `redeliver_after`, unsettled, goes to another one."""
        skip_unless(
            case.target,
            "redelivers_after_silence",
            "this broker notices a dead consumer by its connection, not by its silence",
        )
        broker, topic = case.broker(), case.topic()
        silent = case.subscribe(broker, [topic], consumer="silent", redeliver_after=1.5)
        await case.connected(silent)
        sent = envelopes(topic, 2)
        await broker.asend(sent)

        held = await case.take(silent, 2)  # then never acknowledged, nor extended
        assert [delivery.envelope for delivery in held] == sent
        # Only now: a consumer may fetch ahead (NATS), and what it took would not be here.
        other = case.subscribe(broker, [topic], consumer="other", redeliver_after=1.5)
        assert await other.receive(10, wait=0.3) == []  # not before redeliver_after
        await case.elapse(1.5)

        back = await case.take(other, 2)
        assert [delivery.envelope for delivery in back] == sent
        if case.target.counts_redeliveries:
            assert [delivery.attempt for delivery in back] == [2, 2]
        await ack(back)
        await case.elapse(2.0)
        assert await other.receive(10, wait=0.3) == []

    @contract
    async def test_extending_a_delivery_keeps_it(self, case: Case) -> None:
        """`extend()` keeps a delivery from going to another consumer."""
        broker, topic = case.broker(), case.topic()
        holder = case.subscribe(broker, [topic], consumer="holder", redeliver_after=2.0)
        await case.connected(holder)
        await broker.asend(envelopes(topic, 1))

        [held] = await case.take(holder, 1)
        other = case.subscribe(broker, [topic], consumer="other", redeliver_after=2.0)
        for _ in range(3):  # 3 s in all, longer than redeliver_after
            await case.elapse(1.0)
            await held.extend()
        assert await other.receive(10, wait=0.3) == []
        assert await holder.receive(10, wait=0) == []
        await held.ack()

    @contract
    async def test_a_message_without_an_id_keeps_the_one_it_gets(self, case: Case) -> None:
        """A message sent with no id gets one, which its redeliveries and retries keep.

        As from a producer that is not pybondi. Were the id to change, the worker's inbox
        could not tell that the group handled the message already.
        """
        target = case.target
        broker, topic = case.broker(), case.topic()
        first = case.subscribe(broker, [topic], consumer="c1", redeliver_after=1.0)
        await case.connected(first)
        try:
            own = await target.publish_bare(topic, b'{"n": 1}')
        except NotImplementedError:
            pytest.skip(f"{type(target).__name__} cannot publish a message without an id")

        [delivery] = await case.take(first, 1)
        message_id = delivery.envelope.id
        assert message_id
        if own is not None:  # the broker's own id of the message
            assert message_id == own
        assert (delivery.problem, delivery.envelope.body) == (None, b'{"n": 1}')

        async def heir(name: str) -> Subscription:
            """Another consumer, once what the closed one held came back."""
            subscription = case.subscribe(broker, [topic], consumer=name, redeliver_after=1.0)
            if not target.returns_on_close:
                await case.elapse(1.0)
            return subscription

        await first.close()  # without acknowledging: another consumer gets it back
        second = await heir("c2")
        [again] = await case.take(second, 1)
        assert again.envelope.id == message_id
        if target.counts_redeliveries:
            assert again.attempt == 2

        shorter = min(RETRY_DELAYS)
        await again.retry(shorter)
        await case.elapse(shorter)
        [retried] = await case.take(second, 1)
        assert retried.envelope.id == message_id

        await second.close()  # a retried message, redelivered
        third = await heir("c3")
        [last] = await case.take(third, 1)
        assert last.envelope == again.envelope == delivery.envelope
        if target.counts_redeliveries:
            assert last.attempt == retried.attempt + 1  # the redelivery of a retry counts too
        await last.ack()
        await case.elapse(1.5)
        assert await third.receive(10, wait=0.3) == []
