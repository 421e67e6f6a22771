"""PostgreSQL round trips per unit of work (psycopg's pipeline mode; issue 15).

A worker's message that changes one aggregate costs three: BEGIN with the inbox claim,
the aggregate's SELECT, its version-checked write with COMMIT. Round trips, not
statements, are what a unit of work waits for; see tests/round_trips.py for how they
are counted, and `pybondi.persistence.sql.pipelining` for how they are saved.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pybondi import Messagebus, Root, Session
from pybondi.exceptions import ConcurrencyError
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.persistence import SQLStore, Store
from pybondi.persistence.repositories import StateRepository
from tests.backends import Backend
from tests.conftest import Driver
from tests.round_trips import traced
from tests.test_repositories import Account, registry

pytestmark = pytest.mark.postgres

GROUP = "round-trips"


@pytest.fixture
def store(backends: dict[str, Backend], driver: Driver) -> Iterator[Store]:
    """A PostgreSQL store (psycopg), sync or async to match the driver, with an account."""
    made = backends["postgres"].store(asynchronous=driver.name == "async")  # pipelined
    driver.io(made, "create_tables")
    with driver.session(Session(Messagebus(), StateRepository(made, Account, registry()))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    yield made
    driver.io(made, "drop_tables")
    driver.io(made, "dispose")


def message() -> Envelope:
    return Envelope("bank.renames", str(uuid.uuid4()), {"message-type": "json"}, b"{}")


def claim(envelope: Envelope) -> Any:
    return lambda records: records.inbox.claim(GROUP, envelope)


def worker_unit(driver: Driver, store: Store, envelope: Envelope, change: Any) -> Any:
    """What a worker does with a message: claim it, then a session in that transaction."""
    transaction = driver.io(store, "begin")
    assert driver.io(transaction, "run", claim(envelope)) is True
    repository = StateRepository(store, Account, registry())
    publisher = Outbox(store, registry())  # type: ignore[arg-type]
    with driver.session(Session(Messagebus(), repository, publisher, transaction=transaction)):
        change(driver.io(repository, "get", "a-1"))
    return transaction


def rename(account: Account) -> None:
    account.owner = "bob"  # a change of state, without an event


def test_a_worker_message_that_changes_one_aggregate_takes_three_round_trips(
    driver: Driver, store: Store
) -> None:
    transaction = driver.io(store, "begin")
    with traced(transaction) as trips:
        assert driver.io(transaction, "run", claim(message())) is True
        repository = StateRepository(store, Account, registry())
        publisher = Outbox(store, registry())  # type: ignore[arg-type]
        session = Session(Messagebus(), repository, publisher, transaction=transaction)
        with driver.session(session):
            rename(driver.io(repository, "get", "a-1"))
    assert trips == [3]  # BEGIN + claim; SELECT; UPDATE + COMMIT
    assert read_owner(driver, store) == "bob"


def test_a_session_that_changes_one_aggregate_takes_two_round_trips(
    driver: Driver, store: Store
) -> None:
    transaction = driver.io(store, "begin")
    repository = StateRepository(store, Account, registry())
    session = Session(Messagebus(), repository, transaction=transaction)
    with traced(transaction) as trips, driver.session(session):
        rename(driver.io(repository, "get", "a-1"))
    assert trips == [2]  # BEGIN + SELECT; UPDATE + COMMIT
    assert read_owner(driver, store) == "bob"


def test_an_event_adds_the_round_trip_of_the_log_head(driver: Driver, store: Store) -> None:
    # The event's position comes from the log's head (UPDATE..RETURNING), which the
    # INSERT of the event needs: one more round trip, the aggregate's write riding it.
    transaction = driver.io(store, "begin")
    repository = StateRepository(store, Account, registry())
    session = Session(Messagebus(), repository, transaction=transaction)
    with traced(transaction) as trips, driver.session(session):
        driver.io(repository, "get", "a-1").deposit(5)
    assert trips == [3]  # BEGIN + SELECT; UPDATE + log head; INSERT event + COMMIT


def test_a_session_that_changes_nothing_takes_two_round_trips(driver: Driver, store: Store) -> None:
    transaction = driver.io(store, "begin")
    repository = StateRepository(store, Account, registry())
    session = Session(Messagebus(), repository, transaction=transaction)
    with traced(transaction) as trips, driver.session(session):
        driver.io(repository, "get", "a-1")
    assert trips == [2]  # BEGIN + SELECT; COMMIT


def test_a_session_that_reads_nothing_sends_nothing(driver: Driver, store: Store) -> None:
    transaction = driver.io(store, "begin")
    repository = StateRepository(store, Account, registry())
    session = Session(Messagebus(), repository, transaction=transaction)
    with traced(transaction) as trips, driver.session(session):
        pass
    assert trips == [0]


def test_a_version_conflict_in_a_pipelined_commit_commits_nothing(
    driver: Driver, store: Store
) -> None:
    envelope = message()

    def changed_meanwhile(account: Account) -> None:
        account.owner = "bob"
        other = StateRepository(store, Account, registry())
        with driver.session(Session(Messagebus(), other)):
            driver.io(other, "get", "a-1").owner = "eve"

    with pytest.raises(ConcurrencyError) as raised:
        worker_unit(driver, store, envelope, changed_meanwhile)

    assert (raised.value.stream, raised.value.expected, raised.value.actual) == (
        "bank.Account-a-1",
        1,
        2,
    )
    assert "was read at version 1 but is now at version 2" in str(raised.value)
    assert read_owner(driver, store) == "eve"
    # The inbox row went with the rest: the message can be handled again.
    assert driver.io(store, "transact", claim(envelope)) is True


def test_a_new_aggregate_whose_id_was_taken_meanwhile_is_a_conflict(
    driver: Driver, store: Store
) -> None:
    envelope = message()
    repository = StateRepository(store, Account, registry())
    transaction = driver.io(store, "begin")
    assert driver.io(transaction, "run", claim(envelope)) is True
    session = Session(Messagebus(), repository, transaction=transaction)
    with pytest.raises(ConcurrencyError) as raised, driver.session(session):
        repository.add(Account(Root("a-2"), "ada"))
        other = StateRepository(store, Account, registry())
        with driver.session(Session(Messagebus(), other)):
            other.add(Account(Root("a-2"), "eve"))
    assert (raised.value.expected, raised.value.actual) == (0, 1)
    assert driver.io(store, "transact", claim(envelope)) is True


def test_the_connection_leaves_autocommit_with_its_transaction(
    driver: Driver, store: Store
) -> None:
    # pybondi sends BEGIN itself, its connection in autocommit meanwhile: the pool must
    # get it back as it lent it, or others' statements would each commit on their own.
    assert isinstance(store, SQLStore)
    transaction = driver.io(store, "begin")
    connection = _driver_connection(transaction)
    try:
        driver.io(transaction, "run", claim(message()))
        assert connection.autocommit is True
    finally:
        driver.io(transaction, "close")
    assert connection.autocommit is False
    assert connection.info.transaction_status.name == "IDLE"


def read_owner(driver: Driver, store: Store) -> str:
    repository = StateRepository(store, Account, registry())
    with driver.session(Session(Messagebus(), repository)):
        owner: str = driver.io(repository, "get", "a-1").owner
    return owner


def _driver_connection(transaction: Any) -> Any:
    from tests.round_trips import driver_connection

    return driver_connection(transaction)


def test_pipelining_is_for_postgresql_with_psycopg(tmp_path: Any) -> None:
    from pybondi.persistence import SQLStore

    with pytest.raises(ValueError, match="pipelined=True is psycopg's pipeline mode"):
        SQLStore(f"sqlite:///{tmp_path}/x.db", pipelined=True)


def test_a_psycopg_store_is_pipelined_unless_told_not_to(
    backends: dict[str, Backend], tmp_path: Any
) -> None:
    from pybondi.persistence import SQLStore

    by_default, opted_out = (
        backends["postgres"].store(),
        backends["postgres"].store(pipelined=False),
    )
    assert isinstance(by_default, SQLStore) and by_default.statements.pipeline is not None
    assert isinstance(opted_out, SQLStore) and opted_out.statements.pipeline is None
    by_default.dispose()
    opted_out.dispose()
    elsewhere = SQLStore(f"sqlite:///{tmp_path}/x.db")  # no pipeline there, and no error
    assert elsewhere.statements.pipeline is None
    elsewhere.dispose()


def test_a_store_told_not_to_pipeline_waits_for_each_statement(
    backends: dict[str, Backend], driver: Driver
) -> None:
    made = backends["postgres"].store(asynchronous=driver.name == "async", pipelined=False)
    driver.io(made, "create_tables")
    try:
        with driver.session(
            Session(Messagebus(), StateRepository(made, Account, registry()))
        ) as unit:
            unit.add(Account(Root("a-1"), "ada"))
        transaction = driver.io(made, "begin")
        repository = StateRepository(made, Account, registry())
        session = Session(Messagebus(), repository, transaction=transaction)
        with traced(transaction) as trips, driver.session(session):
            rename(driver.io(repository, "get", "a-1"))
        assert trips == [4]  # BEGIN; SELECT; UPDATE; COMMIT
        assert read_owner(driver, made) == "bob"
    finally:
        driver.io(made, "drop_tables")
        driver.io(made, "dispose")
