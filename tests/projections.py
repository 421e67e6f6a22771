"""What the projection tests share: events, a balance view kept as aggregates, the log.

`balances()` makes a projection that keeps one `Balance` aggregate per account, through
a `StateRepository` on the runner's store: it works on every store, the memory one too,
and its writes commit with the checkpoint. The handlers are sync or `async def` to
match the driver, since an async session's repository is read with `aget`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pybondi import Aggregate, Depends, Event, NotFound, Root, Session, current_session
from pybondi.persistence import Store, StoredEvent
from pybondi.persistence.repositories import StateRepository
from pybondi.persistence.serialization import Registry
from pybondi.projection import Projection, ProjectionReset, stored_event
from tests.conftest import Driver

ACCOUNTS = ["ada", "bob", "cy"]

registry = Registry()


@registry.register(name="tests.Deposited")
@dataclass(frozen=True)
class Deposited(Event):
    account: str
    amount: int


@registry.register(name="tests.Renamed")
@dataclass(frozen=True)
class Renamed(Event):
    account: str
    owner: str


@dataclass
class Balance(Aggregate):
    """An account's balance as the projection sees it."""

    root: Root
    total: int = 0
    count: int = 0
    positions: list[int] = field(default_factory=list)


registry.register(Balance, name="tests.Balance")


_versions = itertools.count(1)  # each event a version of its own in the one stream


def stored(event: Event, stream: str = "bank") -> StoredEvent:
    serialized = registry.dumps(event)
    version = next(_versions)
    return StoredEvent(stream, version, serialized.name, serialized.version, serialized.data)


def append(driver: Driver, store: Store, *events: StoredEvent | Event) -> None:
    """Append events to the log, in one transaction of their own."""
    rows = [event if isinstance(event, StoredEvent) else stored(event) for event in events]
    driver.io(store, "transact", lambda records: records.append(rows))


def deposits(count: int, start: int = 0) -> list[Deposited]:
    """`count` deposits over the accounts, amounts start+1, start+2...: deposits(5, 10)
    are the last five of deposits(15)."""
    return [Deposited(ACCOUNTS[n % len(ACCOUNTS)], n + 1) for n in range(start, start + count)]


def balances(
    asynchronous: bool, *, fail: Callable[[Deposited], None] | None = None, name: str = "balances"
) -> Projection:
    """The projection of deposits into balances; `fail(event)` may raise, to test failures."""
    projection = Projection(
        name, registry, repository=lambda store: StateRepository(store, Balance, registry)
    )

    def apply(balance: Balance, event: Deposited, position: int) -> None:
        if fail is not None:
            fail(event)
        balance.total += event.amount
        balance.count += 1
        balance.positions.append(position)

    if asynchronous:

        @projection.on
        async def adeposited(
            event: Deposited,
            session: Session = Depends(current_session),
            at: StoredEvent = Depends(stored_event),
        ) -> None:
            try:
                balance = await session.repository.aget(event.account)
            except NotFound:
                balance = Balance(Root(event.account))
                session.add(balance)
            apply(balance, event, at.position)

        @projection.reset
        async def aclear(
            reset: ProjectionReset, session: Session = Depends(current_session)
        ) -> None:
            for account in ACCOUNTS:
                try:
                    balance = await session.repository.aget(account)
                except NotFound:
                    continue
                balance.total, balance.count, balance.positions = 0, 0, []

    else:

        @projection.on
        def deposited(
            event: Deposited,
            session: Session = Depends(current_session),
            at: StoredEvent = Depends(stored_event),
        ) -> None:
            try:
                balance = session.repository.get(event.account)
            except NotFound:
                balance = Balance(Root(event.account))
                session.add(balance)
            apply(balance, event, at.position)

        @projection.reset
        def clear(reset: ProjectionReset, session: Session = Depends(current_session)) -> None:
            for account in ACCOUNTS:
                try:
                    balance = session.repository.get(account)
                except NotFound:
                    continue
                balance.total, balance.count, balance.positions = 0, 0, []

    return projection


def read_balances(driver: Driver, store: Store) -> dict[str, tuple[int, int]]:
    """Each account's (total, count), read back in a unit of work of its own."""
    repository = StateRepository(store, Balance, registry)
    found: dict[str, tuple[int, int]] = {}
    with driver.session(Session(repository=repository)):
        for account in ACCOUNTS:
            try:
                balance = driver.io(repository, "get", account)
            except NotFound:
                continue
            found[account] = (balance.total, balance.count)
    return found


def expected(events: list[Deposited]) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for event in events:
        total, count = totals.get(event.account, (0, 0))
        totals[event.account] = (total + event.amount, count + 1)
    return totals


def checkpoint(driver: Driver, store: Store, name: str = "balances") -> Any:
    return driver.io(store, "transact", lambda records: records.projections.get(name))
