"""The worker contract, on real Redis, RabbitMQ and NATS JetStream, with PostgreSQL.

Each test sends messages with a broker adapter, runs workers on the same broker, and
reads back with plain SQL what the workers committed: the tallies, the inbox, the dead
letters and the outbox.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterator

import pytest

from pybondi import Depends, Message, Messagebus, Root, Session
from pybondi.exceptions import NotFound
from pybondi.messaging.brokers.rabbitmq import RabbitMQBroker
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.messaging.deadletters import DeadLetters
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.relay import Relay
from pybondi.tracing import TracingFilter
from tests.backends import Backend
from tests.brokers import BrokerKit, RabbitMQKit
from tests.outboxes import aoutbox_rows
from tests.workers import (
    Counted,
    Tally,
    WorkerRig,
    at_port,
    eventually,
    registry,
    silent_server,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def rig(backends: dict[str, Backend], broker: BrokerKit) -> Iterator[WorkerRig]:
    rig = WorkerRig(backends["postgres"], broker)
    try:
        yield rig
    finally:
        rig.close()


async def count(session: Session, message: Message[Counted]) -> None:
    """The effect of a message: its number joins its key's tally."""
    repository = session.repository
    try:
        tally = await repository.aget(message.payload.key)
    except NotFound:
        tally = Tally(Root(message.payload.key))
        repository.add(tally)
    tally.numbers.append(message.payload.n)


def counting(rig: WorkerRig, topic: str, **options: object) -> Consumer:
    consumer = rig.consumer(**options)

    @consumer.subscribe(topic)
    async def handle(message: Message[Counted], session: Session = Depends(current_session)):
        await count(session, message)

    return consumer


def total(numbers: dict[str, list[int]]) -> int:
    return sum(len(values) for values in numbers.values())


