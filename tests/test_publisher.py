from __future__ import annotations

import asyncio
import threading
from datetime import UTC
from uuid import UUID

import pytest

from pybondi import AsyncRequired, DeliveryError, InvalidHandler, Message, Publisher, SessionError
from tests.conftest import Driver


def recording_publisher(*topics: str) -> tuple[Publisher, list[tuple[str, object]]]:
    publisher, seen = Publisher(), []
    for topic in topics:
        publisher.subscribe(topic)(
            lambda message, topic=topic: seen.append((topic, message.payload))
        )
    return publisher, seen


def test_message_envelope() -> None:
    message = Message({"a": 1}, sender="accounts", headers={"trace": "x"})
    assert message.payload == {"a": 1}
    assert message.sender == "accounts"
    assert message.headers == {"trace": "x"}
    assert isinstance(message.id, UUID)
    assert message.timestamp.tzinfo is UTC
    assert Message(1).id != Message(1).id


def test_messages_are_delivered_in_order_only_on_commit(driver: Driver) -> None:
    publisher, seen = recording_publisher("a", "b")
    publisher.publish("a", Message(1))
    publisher.publish("b", Message(2))
    publisher.publish("a", Message(3))
    assert seen == []
    driver.deliver(publisher)
    assert seen == [("a", 1), ("b", 2), ("a", 3)]
    driver.deliver(publisher)  # nothing is delivered twice
    assert len(seen) == 3


def test_rollback_drops_buffered_messages(driver: Driver) -> None:
    publisher, seen = recording_publisher("a")
    publisher.publish("a", Message("dropped"))
    publisher.rollback()
    publisher.publish("a", Message("kept"))
    driver.deliver(publisher)
    assert seen == [("a", "kept")]


def test_one_subscriber_on_many_topics_and_unsubscribed_topics(driver: Driver) -> None:
    publisher, seen = Publisher(), []
    publisher.subscribe("a", "b")(lambda message: seen.append(message.payload))
    publisher.publish("a", Message(1))
    publisher.publish("nobody", Message(2))
    publisher.publish("b", Message(3))
    driver.deliver(publisher)
    assert seen == [1, 3]


def test_direct_subscribe_form_of_1_x(driver: Driver) -> None:
    publisher, seen = Publisher(), []
    publisher.subscribe("a", lambda message: seen.append(message.payload))
    publisher.publish("a", Message("x"))
    driver.deliver(publisher)
    assert seen == ["x"]


def test_failing_subscriber_keeps_the_rest_and_commit_resumes(driver: Driver) -> None:
    publisher, seen, failures = Publisher(), [], [1]

    publisher.subscribe("t")(lambda message: seen.append(("first", message.payload)))

    @publisher.subscribe("t")
    def flaky(message: Message[int]) -> None:
        if message.payload == 2 and failures:
            failures.pop()
            raise ConnectionError("down")
        seen.append(("flaky", message.payload))

    for n in (1, 2, 3):
        publisher.publish("t", Message(n))
    with pytest.raises(DeliveryError) as raised:
        driver.deliver(publisher)
    error = raised.value
    assert "flaky" in str(error)
    assert error.topic == "t"
    assert error.message.payload == 2
    assert [message.payload for _, message in error.undelivered] == [2, 3]
    assert [m.payload for _, m in publisher.pending()] == [2, 3]
    assert isinstance(error.__cause__, ConnectionError)
    driver.deliver(publisher)  # resumes with flaky for message 2; first does not see it twice
    assert seen == [
        ("first", 1),
        ("flaky", 1),
        ("first", 2),
        ("flaky", 2),
        ("first", 3),
        ("flaky", 3),
    ]


def test_rollback_after_failed_delivery_drops_the_rest(driver: Driver) -> None:
    publisher, seen = Publisher(), []

    @publisher.subscribe("t")
    def broken(message: Message[int]) -> None:
        if message.payload == 1:
            raise RuntimeError("no")
        seen.append(message.payload)

    publisher.publish("t", Message(1))
    with pytest.raises(DeliveryError):
        driver.deliver(publisher)
    publisher.rollback()
    publisher.publish("t", Message(2))
    driver.deliver(publisher)
    assert seen == [2]


def test_bad_input_is_a_type_error() -> None:
    publisher = Publisher()
    with pytest.raises(TypeError, match=r"Wrap the payload: publish\(topic, Message\(payload\)\)"):
        publisher.publish("t", "raw")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="A topic is a str"):
        publisher.publish(1, Message(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidHandler, match="topic names"):
        publisher.subscribe()(lambda message: None)
    assert publisher.pending() == []


def test_close_refuses_to_drop_undelivered_messages() -> None:
    publisher = Publisher()
    publisher.begin()
    publisher.publish("t", Message(1))
    with pytest.raises(SessionError, match="1 undelivered"):
        publisher.close()
    publisher.rollback()
    publisher.close()


def test_transactions_nest_and_restore_the_outer_one() -> None:
    publisher, seen = recording_publisher("t")
    publisher.begin()
    publisher.publish("t", Message("outer"))
    publisher.begin()
    publisher.publish("t", Message("inner"))
    publisher.commit()
    publisher.close()
    assert seen == [("t", "inner")]
    publisher.commit()
    assert seen == [("t", "inner"), ("t", "outer")]


def test_threads_have_separate_transactions() -> None:
    publisher, seen = recording_publisher("t")
    barrier = threading.Barrier(2)

    def work(name: str, commit: bool) -> None:
        publisher.begin()
        publisher.publish("t", Message(name))
        barrier.wait()  # both have published before either commits or rolls back
        if commit:
            publisher.commit()
        else:
            publisher.rollback()
        publisher.close()

    threads = [
        threading.Thread(target=work, args=("committed", True)),
        threading.Thread(target=work, args=("rolled back", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [("t", "committed")]


def test_tasks_have_separate_transactions() -> None:
    publisher, seen = recording_publisher("t")

    async def work(name: str, commit: bool) -> None:
        publisher.begin()
        publisher.publish("t", Message(name))
        await asyncio.sleep(0)
        await (publisher.acommit() if commit else publisher.arollback())
        publisher.close()

    async def main() -> None:
        await asyncio.gather(work("committed", True), work("rolled back", False))

    asyncio.run(main())
    assert seen == [("t", "committed")]


def test_async_subscribers() -> None:
    publisher, seen = Publisher(), []

    @publisher.subscribe("t")
    async def remote(message: Message[int]) -> None:
        await asyncio.sleep(0)
        seen.append(message.payload)

    publisher.publish("t", Message(1))
    with pytest.raises(AsyncRequired, match=r"remote is async.*acommit"):
        publisher.commit()
    assert [m.payload for _, m in publisher.pending()] == [1]
    asyncio.run(publisher.acommit())
    assert seen == [1]
