"""pybondi's pytest plugin and InProcessRunner: outbox, relay and workers, no server.

The plugin is loaded in these test runs as in a user's (the `pytest11` entry point), so
the runner's tests take its fixtures; pytester checks the plugin itself. Each behaviour
of the runner runs through `drain` and `await adrain`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pybondi import Depends, Message, Messagebus, Session, current_session
from pybondi.messaging import Consumer, DeadLetters, Outbox, Retry
from pybondi.messaging.brokers.memory import ManualClock, MemoryBroker
from pybondi.persistence import MemoryStore, Registry
from pybondi.testing import Drained, InProcessRunner

pytest_plugins = ["pytester"]


@dataclass
class Ping:
    n: int


registry = Registry()
registry.register(Ping, name="tests.Ping")

Drain = Callable[..., Drained]


@pytest.fixture(params=["sync", "async"])
def drain(request: pytest.FixtureRequest, pybondi_runner: InProcessRunner) -> Drain:
    """`pybondi_runner.drain`, or `adrain` awaited on a loop of the test's own."""
    if request.param == "sync":
        return pybondi_runner.drain

    def adrain(*consumers: Consumer, **options: Any) -> Drained:
        return asyncio.run(pybondi_runner.adrain(*consumers, **options))

    return adrain


def publish(store: MemoryStore, topic: str, *payloads: Any) -> None:
    """Commit messages to the store's outbox, as a session's handlers would."""
    outbox = Outbox(store, registry)
    with Session(publisher=outbox):
        for payload in payloads:
            outbox.publish(topic, Message(payload))


# The plugin ---------------------------------------------------------------------------


