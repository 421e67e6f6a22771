"""A SQL store's unit of work: one pooled connection, sync or async, and its commit.

`SQLStore.begin()` and `abegin()` open one; the work runs as sync functions of
`SQLRecords` on its connection (an async one through SQLAlchemy's greenlet bridge).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from pybondi.exceptions import SessionError
from pybondi.persistence.sql.records import SQLRecords
from pybondi.persistence.store import Connected, Transaction

if TYPE_CHECKING:
    from pybondi.persistence.sql.store import SQLStore

__all__ = ["READS_OUTSIDE", "SQLTransaction"]

T = TypeVar("T")

READS_OUTSIDE = "pybondi_reads_outside"
"""Marks a SQLite connection whose transaction pybondi begins itself (see `sql.store`)."""
_OWN_SQLITE_CONNECTION = {READS_OUTSIDE: True}


class SQLTransaction(Transaction[SQLRecords], Connected):
    """A unit of work on one pooled connection, sync or async."""

    def __init__(
        self,
        store: SQLStore,
        connection: Connection | None,
        aconnection: AsyncConnection | None,
    ) -> None:
        self.store: SQLStore = store
        self.statements = store.statements
        self.connection = connection
        self.aconnection = aconnection
        self.writing = False  # whether the writes' explicit BEGIN (SQLite) was sent
        # Whether pybondi sent BEGIN itself, its psycopg connection in autocommit until
        # the transaction ends (see `sql.pipelining`).
        self.autocommitted = False
        self.closed = False

    def run(self, work: Callable[[SQLRecords], T]) -> T:
        """Call `work` with records on this transaction's connection."""
        if self.closed:
            raise _closed()
        if self.connection is None:
            raise SessionError(
                "This store is async: use the async path (`async with Session(...)`, "
                "`await repository.aget(id)`, `await transaction.arun(work)`)."
            )
        return self._work(self.connection, work)

    async def arun(self, work: Callable[[SQLRecords], T]) -> T:
        """Run `work` on the async connection, without blocking the event loop."""
        if self.closed:
            raise _closed()
        if self.aconnection is None:
            raise SessionError(
                "This store is sync: use the sync path (`with Session(...)`, "
                "`repository.get(id)`, `transaction.run(work)`)."
            )
        return await self.aconnection.run_sync(self._work, work)

    def commit_after(self, work: Callable[[SQLRecords], T]) -> T:
        """Run `work`, then COMMIT; on psycopg, its writes and COMMIT in one round trip."""
        result = self.run(partial(_committing, work))
        self.commit()  # psycopg: the connection is idle now, and this sends nothing
        return result

    async def acommit_after(self, work: Callable[[SQLRecords], T]) -> T:
        """`commit_after`, awaited."""
        result = await self.arun(partial(_committing, work))
        await self.acommit()
        return result

    def writing_connection(self) -> Connection:
        """The connection, in this transaction, ready for the application's own writes.

        Its writes begin here (SQLite: BEGIN IMMEDIATE, as pybondi's own do), so that
        what the application writes commits, or rolls back, with the unit of work.
        """
        if not self.writing or self.closed:  # a handler per event asks: begin once
            self.run(_begin_writes)
        assert self.connection is not None  # run() said otherwise
        return self.connection

    async def awriting_connection(self) -> AsyncConnection:
        """`writing_connection` of an async store: the `AsyncConnection`."""
        if not self.writing or self.closed:
            await self.arun(_begin_writes)
        assert self.aconnection is not None
        return self.aconnection

    def _work(self, connection: Connection, work: Callable[[SQLRecords], T]) -> T:
        # pybondi sends its statements on the driver's cursor (see SQLRecords), so tell
        # SQLAlchemy that a transaction is under way, or its commit() would do nothing.
        if not connection.in_transaction():
            if self.statements.begin_writes is not None:
                connection.execution_options(**_OWN_SQLITE_CONNECTION)
            connection.begin()
        records = SQLRecords(self.statements, connection, self)
        try:
            return work(records)
        finally:
            records.close()

    def commit(self) -> None:
        """COMMIT."""
        self.writing = False
        if self.connection is not None:
            self.connection.commit()
            self._leave_autocommit()

    def rollback(self) -> None:
        """ROLLBACK."""
        self.writing = False
        if self.connection is not None:
            self.connection.rollback()
            self._leave_autocommit()

    def close(self) -> None:
        """Give the connection back to the pool, rolling back what was not committed."""
        self.closed = True
        if self.connection is not None:
            try:
                self._leave_autocommit()
            finally:
                self.connection.close()

    def _leave_autocommit(self) -> None:
        connection = self.connection
        if self.autocommitted and connection is not None and not connection.invalidated:
            self.autocommitted = False
            try:
                assert self.statements.pipeline is not None  # psycopg's
                self.statements.pipeline.leave_autocommit(connection.connection.driver_connection)
            except BaseException:
                # Never back to the pool in autocommit, where others would not expect it.
                connection.invalidate()
                raise

    async def acommit(self) -> None:
        """COMMIT, awaited."""
        self.writing = False
        if self.aconnection is not None:
            await self.aconnection.commit()
            await self._aleave_autocommit()
        else:
            self.commit()

    async def arollback(self) -> None:
        """ROLLBACK, awaited."""
        self.writing = False
        if self.aconnection is not None:
            await self.aconnection.rollback()
            await self._aleave_autocommit()
        else:
            self.rollback()

    async def aclose(self) -> None:
        """`close`, awaited."""
        self.closed = True
        if self.aconnection is not None:
            try:
                await self._aleave_autocommit()
            finally:
                await self.aconnection.close()
        else:
            self.close()

    async def _aleave_autocommit(self) -> None:
        aconnection = self.aconnection
        if not self.autocommitted or aconnection is None or aconnection.invalidated:
            return
        self.autocommitted = False
        try:
            raw = await aconnection.get_raw_connection()
            assert self.statements.pipeline is not None  # psycopg's
            await self.statements.pipeline.aleave_autocommit(raw.driver_connection)
        except BaseException:
            await aconnection.invalidate()
            raise


def _closed() -> SessionError:
    return SessionError("This transaction is closed; begin a new one.")


def _begin_writes(records: SQLRecords) -> None:
    records.begin_writes()


def _committing(work: Callable[[SQLRecords], T], records: SQLRecords) -> T:
    return records.commit_after(work)
