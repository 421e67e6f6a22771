"""Repositories on every store: aggregates saved, loaded, upcast, in sessions.

Every test here runs on memory, SQLite, PostgreSQL and MariaDB, each sync and async.
What the stores themselves keep (versions, log positions, snapshots, transactions) is
the store contract's (tests/test_store_contract.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pybondi import Aggregate, Event, Messagebus, Root, Session
from pybondi.exceptions import ConcurrencyError, NotFound, SerializationError, UnknownMessageType
from pybondi.persistence import Record, Snapshot, SQLStore, Store, StoredEvent
from pybondi.persistence.repositories import (
    EventSourcedRepository,
    StateRepository,
    StoreRepository,
)
from pybondi.persistence.serialization import Registry
from tests import hash_seeds
from tests.backends import Backend
from tests.conftest import Driver

# The domain -----------------------------------------------------------------------------


@dataclass
class Deposited(Event):
    account: str
    amount: int


@dataclass
class Renamed(Event):
    account: str
    owner: str


@dataclass(eq=False)
class Account(Aggregate):
    """State-stored: a dataclass whose fields are its stored document."""

    root: Root
    owner: str
    balance: int = 0
    history: list[int] = field(default_factory=list)

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.history.append(amount)
        self.root.publish(Deposited(self.root.id, amount))


class Ledger(Aggregate):
    """Event-sourced: rebuilt by applying its events to a blank one."""

    def __init__(self, id: str, balance: int = 0, owner: str = "", applied: int = 0) -> None:
        self.root = Root(id)
        self.balance = balance
        self.owner = owner
        self.applied = applied

    def deposit(self, amount: int) -> None:
        self._publish(Deposited(self.root.id, amount))

    def rename(self, owner: str) -> None:
        self._publish(Renamed(self.root.id, owner))

    def _publish(self, event: Event) -> None:
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        self.applied += 1
        if isinstance(event, Deposited):
            self.balance += event.amount
        elif isinstance(event, Renamed):
            self.owner = event.owner


def registry() -> Registry:
    made = Registry()
    made.register(Account, name="bank.Account")
    made.register(Deposited, name="bank.Deposited")
    made.register(Renamed, name="bank.Renamed")
    made.register(Ledger, name="bank.Ledger")
    return made


def accounts(store: Store, types: Registry | None = None) -> StateRepository[Account]:
    return StateRepository(store, Account, types or registry())


def ledgers(store: Store, **options: Any) -> EventSourcedRepository[Ledger]:
    return EventSourcedRepository(store, Ledger, options.pop("registry", registry()), **options)


def session(repository: StoreRepository[Any], bus: Messagebus | None = None) -> Session:
    return Session(bus or Messagebus(), repository)


def read(driver: Driver, repository: StoreRepository[Any], id: str) -> Any:
    """Load an aggregate in a unit of work of its own."""
    with driver.session(session(repository)):
        return driver.io(repository, "get", id)


def log(driver: Driver, store: Store, after: int = 0) -> list[StoredEvent]:
    return driver.io(store, "read_log", after)  # type: ignore[no-any-return]


def write_raw(
    driver: Driver, store: Store, *records: Record, events: Sequence[StoredEvent] = ()
) -> None:
    """Write rows straight into the store, as an older or broken program might have."""

    def work(transaction_records: Any) -> None:
        for record in records:
            transaction_records.write(record, 0)
        transaction_records.append(events)

    in_transaction(driver, store, work)


def in_transaction(driver: Driver, store: Store, work: Any) -> None:
    """Run `work` with the records of a transaction of its own, and commit."""
    transaction = driver.io(store, "begin")
    try:
        if driver.name == "sync":
            transaction.run(work)
        else:
            driver.runner.run(transaction.arun(work))  # type: ignore[union-attr]
        driver.io(transaction, "commit")
    finally:
        driver.io(transaction, "close")


# State-stored ---------------------------------------------------------------------------


def test_state_survives_the_session_and_events_reach_the_log(driver: Driver, store: Store) -> None:
    with driver.session(session(accounts(store))) as unit:
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(10)
        account.deposit(5)

    stored = read(driver, accounts(store), "a-1")
    assert (stored.owner, stored.balance, stored.history) == ("ada", 15, [10, 5])
    events = log(driver, store)
    assert [(e.stream, e.version, e.type, e.position) for e in events] == [
        ("bank.Account-a-1", 1, "bank.Deposited", 1),
        ("bank.Account-a-1", 2, "bank.Deposited", 2),
    ]
    assert events[0].data == '{"account":"a-1","amount":10}'


def test_identity_map_returns_the_same_object(driver: Driver, store: Store) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    repository = accounts(store)
    with driver.session(session(repository)):
        first = driver.io(repository, "get", "a-1")
        assert driver.io(repository, "get", "a-1") is first


def test_missing_aggregate_is_not_found_naming_type_and_id(driver: Driver, store: Store) -> None:
    repository = accounts(store)
    with (
        pytest.raises(NotFound, match=r"no bank\.Account with id 'nobody'"),
        driver.session(session(repository)),
    ):
        driver.io(repository, "get", "nobody")


def test_stale_write_is_refused_and_nothing_of_that_session_is_written(
    driver: Driver, store: Store
) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
        unit.add(Account(Root("a-2"), "bob"))

    slow, fast = accounts(store), accounts(store)
    with pytest.raises(ConcurrencyError) as caught, driver.session(session(slow)):
        late = driver.io(slow, "get", "a-1")
        other = driver.io(slow, "get", "a-2")
        with driver.session(session(fast)):
            driver.io(fast, "get", "a-1").deposit(1)
        late.deposit(100)
        other.deposit(100)

    assert (caught.value.stream, caught.value.expected, caught.value.actual) == (
        "bank.Account-a-1",
        1,
        2,
    )
    assert read(driver, accounts(store), "a-1").balance == 1
    assert read(driver, accounts(store), "a-2").balance == 0
    assert [e.data for e in log(driver, store)] == ['{"account":"a-1","amount":1}']


def test_adding_an_aggregate_that_exists_is_a_conflict(driver: Driver, store: Store) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    with (
        pytest.raises(ConcurrencyError, match="already exists"),
        driver.session(session(accounts(store))) as unit,
    ):
        unit.add(Account(Root("a-1"), "impostor"))
    assert read(driver, accounts(store), "a-1").owner == "ada"


def test_an_exception_in_the_session_writes_nothing(driver: Driver, store: Store) -> None:
    with pytest.raises(RuntimeError), driver.session(session(accounts(store))) as unit:
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(10)
        raise RuntimeError("the handler failed")
    repository = accounts(store)
    with pytest.raises(NotFound), driver.session(session(repository)):
        driver.io(repository, "get", "a-1")
    assert log(driver, store) == []


def test_unchanged_aggregates_are_not_written(driver: Driver, store: Store) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    repository = accounts(store)
    with driver.session(session(repository)):
        driver.io(repository, "get", "a-1")
    with driver.session(session(repository)):
        driver.io(repository, "get", "a-1").owner = "ada lovelace"
    with driver.session(session(repository)):
        driver.io(repository, "get", "a-1")
        assert repository.versions == {"a-1": 2}


def test_handlers_of_committed_see_the_aggregate_before_it_is_written(
    driver: Driver, store: Store
) -> None:
    from pybondi import Committed

    bus = Messagebus()

    @bus.on(Committed)
    def stamp(event: Committed[Account]) -> None:
        event.aggregate.owner += " (checked)"

    with driver.session(session(accounts(store), bus)) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    assert read(driver, accounts(store), "a-1").owner == "ada (checked)"


# Event-sourced --------------------------------------------------------------------------


def test_event_sourced_aggregate_is_rebuilt_from_its_stream(driver: Driver, store: Store) -> None:
    with driver.session(session(ledgers(store))) as unit:
        ledger = Ledger("l-1")
        unit.add(ledger)
        ledger.deposit(10)
        ledger.rename("ada")
    repository = ledgers(store)
    with driver.session(session(repository)):
        ledger = driver.io(repository, "get", "l-1")
        assert (ledger.balance, ledger.owner, ledger.applied) == (10, "ada", 2)
        ledger.deposit(5)
    assert read(driver, ledgers(store), "l-1").balance == 15
    assert [e.version for e in log(driver, store)] == [1, 2, 3]


def test_event_sourced_append_checks_the_stream_version(driver: Driver, store: Store) -> None:
    with driver.session(session(ledgers(store))) as unit:
        ledger = Ledger("l-1")
        unit.add(ledger)
        ledger.deposit(10)
    slow, fast = ledgers(store), ledgers(store)
    with pytest.raises(ConcurrencyError) as caught, driver.session(session(slow)):
        late = driver.io(slow, "get", "l-1")
        with driver.session(session(fast)):
            driver.io(fast, "get", "l-1").deposit(1)
        late.deposit(100)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert read(driver, ledgers(store), "l-1").balance == 11


def test_snapshots_shorten_loading_and_are_dropped_when_the_schema_changes(
    driver: Driver, store: Store
) -> None:
    with driver.session(session(ledgers(store, snapshot_every=4))) as unit:
        ledger = Ledger("l-1")
        unit.add(ledger)
        for amount in range(1, 7):
            ledger.deposit(amount)  # events 1..6: a snapshot at 6 (crossed 4)

    loaded = read(driver, ledgers(store, snapshot_every=4), "l-1")
    assert loaded.balance == 21
    assert loaded.applied == 6  # the snapshot's count, and no event applied after it

    with driver.session(session(ledgers(store, snapshot_every=4))) as unit:
        driver.io(unit.repository, "get", "l-1").deposit(100)  # event 7: no new snapshot
    loaded = read(driver, ledgers(store, snapshot_every=4), "l-1")
    assert (loaded.balance, loaded.applied) == (121, 7)

    changed = registry()
    changed_types = Registry()
    for name in ("bank.Deposited", "bank.Renamed", "bank.Account"):
        changed_types.register(changed.type_of(name), name=name)
    changed_types.register(Ledger, name="bank.Ledger", version=2)
    rebuilt = read(driver, ledgers(store, snapshot_every=4, registry=changed_types), "l-1")
    assert (rebuilt.balance, rebuilt.applied) == (121, 7)  # from all 7 events, not the snapshot


# Schema changes and bad data -------------------------------------------------------------


def test_old_events_are_upcast_on_load(driver: Driver, store: Store) -> None:
    write_raw(
        driver,
        store,
        Record("bank.Ledger-l-1", 1, 1, None),
        events=[StoredEvent("bank.Ledger-l-1", 1, "bank.Deposited", 1, '{"acct":"x","cents":500}')],
    )
    types = Registry()
    types.register(Deposited, name="bank.Deposited", version=2)
    types.register(Ledger, name="bank.Ledger")

    @types.upcaster("bank.Deposited", from_version=1)
    def cents_to_units(data: dict[str, Any]) -> dict[str, Any]:
        return {"account": data["acct"], "amount": data["cents"] // 100}

    assert read(driver, ledgers(store, registry=types), "l-1").balance == 5


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ('{"owner": "eve", "balance": ', SerializationError, "not valid JSON"),
        ('{"balance": 3}', SerializationError, "owner"),
    ],
    ids=["corrupted-json", "missing-field"],
)
def test_a_bad_stored_state_names_the_problem_and_spares_the_others(
    driver: Driver, store: Store, data: str, error: type[Exception], words: str
) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("good"), "ada"))
    write_raw(driver, store, Record("bank.Account-bad", 1, 1, data))

    repository = accounts(store)
    with driver.session(session(repository)):
        with pytest.raises(error, match=words) as caught:
            driver.io(repository, "get", "bad")
        assert "bank.Account-bad" in "\n".join(caught.value.__notes__)
        assert driver.io(repository, "get", "good").owner == "ada"


def test_an_event_of_an_unregistered_type_names_it_and_spares_the_others(
    driver: Driver, store: Store
) -> None:
    with driver.session(session(ledgers(store))) as unit:
        good = Ledger("good")
        unit.add(good)
        good.deposit(1)
    write_raw(
        driver,
        store,
        Record("bank.Ledger-bad", 1, 1, None),
        events=[StoredEvent("bank.Ledger-bad", 1, "bank.Stolen", 1, "{}")],
    )
    repository = ledgers(store)
    with driver.session(session(repository)):
        with pytest.raises(UnknownMessageType, match="bank.Stolen"):
            driver.io(repository, "get", "bad")
        assert driver.io(repository, "get", "good").balance == 1


def test_publishing_an_unregistered_event_fails_the_commit_and_writes_nothing(
    driver: Driver, store: Store
) -> None:
    @dataclass
    class Unregistered(Event):
        note: str

    with (
        pytest.raises(UnknownMessageType, match="Unregistered"),
        driver.session(session(accounts(store))) as unit,
    ):
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.root.publish(Unregistered("x"))
    assert log(driver, store) == []


def test_a_session_goes_on_after_rollback(driver: Driver, store: Store) -> None:
    from pybondi import Added

    bus, added = Messagebus(), []

    @bus.on(Added)
    def welcome(event: Added[Account]) -> None:
        added.append(event.aggregate.root.id)

    with driver.session(session(accounts(store), bus)) as unit:
        unit.add(Account(Root("a-1"), "ada"))
        driver.rollback(unit)  # the store forgets a-1: it was never written
        unit.add(Account(Root("a-2"), "bob"))
    assert added == ["a-2"]  # a-1's Added was still queued when the rollback dropped it
    assert read(driver, accounts(store), "a-2").owner == "bob"
    with pytest.raises(NotFound):
        read(driver, accounts(store), "a-1")


def test_old_states_are_upcast_on_load(driver: Driver, store: Store) -> None:
    write_raw(driver, store, Record("bank.Account-a-1", 3, 1, '{"name":"ada","cents":700}'))
    types = Registry()
    types.register(Account, name="bank.Account", version=2)
    types.register(Deposited, name="bank.Deposited")

    @types.upcaster("bank.Account", from_version=1)
    def rename_fields(data: dict[str, Any]) -> dict[str, Any]:
        return {"owner": data["name"], "balance": data["cents"] // 100, "history": []}

    repository = accounts(store, types)
    with driver.session(session(repository)):
        account = driver.io(repository, "get", "a-1")
        assert (account.owner, account.balance, repository.versions) == ("ada", 7, {"a-1": 3})
        account.deposit(1)
    # Written back under the new version of the class, at the next version of the row.
    with driver.session(session(accounts(store, types))) as unit:
        assert driver.io(unit.repository, "get", "a-1").balance == 8
    assert [(e.stream, e.version) for e in log(driver, store)] == [("bank.Account-a-1", 4)]


# Found in review --------------------------------------------------------------------------


def test_a_name_of_your_own_names_the_rows_and_still_loads(driver: Driver, store: Store) -> None:
    with driver.session(session(StateRepository(store, Account, registry(), name="acct"))) as s:
        s.add(Account(Root("a-1"), "ada"))
    assert read(driver, StateRepository(store, Account, registry(), name="acct"), "a-1").owner
    assert [e.stream for e in log(driver, store)] == []
    with pytest.raises(NotFound):
        read(driver, accounts(store), "a-1")  # another name: other rows


def test_ids_differing_in_case_or_spaces_are_other_aggregates(driver: Driver, store: Store) -> None:
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("ada"), "ada"))
        unit.add(Account(Root("ada "), "spaced"))
    for other in ("ADA", "Ada"):
        with pytest.raises(NotFound):
            read(driver, accounts(store), other)
    assert read(driver, accounts(store), "ada ").owner == "spaced"


def test_a_session_reads_what_was_committed_since_it_began(driver: Driver, store: Store) -> None:
    # MariaDB's REPEATABLE READ would show the state as of the session's first read.
    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("x"), "ada"))
        unit.add(Account(Root("y"), "bob"))
    slow = accounts(store)
    with driver.session(session(slow)):
        driver.io(slow, "get", "x")
        with driver.session(session(accounts(store))) as other:
            driver.io(other.repository, "get", "y").deposit(5)
        late = driver.io(slow, "get", "y")
        assert (late.balance, slow.versions["y"]) == (5, 2)
        late.deposit(1)
    assert read(driver, accounts(store), "y").balance == 6


def test_the_log_keeps_the_order_events_were_dispatched_in(driver: Driver, store: Store) -> None:
    bus = Messagebus()
    repository = accounts(store)

    # a's deposit causes one on b, in a handler of the driver's kind.
    if driver.name == "sync":

        @bus.on(Deposited)
        def mirror(event: Deposited) -> None:
            if event.account == "a":
                repository.get("b").deposit(event.amount)
    else:

        @bus.on(Deposited)
        async def amirror(event: Deposited) -> None:
            if event.account == "a":
                (await repository.aget("b")).deposit(event.amount)

    with driver.session(session(accounts(store))) as unit:
        unit.add(Account(Root("b"), "bob"))  # b first in the identity map
        unit.add(Account(Root("a"), "ada"))
    with driver.session(session(repository, bus)):
        driver.io(repository, "get", "b")
        driver.io(repository, "get", "a").deposit(3)
    assert [(e.stream, e.version) for e in log(driver, store)] == [
        ("bank.Account-a", 2),  # the cause ...
        ("bank.Account-b", 2),  # ... before its effect
    ]


def test_a_snapshot_that_does_not_load_is_skipped_for_the_events(
    driver: Driver, store: Store
) -> None:
    with driver.session(session(ledgers(store, snapshot_every=2))) as unit:
        ledger = Ledger("l-1")
        unit.add(ledger)
        ledger.deposit(1)
        ledger.deposit(2)

    def corrupt(records: Any) -> None:
        records.write_snapshot(Snapshot("bank.Ledger-l-1", 2, 1, '{"balance": '))

    in_transaction(driver, store, corrupt)
    rebuilt = read(driver, ledgers(store, snapshot_every=2), "l-1")
    assert (rebuilt.balance, rebuilt.applied) == (3, 2)


def test_a_state_that_cannot_be_snapshot_skips_the_snapshot_not_the_commit(
    driver: Driver, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    with driver.session(session(ledgers(store, snapshot_every=1))) as unit:
        ledger = Ledger("l-1")
        unit.add(ledger)
        ledger.deposit(5)
        ledger.note = "not an __init__ parameter"  # type: ignore[attr-defined]
    assert "Skipping the snapshot of bank.Ledger-l-1 at version 1" in caplog.text
    rebuilt = read(driver, ledgers(store, snapshot_every=1), "l-1")
    assert (rebuilt.balance, rebuilt.applied) == (5, 1)  # from its event


def test_a_session_that_changes_nothing_writes_nothing_under_any_hash_seed(
    backend: Backend,
) -> None:
    # Sets of frozen dataclasses iterate in another order in each process: one process
    # stores the aggregate, others read it without changing it, and its version stays.
    store = backend.store()
    if isinstance(store, SQLStore):
        store.create_tables()
        spec = {"url": backend.url, "schema": backend.namespace, "prefix": store.prefix}
        store.dispose()
    else:
        spec = {"url": ""}
    first, *others = hash_seeds.SEEDS

    record = json.loads(hash_seeds.run(first, "add", json.dumps({**spec, "record": None})))
    read = [
        json.loads(hash_seeds.run(seed, "read", json.dumps({**spec, "record": record})))
        for seed in others
    ]

    assert record[0] == 1
    assert read == [record] * len(others)
