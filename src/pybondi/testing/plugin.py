"""pybondi's pytest plugin: fixtures for tests of your application, without servers.

pytest loads it wherever pybondi is installed (the `pytest11` entry point `pybondi`;
`pytest -p no:pybondi` leaves it out). Each fixture is new for each test:

- `pybondi_bus`: an empty `Messagebus`, for handlers registered in the test.
- `memory_store`: a `MemoryStore`, with an outbox, an inbox and dead letters.
- `manual_clock`: a `ManualClock`, which moves only when advanced.
- `memory_broker`: a `MemoryBroker` on `manual_clock`.
- `pybondi_runner`: an `InProcessRunner` (`pybondi.testing.runner`) on `memory_store`
  and `memory_broker`: `pybondi_runner.drain(consumer)` relays the outbox and runs a
  worker per consumer until nothing is left to do, retries included.

    def test_a_deposit_is_mailed(memory_store, pybondi_runner):
        with Session(bus, StateRepository(memory_store, Account, registry),
                     Outbox(memory_store, registry)) as session:
            session.execute(Deposit("erin", 5))     # Deposited: to the outbox
        assert pybondi_runner.drain(mails).handled == 1

A fixture of the same name in your conftest.py replaces one of these, and the others
then use yours: a `memory_store` returning `SQLStore("sqlite:///...")` has the runner
drain that store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

# pybondi's modules are imported when a test asks for a fixture, not when pytest loads
# the plugin: every pytest run where pybondi is installed loads it, and the runner's
# modules (the relay, the worker) take some 70 ms to import.
if TYPE_CHECKING:
    from pybondi.messagebus import Messagebus
    from pybondi.messaging.brokers.clock import ManualClock
    from pybondi.messaging.brokers.memory import MemoryBroker
    from pybondi.persistence.memory import MemoryStore
    from pybondi.persistence.store import MessagingStore
    from pybondi.testing.runner import InProcessRunner

__all__ = ["manual_clock", "memory_broker", "memory_store", "pybondi_bus", "pybondi_runner"]


@pytest.fixture
def pybondi_bus() -> Messagebus:
    """An empty `Messagebus`, for handlers registered in the test."""
    from pybondi.messagebus import Messagebus  # noqa: PLC0415

    return Messagebus()


@pytest.fixture
def memory_store() -> MemoryStore:
    """A `MemoryStore`: aggregates, events, an outbox, an inbox and dead letters."""
    from pybondi.persistence.memory import MemoryStore  # noqa: PLC0415

    return MemoryStore()


@pytest.fixture
def manual_clock() -> ManualClock:
    """The clock of `memory_broker`: `manual_clock.advance(300)` and 300 s have passed."""
    from pybondi.messaging.brokers.clock import ManualClock  # noqa: PLC0415

    return ManualClock()


@pytest.fixture
def memory_broker(manual_clock: ManualClock) -> MemoryBroker:
    """A `MemoryBroker` of the test's own, on `manual_clock`."""
    from pybondi.messaging.brokers.memory import MemoryBroker  # noqa: PLC0415

    return MemoryBroker("memory://pytest", clock=manual_clock)


@pytest.fixture
def pybondi_runner(memory_store: MessagingStore, memory_broker: MemoryBroker) -> InProcessRunner:
    """Relays `memory_store`'s outbox to `memory_broker` and runs workers on them.

    `pybondi_runner.drain(consumer, ...)` returns once nothing is left to do; see
    `pybondi.testing.runner`.
    """
    from pybondi.testing.runner import InProcessRunner  # noqa: PLC0415

    return InProcessRunner(memory_store, memory_broker)
