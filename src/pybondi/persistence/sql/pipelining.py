"""Fewer round trips to PostgreSQL, with psycopg's pipeline mode (psycopg 3 only).

Without it, each statement waits for its answer, and so do BEGIN (which psycopg sends
on its own before a transaction's first statement) and COMMIT. In pipeline mode psycopg
sends statements without waiting, and reads their answers when asked
(https://www.psycopg.org/psycopg3/docs/advanced/pipeline.html). pybondi uses it twice:

- a transaction's first statement goes with its BEGIN: one round trip, not two;
- a commit sends the last writes with COMMIT (`SQLTransaction.commit_after`): one round
  trip, not one per write and one more. A statement whose answer is needed (a read, a
  row count) still waits for it, taking what the pipeline holds along.

A write sent ahead of COMMIT cannot be checked by its row count before COMMIT is on its
way: a write that must fail when it changes nothing (a version check) fails in the
server instead, which aborts the transaction, so that COMMIT commits nothing (see
`SQLRecords.write`).

psycopg, unless in autocommit, begins a transaction itself and waits for BEGIN, even in
pipeline mode. So the connection is put in autocommit while it is idle (which sends
nothing) and pybondi sends BEGIN itself: the transaction is an explicit one, and what
goes through SQLAlchemy on the connection meanwhile runs in it too. The connection
leaves autocommit when the transaction ends, before it goes back to the pool
(`Pipeline.leave_autocommit`).

Only while nothing listens to the engine: listeners get SQLAlchemy's own execution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import pq
from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

if TYPE_CHECKING:
    from pybondi.persistence.sql.transaction import SQLTransaction

__all__ = ["Pipeline"]

T = TypeVar("T")

_IDLE = pq.TransactionStatus.IDLE


class Pipeline:
    """psycopg's pipeline mode on one transaction's connection, for one run of its work.

    `execute` sends a statement and returns the cursor with its answer; `send` (in
    `commit_after`) sends one whose answer nobody reads, and goes on. The pipeline is
    open only while pybondi sends: SQLAlchemy's own statements never meet it.
    """

    __slots__ = (
        "_awaited",
        "_context",
        "_cursor",
        "_driver",
        "_open",
        "_rows",
        "committing",
        "transaction",
    )

    def __init__(self, connection: Connection, transaction: SQLTransaction) -> None:
        self._driver: Any = connection.connection.driver_connection  # psycopg's connection
        self._awaited = connection.dialect.is_async  # an AsyncConnection
        self.transaction = transaction
        self._cursor: Any = None
        self._rows: Any = None  # the cursor's answers, as the caller reads them
        self._context: Any = None  # psycopg's pipeline() context, while open
        self._open: Any = None  # psycopg's pipeline, while pybondi has one open
        self.committing = False  # inside commit_after

    def wanted(self, many: bool) -> bool:
        """Whether a statement goes through the pipeline: when committing, or the first."""
        return self.committing or (not many and self._idle())

    def execute(self, sql: str, parameters: Any, *, many: bool) -> Any:
        """Send a statement and wait for its answer (with what waits in the pipeline)."""
        if self._open is not None or self.committing:
            rows = self.send(sql, parameters, many=many)
            self._call(self._open.sync)
            return rows
        with self._pipeline():  # the transaction's first statement, after its BEGIN
            return self.send(sql, parameters, many=many)

    def send(self, sql: str, parameters: Any, *, many: bool) -> Any:
        """Send a statement, without waiting for its answer if a pipeline is open."""
        if self._open is None and self.committing:
            self._enter()
        cursor = self._cursor
        if many:
            self._call(cursor.executemany, sql, parameters)
        else:
            self._call(cursor.execute, sql, parameters)
        return self._rows

    def commit_after(self, work: Callable[[], T]) -> T:
        """Run `work`, whose writes wait in the pipeline, then send COMMIT with them.

        A pipeline opens at the first statement: with none, this sends nothing.
        """
        self.committing = True
        try:
            result = work()
            if self._open is not None:
                # COMMIT as a statement: psycopg's commit() would Sync, and so does
                # leaving the pipeline, a round trip each.
                self._call(self._cursor.execute, "COMMIT")
                self._exit(None)
            return result
        except BaseException as error:
            if self._open is not None:
                self._exit(error)
            raise
        finally:
            self.committing = False

    def settle(self) -> None:
        """Leave the pipeline, sending what waits in it, before SQLAlchemy's statements.

        SQLAlchemy reads a statement's answer as soon as it sent it, which a pipeline
        does not have yet.
        """
        if self._open is not None:
            self._exit(None)

    def rollback(self) -> None:
        """ROLLBACK, now."""
        self._call(self._driver.rollback)

    def close(self) -> None:
        """Close the cursor, if one was opened."""
        if self._cursor is not None:
            self._call(self._cursor.close)

    # The pipeline and its cursor ---------------------------------------------------------

    def _idle(self) -> bool:
        return bool(self._driver.info.transaction_status == _IDLE)

    @contextmanager
    def _pipeline(self) -> Iterator[None]:
        try:
            self._enter()  # its BEGIN fails on a connection an outage cut while idle
            yield
        except BaseException as error:
            # Left however far it got: psycopg logs a pipeline it collects still open.
            if self._open is not None:
                self._exit(error)
            raise
        self._exit(None)

    def _enter(self) -> None:
        """Open a pipeline; on an idle connection, send the transaction's BEGIN first."""
        begin = self._idle()
        if begin and not self._driver.autocommit:
            self._call(self._driver.set_autocommit, True)  # idle: this sends nothing
            self.transaction.autocommitted = True
        context = self._driver.pipeline()
        self._open = self._call(context.__aenter__ if self._awaited else context.__enter__)
        self._context = context
        if self._cursor is None:
            self._cursor = self._driver.cursor()
            self._rows = _Awaited(self._cursor) if self._awaited else self._cursor
        if begin:
            self._call(self._cursor.execute, "BEGIN")

    def _exit(self, error: BaseException | None) -> None:
        """Leave the pipeline: Sync, and the answers (the first error is raised)."""
        context, self._open, self._context = self._context, None, None
        exit = context.__aexit__ if self._awaited else context.__exit__
        if error is None:
            self._call(exit, None, None, None)
            return
        # `error` goes on up. Leaving may fail for the same reason (a connection lost
        # says so again), which psycopg, given `error`, would log as a warning: one for
        # each connection an outage cuts.
        with suppress(psycopg.Error):
            self._call(exit, None, None, None)

    def _call(self, method: Callable[..., Any], *arguments: Any) -> Any:
        """Call a psycopg method; an async connection's, awaited in SQLAlchemy's greenlet."""
        if self._awaited:
            return await_only(method(*arguments))
        return method(*arguments)

    @staticmethod
    def leave_autocommit(driver: Any) -> None:
        """Take the connection out of autocommit once pybondi's transaction ended on it.

        A transaction still open (a session closed without committing) is rolled back
        first, as the pool would.
        """
        if driver.closed:
            return
        if driver.info.transaction_status != _IDLE:
            driver.rollback()
        driver.autocommit = False

    @staticmethod
    async def aleave_autocommit(driver: Any) -> None:
        """`leave_autocommit` for psycopg's AsyncConnection."""
        if driver.closed:
            return
        if driver.info.transaction_status != _IDLE:
            await driver.rollback()
        await driver.set_autocommit(False)


class _Awaited:
    """An AsyncCursor's answers, read from sync code in SQLAlchemy's greenlet."""

    __slots__ = ("cursor",)

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    @property
    def rowcount(self) -> int:
        """The rows the statement changed."""
        return int(self.cursor.rowcount)

    def fetchone(self) -> Any:
        """The next row, or None."""
        return await_only(self.cursor.fetchone())

    def fetchall(self) -> list[Any]:
        """The rows left."""
        return list(await_only(self.cursor.fetchall()))