def test_each_message_is_handled_once_and_acknowledged_after_its_commit(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        sent = await rig.send(topic, *(Counted(f"k{n % 3}", n) for n in range(20)))
        consumer = counting(rig, topic)
        first = rig.worker(consumer)
        task = rig.start(first)

        async def all_counted() -> bool:
            return total(await rig.numbers()) == 20

        await eventually(all_counted, what="20 messages handled")
        await rig.stop(first, task)
        # Acknowledged: a worker that comes after, and waits past redeliver_after, gets none.
        second = rig.worker(consumer)
        task = rig.start(second)
        await asyncio.sleep(3)
        await rig.stop(second, task)
        numbers = await rig.numbers()
        assert sorted(n for values in numbers.values() for n in values) == list(range(20))
        assert first.handled == 20 and second.handled == second.skipped == 0
        group = consumer.group
        assert sorted(await rig.inbox()) == sorted((group, e.id) for e in sent)

    rig.run(test())


def test_a_message_delivered_twice_is_handled_once(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        once = Envelope.seal(topic, Message(Counted("k", 1)), registry)
        # A resend, as a relay's after a crash; marked so that JetStream, which drops
        # a message id it saw within two minutes, lets it through to the worker.
        again = Envelope(topic, once.id, {**once.headers, "replayed-at": "now"}, once.body)
        await rig.send_envelopes([once])
        await rig.send_envelopes([again])
        await rig.send(topic, Counted("k", 2))
        worker = rig.worker(counting(rig, topic, in_flight=1))
        task = rig.start(worker)

        async def done() -> bool:
            return worker.handled + worker.skipped == 3

        await eventually(done, what="three deliveries taken")
        await rig.stop(worker, task)
        assert await rig.numbers() == {"k": [1, 2]}
        assert (worker.handled, worker.skipped) == (2, 1)

    rig.run(test())


def test_a_message_whose_worker_stops_before_committing_comes_back(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        stuck = asyncio.Event()
        consumer = rig.consumer()

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            if message.payload.n == 1 and not stuck.is_set():
                stuck.set()
                await asyncio.sleep(3600)  # never commits: cancelled at the stop
            await count(session, message)

        await rig.send(topic, Counted("k", 1))
        first = rig.worker(consumer, grace=0.1)
        task = rig.start(first)
        await asyncio.wait_for(stuck.wait(), 15)
        await rig.stop(first, task)
        assert await rig.numbers() == {}  # rolled back, not acknowledged
        second = rig.worker(consumer)
        task = rig.start(second)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the message handled by the second worker")
        await rig.stop(second, task)
        assert second.handled == 1

    rig.run(test())


def test_a_failing_message_is_retried_after_growing_delays(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        attempts: list[float] = []
        consumer = rig.consumer(retry=Retry(attempts=4, delay=0.4, factor=2))

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            attempts.append(time.monotonic())
            await count(session, message)  # rolled back with the session when it raises
            if len(attempts) < 3:
                raise RuntimeError(f"attempt {len(attempts)} fails")

        await rig.send(topic, Counted("k", 7))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [7]}

        await eventually(counted, what="the third attempt committed")
        await rig.stop(worker, task)
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        assert len(attempts) == 3
        assert gaps[0] >= 0.4 - 0.05 and gaps[1] >= 0.8 - 0.05, gaps
        assert (worker.retried, worker.handled, worker.dead_lettered) == (2, 1, 0)

    rig.run(test())


def test_a_message_that_fails_every_attempt_is_dead_lettered(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        consumer = rig.consumer(retry=Retry(attempts=2, delay=0.1))

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            if message.payload.n == 0:
                raise ValueError("zero is not a number we count")
            await count(session, message)

        poison, *_ = await rig.send(topic, *(Counted("k", n) for n in range(4)), tenant="acme")
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def settled() -> bool:
            return len(await rig.dead_letters()) == 1 and total(await rig.numbers()) == 3

        await eventually(settled, what="one dead letter and three handled")
        await rig.stop(worker, task)
        [letter] = await rig.dead_letters()
        assert (letter.message_id, letter.topic, letter.group) == (poison.id, topic, "pybondi")
        assert letter.attempts == 2
        assert letter.error.startswith("ValueError: zero is not a number we count")
        assert "handle" in letter.error  # the traceback says where
        assert letter.headers == poison.headers and letter.headers["tenant"] == "acme"
        assert letter.body == poison.body.decode()
        assert sorted((await rig.numbers())["k"]) == [1, 2, 3]

    rig.run(test())


def test_poison_messages_go_straight_to_the_dead_letters(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        good = Envelope.seal(topic, Message(Counted("k", 1)), registry)

        def bad(body: bytes, kind: str = "tests.Counted") -> Envelope:
            envelope = Envelope.seal(topic, Message(Counted("k", 0)), registry)
            envelope.headers["message-type"] = kind
            envelope.body = body
            return envelope

        not_json = bad(b"{not json")
        unknown = bad(b"{}", kind="tests.Nobody")
        invalid = bad(b'{"key": "k"}')  # n is missing
        await rig.send_envelopes([not_json, good, unknown, invalid])
        worker = rig.worker(counting(rig, topic))
        task = rig.start(worker)

        async def settled() -> bool:
            return len(await rig.dead_letters()) == 3 and total(await rig.numbers()) == 1

        await eventually(settled, what="three dead letters and one handled")
        await rig.stop(worker, task)
        letters = {letter.message_id: letter for letter in await rig.dead_letters()}
        assert set(letters) == {not_json.id, unknown.id, invalid.id}
        assert all(letter.attempts == 1 for letter in letters.values())
        assert all(letter.error.startswith("Unreadable message") for letter in letters.values())
        assert "JSON" in letters[not_json.id].error
        assert "tests.Nobody" in letters[unknown.id].error
        assert "'n'" in letters[invalid.id].error or " n" in letters[invalid.id].error
        assert letters[not_json.id].body == "{not json"
        assert worker.retried == 0

    rig.run(test())


def test_a_replayed_dead_letter_is_handled_again(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        broken = True
        consumer = rig.consumer(retry=Retry(attempts=1))

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            if broken:
                raise RuntimeError("the handler has a bug")
            await count(session, message)

        [sent] = await rig.send(topic, Counted("k", 5))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def dead() -> bool:
            return len(await rig.dead_letters()) == 1

        await eventually(dead, what="the message dead-lettered")
        broken = False  # the bug is fixed
        [letter] = await rig.dead_letters()
        [replayed] = (await DeadLetters(rig.store).replay([letter.id])).replayed
        assert replayed.message_id == sent.id
        assert await rig.dead_letters() == []
        relay = Relay(rig.store, rig.kit.make())
        assert await relay.run_once() == 1

        async def counted() -> bool:
            return await rig.numbers() == {"k": [5]}

        await eventually(counted, what="the replayed message handled")
        await rig.stop(worker, task)
        [row] = [row for row in await aoutbox_rows(rig.store) if row.topic == topic]
        assert row.message_id == sent.id and "replayed-at" in row.headers

    rig.run(test())


def test_what_a_handler_publishes_carries_the_message_ids_and_so_do_its_logs(
    rig: WorkerRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(TracingFilter())
    caplog.set_level(logging.INFO, "tests.handler")

    async def test() -> None:
        topic, out = rig.kit.topic(), rig.kit.topic("out")
        consumer = rig.consumer()

        @consumer.subscribe(topic)
        def handle(message: Message[Counted], session: Session = Depends(current_session)):
            logging.getLogger("tests.handler").info("handling %s", message.payload.n)
            session.publisher.publish(out, Message({"seen": message.payload.n}))

        [sent] = await rig.send(topic, Counted("k", 3), **{"correlation-id": "chain-9"})
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def published() -> bool:
            return any(row.topic == out for row in await aoutbox_rows(rig.store))

        await eventually(published, what="the handler's message in the outbox")
        await rig.stop(worker, task)
        [row] = [row for row in await aoutbox_rows(rig.store) if row.topic == out]
        assert row.headers["correlation-id"] == "chain-9"
        assert row.headers["causation-id"] == sent.id
        [record] = [r for r in caplog.records if r.name == "tests.handler"]
        assert (record.__dict__["message_id"], record.__dict__["correlation_id"]) == (
            sent.id,
            "chain-9",
        )

    rig.run(test())


def test_messages_of_one_key_are_handled_in_order(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        consumer = rig.consumer(in_flight=8, key=lambda message: message.payload.key)

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            await asyncio.sleep(random.uniform(0, 0.03))
            await count(session, message)

        await rig.send(topic, *(Counted(f"k{n % 3}", n) for n in range(30)))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def all_counted() -> bool:
            return total(await rig.numbers()) == 30

        await eventually(all_counted, what="30 messages handled")
        await rig.stop(worker, task)
        numbers = await rig.numbers()
        assert numbers == {f"k{k}": list(range(k, 30, 3)) for k in range(3)}

    rig.run(test())


def test_a_worker_handles_at_most_in_flight_messages_at_once(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        consumer = rig.consumer(in_flight=3)
        running, most = 0, 0

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            await count(session, message)

        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(15)))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def all_counted() -> bool:
            return total(await rig.numbers()) == 15

        await eventually(all_counted, what="15 messages handled")
        await rig.stop(worker, task)
        assert most == 3

    rig.run(test())


def test_a_stop_finishes_the_messages_under_way_and_acknowledges_them(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        started = asyncio.Event()
        consumer = rig.consumer(in_flight=4)

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            started.set()
            await asyncio.sleep(0.5)
            await count(session, message)

        await rig.send(topic, *(Counted(f"k{n}", n) for n in range(4)))
        first = rig.worker(consumer)
        task = rig.start(first)
        await asyncio.wait_for(started.wait(), 15)
        await asyncio.sleep(0.1)  # the others arrive too
        await rig.stop(first, task)
        handled = first.handled
        assert handled >= 1 and total(await rig.numbers()) == handled
        second = rig.worker(consumer)
        task = rig.start(second)
        await asyncio.sleep(3)  # past redeliver_after: anything unacknowledged is back
        await rig.stop(second, task)
        assert second.skipped == 0  # nothing committed came back
        assert total(await rig.numbers()) == 4

    rig.run(test())


def test_dispatched_topics_reach_the_messagebus_handlers(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        bus = Messagebus()
        consumer = Consumer(bus, registry, repository=rig.consumer().repository)
        consumer.dispatch(topic)

        @bus.on
        async def counted(event: Counted, session: Session = Depends(current_session)) -> None:
            await count(session, Message(event))

        await rig.send(topic, Counted("k", 1), Counted("k", 2), {"plain": "json"})
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def settled() -> bool:
            return total(await rig.numbers()) == 2 and len(await rig.dead_letters()) == 1

        await eventually(settled, what="two handled, the plain JSON dead-lettered")
        await rig.stop(worker, task)
        [letter] = await rig.dead_letters()
        assert "commands and events" in letter.error

    rig.run(test())


def test_a_sync_store_runs_sync_sessions_in_threads(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        store = rig.new_store(asynchronous=False, prefix=rig.store.prefix)  # same tables
        consumer = Consumer(None, registry, repository=rig.consumer().repository)

        @consumer.subscribe(topic)
        def handle(message: Message[Counted], session: Session = Depends(current_session)):
            repository = session.repository
            try:
                tally = repository.get(message.payload.key)
            except NotFound:
                tally = Tally(Root(message.payload.key))
                repository.add(tally)
            tally.numbers.append(message.payload.n)

        await rig.send(topic, *(Counted("k", n) for n in range(5)))
        worker = rig.worker(consumer, store=store)
        task = rig.start(worker)

        async def all_counted() -> bool:
            return total(await rig.numbers()) == 5

        await eventually(all_counted, what="5 messages handled")
        await rig.stop(worker, task)
        store.dispose()
        assert sorted((await rig.numbers())["k"]) == list(range(5))

    rig.run(test())


def test_a_slow_message_stays_with_its_worker_past_redeliver_after(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        consumer = rig.consumer()
        started = asyncio.Event()

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            started.set()
            await asyncio.sleep(3)  # three times redeliver_after
            await count(session, message)

        await rig.send(topic, Counted("k", 1))
        slow = rig.worker(consumer, redeliver_after=1.0)
        slow_task = rig.start(slow)
        await asyncio.wait_for(started.wait(), 15)
        other = rig.worker(consumer, redeliver_after=1.0)
        other_task = rig.start(other)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the slow message committed")
        await asyncio.sleep(1.5)  # were it taken over, the other worker would be at it
        await rig.stop(slow, slow_task)
        await rig.stop(other, other_task)
        handled = (slow.handled, slow.skipped, other.handled, other.skipped)
        assert handled == (1, 0, 0, 0)  # handled once, and taken nowhere else

    rig.run(test())


def test_a_replayed_dead_letter_is_skipped_by_the_groups_that_handled_it(
    rig: WorkerRig,
) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        kit, broker = rig.kit, rig.kit.make()
        if isinstance(kit, RabbitMQKit) and isinstance(broker, RabbitMQBroker):
            kit.other_queues.append(broker.group_queue(topic, "audit"))  # for the cleanup
        audit = counting(rig, topic, group="audit")
        worker = rig.worker(audit)
        task = rig.start(worker)
        await asyncio.sleep(1)  # subscribed: on RabbitMQ, the group's own queue exists
        [sent] = await rig.send(topic, Counted("k", 1))

        async def handled() -> bool:
            return worker.handled == 1

        await eventually(handled, what="the audit group handled the message")
        # The billing group gave up on the same message, and its dead letter is replayed.
        letter = await rig.store.atransact(
            lambda records: records.dead_letters.add("billing", sent, "RuntimeError: bug", 5)
        )
        assert letter is not None
        await DeadLetters(rig.store).replay([letter])
        await Relay(rig.store, rig.kit.make()).run_once()

        async def skipped() -> bool:
            return worker.skipped == 1

        # Not by its replayed-for header, which any producer could set: by its inbox.
        await eventually(skipped, what="the audit group skipping billing's replay")
        await rig.stop(worker, task)
        assert worker.handled == 1 and await rig.numbers() == {"k": [1]}

    rig.run(test())


def test_a_replayed_for_header_from_a_producer_skips_nothing(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        await rig.send(topic, Counted("k", 1), **{"replayed-for": "another-group"})
        worker = rig.worker(counting(rig, topic))
        task = rig.start(worker)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the message handled")
        await rig.stop(worker, task)
        assert (worker.handled, worker.skipped) == (1, 0)

    rig.run(test())


def test_an_unreadable_message_does_not_hold_its_id(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        good = Envelope.seal(topic, Message(Counted("k", 1)), registry)

        def sent_again(body: bytes, resend: str) -> Envelope:
            # `replayed-at` sets the copies apart for JetStream's duplicate window.
            return Envelope(topic, good.id, {**good.headers, "replayed-at": resend}, body)

        await rig.send_envelopes([sent_again(b"{not json", "first")])
        await rig.send_envelopes([sent_again(b"{not json", "redelivered")])
        worker = rig.worker(counting(rig, topic, in_flight=1))
        task = rig.start(worker)

        async def settled() -> bool:
            return worker.dead_lettered + worker.skipped == 2

        await eventually(settled, what="the bad message dead-lettered, its copy skipped")
        [letter] = await rig.dead_letters()  # the same bad message: one dead letter
        assert letter.message_id == good.id and not letter.holds_inbox
        assert await rig.inbox() == []
        await rig.send_envelopes([sent_again(good.body, "corrected")])

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the corrected message handled")
        await rig.stop(worker, task)
        assert (worker.dead_lettered, worker.skipped, worker.handled) == (1, 1, 1)
        assert await rig.inbox() == [("pybondi", good.id)]

    rig.run(test())


def test_a_message_whose_id_is_no_uuid_is_handled_under_that_id(rig: WorkerRig) -> None:
    async def test() -> None:
        topic, out = rig.kit.topic(), rig.kit.topic("out")
        consumer = rig.consumer()

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            await count(session, message)
            session.publisher.publish(out, Message({"seen": message.payload.n}))

        sealed = Envelope.seal(topic, Message(Counted("k", 1)), registry)
        # As a producer other than pybondi may send it: any text as its id.
        headers = {**sealed.headers, "message-id": "order-42", "correlation-id": "order-42"}
        await rig.send_envelopes([Envelope(topic, "order-42", headers, sealed.body)])
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the message handled")
        await rig.stop(worker, task)
        assert await rig.inbox() == [("pybondi", "order-42")]
        [row] = [row for row in await aoutbox_rows(rig.store) if row.topic == out]
        assert row.headers["causation-id"] == "order-42"

    rig.run(test())


def test_a_group_name_the_inbox_cannot_keep_is_refused_at_start(rig: WorkerRig) -> None:
    with pytest.raises(ValueError, match="has 256 characters.*shorter group name"):
        rig.worker(counting(rig, rig.kit.topic(), group="g" * 256))


def test_messages_whose_ids_are_too_long_are_dead_lettered_at_once(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        ran: list[int] = []
        consumer = rig.consumer()

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            ran.append(message.payload.n)
            await count(session, message)

        # 300 characters, the first 297 shared: only their ends tell them apart.
        ids = {n: "x" * 297 + f"{n:03d}" for n in range(40)}
        poison = []
        for n, long in ids.items():
            sealed = Envelope.seal(topic, Message(Counted("poison", n)), registry)
            # The header carries the id the worker reads; the adapters' own ids stay short.
            headers = {**sealed.headers, "message-id": long}
            poison.append(Envelope(topic, sealed.id, headers, sealed.body))
        await rig.send_envelopes(poison)
        await rig.send(topic, *(Counted("good", n) for n in range(100, 105)))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def settled() -> bool:
            numbers = await rig.numbers()
            return len(await rig.dead_letters()) == 40 and len(numbers.get("good", [])) == 5

        await eventually(settled, what="40 dead letters, and the good messages handled")
        await rig.stop(worker, task)
        letters = await rig.dead_letters()
        assert set(ran) == set(range(100, 105))  # no handler ran for the poison
        assert sorted((await rig.numbers())["good"]) == list(range(100, 105))
        assert worker.retried == 0
        assert all(letter.attempts == 1 for letter in letters)
        assert all(
            letter.error.startswith("Unreadable message: its message id has 300 characters")
            for letter in letters
        ), letters[0].error
        assert len({letter.message_id for letter in letters}) == 40
        assert all(len(letter.message_id) <= 255 for letter in letters)
        assert sorted(letter.headers["message-id"] for letter in letters) == sorted(ids.values())

    rig.run(test())


def test_a_failure_to_dead_letter_other_than_an_outage_is_logged_once_and_acked(
    rig: WorkerRig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "pybondi.messaging.worker")

    async def test() -> None:
        topic = rig.kit.topic()
        dead_letters = rig.store.statements.dead_letters.dead_letters
        await rig.drop(dead_letters)  # dead-lettering now fails, with the database up
        not_json = Envelope.seal(topic, Message(Counted("k", 1)), registry)
        not_json.body = b"{not json"
        await rig.send_envelopes([not_json])
        consumer = counting(rig, topic, retry=Retry(attempts=1, delay=0.1, max_delay=0.2))
        first = rig.worker(consumer)
        task = rig.start(first)

        def reports() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "could not dead-letter" in r.getMessage()]

        async def reported() -> bool:
            return bool(reports())

        await eventually(reported, what="the failure reported")
        await asyncio.sleep(3)  # past redeliver_after and the retry's delay
        await rig.stop(first, task)
        [report] = reports()  # once, and not retried forever
        assert report.exc_info is not None  # with the traceback
        await rig.create(dead_letters)
        second = rig.worker(consumer)
        task = rig.start(second)
        await asyncio.sleep(3)  # acknowledged: it does not come back
        await rig.stop(second, task)
        assert second.received == 0 and await rig.dead_letters() == []

    rig.run(test())


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_a_stop_ends_run_within_grace_whatever_the_broker_does(rig: WorkerRig, server: str) -> None:
    async def test() -> None:
        async with silent_server() as port:
            url = rig.kit.dead_url if server == "refusing" else at_port(rig.kit.url, port)
            worker = rig.worker(counting(rig, rig.kit.topic()), broker=rig.kit.make(url), grace=1)
            task = rig.start(worker)
            await asyncio.sleep(2)  # receiving: connecting, or waiting for an answer
            assert not task.done()
            stopped = time.monotonic()
            worker.stop()
            await asyncio.wait_for(task, 60)
            took = time.monotonic() - stopped
            assert took < worker.grace + 1.5, f"run() returned {took:.1f} s after stop()"

    rig.run(test())


def test_a_handler_past_the_timeout_is_cancelled_and_retried(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        calls = 0
        consumer = rig.consumer(timeout=0.3)

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted], session: Session = Depends(current_session)):
            nonlocal calls
            calls += 1
            await count(session, message)
            if calls == 1:
                await asyncio.sleep(3600)  # hangs: cancelled at the timeout, rolled back

        await rig.send(topic, Counted("k", 1))
        worker = rig.worker(consumer)
        task = rig.start(worker)

        async def counted() -> bool:
            return await rig.numbers() == {"k": [1]}

        await eventually(counted, what="the second attempt committed")
        await rig.stop(worker, task)
        assert (calls, worker.retried, worker.handled) == (2, 1, 1)

    rig.run(test())


def test_a_sync_store_refuses_async_handlers_before_any_message(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    store = rig.new_store(asynchronous=False, prefix=rig.store.prefix)
    consumer = rig.consumer()

    @consumer.subscribe(topic)
    async def handle(message: Message[Counted]) -> None: ...

    try:
        with pytest.raises(ValueError, match="give the worker an async store"):
            rig.worker(consumer, store=store)
        bus = Messagebus()
        dispatching = Consumer(bus, registry)
        dispatching.dispatch(topic)

        @bus.on
        async def counted(event: Counted) -> None: ...

        with pytest.raises(ValueError, match=r"async handlers \(.*counted\)"):
            rig.worker(dispatching, store=store)
    finally:
        store.dispose()


def test_a_message_whose_workers_keep_dying_is_dead_lettered_unhandled(rig: WorkerRig) -> None:
    async def test() -> None:
        topic = rig.kit.topic()
        started = asyncio.Event()
        consumer = rig.consumer(retry=Retry(attempts=2))

        @consumer.subscribe(topic)
        async def handle(message: Message[Counted]) -> None:
            started.set()
            await asyncio.sleep(3600)  # as good as dead: cancelled at each stop

        await rig.send(topic, Counted("k", 1))
        for _ in range(2):  # attempts 1 and 2 start, and never end
            started.clear()
            worker = rig.worker(consumer, grace=0.1, redeliver_after=1.0)
            task = rig.start(worker)
            await asyncio.wait_for(started.wait(), 15)
            await rig.stop(worker, task)
        started.clear()
        last = rig.worker(consumer, redeliver_after=1.0)
        task = rig.start(last)

        async def dead() -> bool:
            return len(await rig.dead_letters()) == 1

        await eventually(dead, what="the message dead-lettered")
        await rig.stop(last, task)
        [letter] = await rig.dead_letters()
        assert letter.attempts == 3 and "Gave up after 2 deliveries" in letter.error
        assert not started.is_set()  # the third delivery ran no handler

    rig.run(test())
