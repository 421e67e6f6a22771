"""Projections that write SQL tables through `Depends(current_connection)`.

The view's rows commit with the checkpoint and roll back with it, on SQLite, PostgreSQL
and MariaDB, sync (a `Connection`) and async (an `AsyncConnection`).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pybondi import Depends, current_connection
from pybondi.persistence import SQLStore, Store
from pybondi.projection import Projection, ProjectionReset, ProjectionRunner
from tests.conftest import Driver
from tests.projections import Deposited, append, deposits, expected, registry


def balance_table(store: SQLStore) -> sa.Table:
    return sa.Table(
        f"{store.prefix}balances",
        sa.MetaData(schema=store.metadata.schema),
        sa.Column("account", sa.String(50), primary_key=True),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
    )


def table_view(driver: Driver, store: SQLStore, fails: list[int]) -> tuple[Projection, sa.Table]:
    """A projection into a table; an amount in `fails` fails once (then leaves the list)."""
    table = balance_table(store)
    projection = Projection("table-view", registry)

    def statements(event: Deposited) -> tuple[Any, Any]:
        if event.amount in fails:
            fails.remove(event.amount)
            raise RuntimeError(f"deposit {event.amount} fails once")
        update = (
            table.update()
            .where(table.c.account == event.account)
            .values(total=table.c.total + event.amount, count=table.c.count + 1)
        )
        insert = table.insert().values(account=event.account, total=event.amount, count=1)
        return update, insert

    if driver.name == "async":

        @projection.on
        async def adeposited(
            event: Deposited, connection: Any = Depends(current_connection)
        ) -> None:
            update, insert = statements(event)
            if (await connection.execute(update)).rowcount == 0:
                await connection.execute(insert)

        @projection.reset
        async def aclear(
            reset: ProjectionReset, connection: Any = Depends(current_connection)
        ) -> None:
            await connection.execute(table.delete())

    else:

        @projection.on
        def deposited(event: Deposited, connection: Any = Depends(current_connection)) -> None:
            update, insert = statements(event)
            if connection.execute(update).rowcount == 0:
                connection.execute(insert)

        @projection.reset
        def clear(reset: ProjectionReset, connection: Any = Depends(current_connection)) -> None:
            connection.execute(table.delete())

    return projection, table


def create(driver: Driver, store: SQLStore, table: sa.Table) -> None:
    if driver.name == "async":

        async def made() -> None:
            async with store.engine.begin() as connection:  # type: ignore[union-attr]
                await connection.run_sync(table.metadata.create_all)

        driver.runner.run(made())  # type: ignore[union-attr]
    else:
        with store.engine.begin() as connection:  # type: ignore[union-attr]
            table.metadata.create_all(connection)


def rows(driver: Driver, store: SQLStore, table: sa.Table) -> dict[str, tuple[int, int]]:
    select = sa.select(table.c.account, table.c.total, table.c.count)
    if driver.name == "async":

        async def read() -> list[Any]:
            async with store.engine.connect() as connection:  # type: ignore[union-attr]
                return list(await connection.execute(select))

        found = driver.runner.run(read())  # type: ignore[union-attr]
    else:
        with store.engine.connect() as connection:  # type: ignore[union-attr]
            found = list(connection.execute(select))
    return {account: (total, count) for account, total, count in found}


def test_the_views_rows_commit_with_the_checkpoint_and_roll_back_with_it(
    driver: Driver, sql_store: Store
) -> None:
    assert isinstance(sql_store, SQLStore)
    fails = [7, 18]
    projection, table = table_view(driver, sql_store, fails)
    create(driver, sql_store, table)
    events = deposits(25)
    append(driver, sql_store, *events)
    runner = ProjectionRunner(projection, sql_store, batch_size=10, max_backoff=0.01)
    assert driver.io(runner, "catch_up") == 25
    assert fails == []  # both failed once, and their batches were rolled back
    assert rows(driver, sql_store, table) == expected(events)
    # A rebuild empties the table in the transaction that resets the checkpoint.
    driver.io(runner, "rebuild")
    assert rows(driver, sql_store, table) == {}
    assert driver.io(runner, "catch_up") == 25
    assert rows(driver, sql_store, table) == expected(events)