def test_the_plugin_gives_each_test_its_own_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pybondi import Messagebus
        from pybondi.messaging.brokers.memory import ManualClock, MemoryBroker
        from pybondi.persistence import MemoryStore
        from pybondi.testing import InProcessRunner

        seen = []

        def test_fixtures(pybondi_bus, memory_store, manual_clock, memory_broker,
                          pybondi_runner):
            assert isinstance(pybondi_bus, Messagebus)
            assert isinstance(memory_store, MemoryStore)
            assert isinstance(manual_clock, ManualClock)
            assert isinstance(memory_broker, MemoryBroker)
            assert memory_broker.clock is manual_clock
            assert isinstance(pybondi_runner, InProcessRunner)
            assert pybondi_runner.store is memory_store
            assert pybondi_runner.broker is memory_broker
            seen.append((memory_store, memory_broker))

        def test_fresh(memory_store, memory_broker):
            assert seen and memory_store is not seen[0][0]
            assert memory_broker is not seen[0][1]
        """
    )
    pytester.runpytest().assert_outcomes(passed=2)
    # Loaded through its entry point: leaving it out leaves the fixtures out.
    result = pytester.runpytest("-p", "no:pybondi")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'pybondi_bus' not found*"])


def test_a_fixture_of_the_users_replaces_the_plugins(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from pybondi.persistence import MemoryStore

        class MyStore(MemoryStore):
            pass

        @pytest.fixture
        def memory_store():
            return MyStore()
        """
    )
    pytester.makepyfile(
        """
        def test_runner_drains_my_store(pybondi_runner):
            assert type(pybondi_runner.store).__name__ == "MyStore"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


# The runner ---------------------------------------------------------------------------


def test_drain_relays_and_handles_what_the_handlers_publish_in_turn(
    drain: Drain, memory_store: MemoryStore, memory_broker: MemoryBroker
) -> None:
    counted: list[int] = []
    doubler = Consumer(None, registry, group="doubler")
    counter = Consumer(None, registry, group="counter")

    @doubler.subscribe("numbers")
    def double(message: Message[Ping], session: Session = Depends(current_session)) -> None:
        session.publisher.publish("doubled", Message(Ping(message.payload.n * 2)))

    @counter.subscribe("doubled")
    def count(message: Message[Ping]) -> None:
        counted.append(message.payload.n)

    publish(memory_store, "numbers", Ping(1), Ping(2), Ping(3))

    drained = drain(doubler, counter)

    assert sorted(counted) == [2, 4, 6]
    assert drained == Drained(sent=6, handled=6)
    assert len(memory_broker.messages("doubled")) == 3
    assert drain(doubler, counter) == Drained()  # nothing left: nothing done


def test_a_retry_comes_due_when_the_manual_clock_is_advanced(
    drain: Drain, memory_store: MemoryStore, manual_clock: ManualClock
) -> None:
    attempts: list[int] = []
    consumer = Consumer(None, registry, retry=Retry(attempts=3, delay=300))

    @consumer.subscribe("pings")
    def flaky(message: Message[Ping]) -> None:
        attempts.append(message.payload.n)
        if len(attempts) == 1:
            raise ConnectionError("down for a while")

    publish(memory_store, "pings", Ping(1))

    # Without advancing: back once only retries are left, the clock where it was.
    assert drain(consumer, advance=False) == Drained(sent=1, retried=1, delayed=1)
    assert (attempts, manual_clock.monotonic()) == ([1], 0.0)

    assert drain(consumer) == Drained(handled=1, advanced=300.0)
    assert attempts == [1, 1]


def test_the_last_attempt_dead_letters_and_a_replay_is_handled(
    drain: Drain, memory_store: MemoryStore
) -> None:
    handled: list[int] = []
    consumer = Consumer(None, registry, retry=Retry(attempts=3, delay=300))
    failing = True

    @consumer.subscribe("pings")
    def fails(message: Message[Ping]) -> None:
        if failing:
            raise ValueError(f"cannot take {message.payload.n}")
        handled.append(message.payload.n)

    publish(memory_store, "pings", Ping(7))

    assert drain(consumer) == Drained(sent=1, retried=2, dead_lettered=1, advanced=600.0)
    letters = DeadLetters(memory_store)
    [letter] = asyncio.run(letters.list())
    assert (letter.topic, letter.attempts) == ("pings", 3)
    assert letter.error.startswith("ValueError: cannot take 7")

    failing = False
    asyncio.run(letters.replay([letter.id]))  # back to the outbox, for the relay
    assert drain(consumer) == Drained(sent=1, handled=1)
    assert handled == [7]


def test_drain_without_consumers_relays_only(
    drain: Drain, memory_store: MemoryStore, memory_broker: MemoryBroker
) -> None:
    publish(memory_store, "pings", Ping(1), Ping(2))
    assert drain() == Drained(sent=2)
    assert [envelope.body for envelope in memory_broker.messages("pings")] == [
        b'{"n":1}',
        b'{"n":2}',
    ]


def test_a_handler_that_never_returns_times_out_saying_what_is_left(
    memory_store: MemoryStore, memory_broker: MemoryBroker
) -> None:
    consumer = Consumer(None, registry, group="stuck")

    @consumer.subscribe("pings")
    async def hangs(message: Message[Ping]) -> None:
        await asyncio.Event().wait()

    publish(memory_store, "pings", Ping(1))
    runner = InProcessRunner(memory_store, memory_broker, timeout=0.2)
    with pytest.raises(TimeoutError, match="still had work after 0.2 s") as raised:
        runner.drain(consumer)
    assert "group 'stuck' on pings: Pending(ready=0, in_flight=1" in str(raised.value)
    assert "InProcessRunner(timeout=...)" in str(raised.value)


def test_drain_in_async_code_says_to_await_adrain(pybondi_runner: InProcessRunner) -> None:
    async def in_a_loop() -> None:
        pybondi_runner.drain()

    with pytest.raises(RuntimeError, match=r"use `await runner.adrain\(...\)`"):
        asyncio.run(in_a_loop())


def test_bad_arguments_are_refused_with_what_to_pass(
    memory_store: MemoryStore, pybondi_runner: InProcessRunner, pybondi_bus: Messagebus
) -> None:
    with pytest.raises(TypeError, match=r"only a MemoryBroker says.*MemoryBroker\(clock="):
        InProcessRunner(memory_store, object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Pass a MemoryStore"):
        InProcessRunner(object(), MemoryBroker())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be above 0"):
        InProcessRunner(memory_store, MemoryBroker(), timeout=0)
    with pytest.raises(TypeError, match="drain\\(\\) takes the Consumers.*Messagebus"):
        pybondi_runner.drain(pybondi_bus)  # type: ignore[arg-type]
