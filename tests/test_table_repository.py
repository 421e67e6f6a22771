"""TableRepository: aggregates in the application's own SQL table, on every SQL backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Messagebus, Root, Session
from pybondi.exceptions import ConcurrencyError, NotFound
from pybondi.persistence import MemoryStore, SQLStore, Store
from pybondi.persistence.repositories import TableRepository
from tests.conftest import Driver
from tests.test_repositories import Account, log, registry


@pytest.fixture
def table(sql_store: Store, driver: Driver) -> Iterator[sa.Table]:
    """The application's own accounts table, next to pybondi's."""
    assert isinstance(sql_store, SQLStore)
    made = sa.Table(
        f"accounts_{uuid.uuid4().hex[:8]}",
        sa.MetaData(schema=sql_store.metadata.schema),
        sa.Column("id", sa.String(50), primary_key=True),
        sa.Column("owner", sa.String(100), nullable=False, unique=True),
        sa.Column("balance", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    engine = sql_store.engine
    if isinstance(engine, AsyncEngine):

        async def create() -> None:
            async with engine.begin() as connection:
                await connection.run_sync(made.metadata.create_all)

        driver.runner.run(create())  # type: ignore[union-attr]
    else:
        made.metadata.create_all(engine)
    yield made


def to_row(account: Account) -> dict[str, Any]:
    return {"owner": account.owner, "balance": account.balance}


def from_row(row: Mapping[str, Any]) -> Account:
    return Account(Root(row["id"]), row["owner"], row["balance"])


def accounts(store: Store, table: sa.Table) -> TableRepository[Account]:
    return TableRepository(store, Account, registry(), table, to_row=to_row, from_row=from_row)


def read(driver: Driver, repository: TableRepository[Account], id: str) -> Account:
    with driver.session(Session(Messagebus(), repository)):
        return driver.io(repository, "get", id)  # type: ignore[no-any-return]


def test_rows_round_trip_with_versions_and_events(
    driver: Driver, sql_store: Store, table: sa.Table
) -> None:
    with driver.session(Session(Messagebus(), accounts(sql_store, table))) as unit:
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(10)
    repository = accounts(sql_store, table)
    with driver.session(Session(Messagebus(), repository)):
        loaded = driver.io(repository, "get", "a-1")
        assert driver.io(repository, "get", "a-1") is loaded
        assert (loaded.owner, loaded.balance) == ("ada", 10)
        assert repository.versions == {"a-1": 1}
        loaded.owner = "ada lovelace"  # a change without an event: a new version all the same
    assert read(driver, accounts(sql_store, table), "a-1").owner == "ada lovelace"
    assert [(e.stream, e.version) for e in log(driver, sql_store)] == [("bank.Account-a-1", 1)]
    repository = accounts(sql_store, table)
    read(driver, repository, "a-1")
    assert repository.versions == {}  # forgotten at close; the row is at version 2:
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "a-1")
        assert repository.versions == {"a-1": 2}


def test_stale_row_is_refused_naming_table_and_versions(
    driver: Driver, sql_store: Store, table: sa.Table
) -> None:
    with driver.session(Session(Messagebus(), accounts(sql_store, table))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    slow, fast = accounts(sql_store, table), accounts(sql_store, table)
    with pytest.raises(ConcurrencyError) as caught, driver.session(Session(Messagebus(), slow)):
        late = driver.io(slow, "get", "a-1")
        with driver.session(Session(Messagebus(), fast)):
            driver.io(fast, "get", "a-1").deposit(1)
        late.deposit(100)
    assert table.name in str(caught.value)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert read(driver, accounts(sql_store, table), "a-1").balance == 1
    assert len(log(driver, sql_store)) == 1


def test_missing_row_is_not_found(driver: Driver, sql_store: Store, table: sa.Table) -> None:
    with pytest.raises(NotFound, match="no bank.Account with id 'nobody'"):
        read(driver, accounts(sql_store, table), "nobody")


def test_table_without_the_columns_or_store_without_sql_says_so() -> None:
    table = sa.Table("plain", sa.MetaData(), sa.Column("key", sa.String, primary_key=True))
    with pytest.raises(ValueError, match="no column 'id'.*id_column="):
        accounts(MemoryStore(), table)
    good = sa.Table(
        "good",
        sa.MetaData(),
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("version", sa.Integer),
    )
    repository = accounts(MemoryStore(), good)
    with pytest.raises(TypeError, match="needs a SQL store"), Session(Messagebus(), repository):
        repository.get("a-1")


def test_a_row_at_version_0_says_versions_start_at_1(
    driver: Driver, sql_store: Store, table: sa.Table
) -> None:
    assert isinstance(sql_store, SQLStore)
    row = {"id": "old", "owner": "ada", "balance": 1, "version": 0}
    engine = sql_store.engine
    if isinstance(engine, AsyncEngine):

        async def insert() -> None:
            async with engine.begin() as connection:
                await connection.execute(table.insert().values(row))

        driver.runner.run(insert())  # type: ignore[union-attr]
    else:
        with engine.begin() as connection:
            connection.execute(table.insert().values(row))
    with pytest.raises(ValueError, match=r"versions start at 1.*SET version = 1"):
        read(driver, accounts(sql_store, table), "old")


def test_a_loaded_aggregate_with_another_id_is_refused(
    driver: Driver, sql_store: Store, table: sa.Table
) -> None:
    with driver.session(Session(Messagebus(), accounts(sql_store, table))) as unit:
        unit.add(Account(Root("a-1"), "ada"))

    def shouting(row: Mapping[str, Any]) -> Account:
        return Account(Root(row["id"].upper()), row["owner"], row["balance"])

    repository = TableRepository(
        sql_store, Account, registry(), table, to_row=to_row, from_row=shouting
    )
    with pytest.raises(ValueError, match=r"root id is 'A-1'"):
        read(driver, repository, "a-1")


def test_another_unique_column_is_an_integrity_error_not_a_conflict(
    driver: Driver, sql_store: Store, table: sa.Table
) -> None:
    with driver.session(Session(Messagebus(), accounts(sql_store, table))) as unit:
        unit.add(Account(Root("a-1"), "ada"))
    # Retrying a ConcurrencyError would never help here: the owner is taken.
    with (
        pytest.raises(sa.exc.IntegrityError),
        driver.session(Session(Messagebus(), accounts(sql_store, table))) as unit,
    ):
        unit.add(Account(Root("a-2"), "ada"))
