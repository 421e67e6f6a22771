"""How a SQL store's transaction sends pybondi's statements: on the driver's cursor.

On psycopg, through its pipeline mode where that saves round trips (`sql.pipelining`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pybondi.persistence.sql.query import Query
from pybondi.persistence.sql.statements import Statements

if TYPE_CHECKING:
    from pybondi.persistence.sql.pipelining import Pipeline
    from pybondi.persistence.sql.transaction import SQLTransaction

__all__ = ["Executor"]

T = TypeVar("T")

# SQLAlchemy drops the row count of an INSERT unless asked to keep it.
_KEEP_ROWCOUNT = {"preserve_rowcount": True}


class Executor:
    """Runs one transaction's statements, compiled once per store.

    When nothing listens to the engine, they go straight to the DBAPI cursor of the
    SQLAlchemy connection: SQLAlchemy's per-execution work cost more than the round trip
    itself (see benchmarks/README.md). On psycopg, a transaction's first statement goes
    with its BEGIN, and a commit's writes with COMMIT, in pipeline mode (see
    `sql.pipelining`). Driver errors still reach you as SQLAlchemy's exceptions, and a
    broken connection is dropped from the pool. When something listens
    (cursor or error events, tracing tools, echo), they go through SQLAlchemy's own
    execution, so that the listeners get everything they expect. Either way SQLAlchemy
    owns the connection, the pool and the transaction.
    """

    __slots__ = ("_cursor", "connection", "observed", "pipeline", "statements", "transaction")

    def __init__(
        self, statements: Statements, connection: Connection, transaction: SQLTransaction
    ) -> None:
        self.statements = statements
        self.connection = connection
        self.transaction = transaction
        self._cursor: Any = None
        # Anyone watching this connection's statements (cursor or error events, tracing
        # tools, echo) gets them through SQLAlchemy's own execution, with its context;
        # and a commit listener, which expects to run before COMMIT, gets no pipeline.
        dispatch = connection.dispatch
        self.observed = bool(
            dispatch.before_cursor_execute
            or dispatch.after_cursor_execute
            or dispatch.commit
            or connection.dialect.dispatch.handle_error
            or connection.engine.echo
        )
        pipelined = statements.pipeline
        self.pipeline: Pipeline | None = (
            None if pipelined is None or self.observed else pipelined(connection, transaction)
        )

    def close(self) -> None:
        """Close the cursors, if any were opened."""
        if self._cursor is not None:
            self._cursor.close()
        if self.pipeline is not None:
            self.pipeline.close()

    @property
    def pipelined(self) -> bool:
        """Whether writes are sent ahead of COMMIT, unchecked (see `send`)."""
        return self.pipeline is not None and self.pipeline.committing

    def commit_after(self, work: Callable[[], T]) -> T:
        """Run `work`; on psycopg, send its writes in a pipeline that ends with COMMIT.

        Elsewhere only runs it: the transaction commits after, as usual.
        """
        if self.pipeline is None:
            return work()
        try:
            return self.pipeline.commit_after(work)
        except self.statements.driver_error as error:
            raise self._translated(error, "COMMIT", (), False) from error

    def settle(self) -> None:
        """Send what waits in the pipeline, if any, before a statement of SQLAlchemy's."""
        if self.pipeline is not None:
            try:
                self.pipeline.settle()
            except self.statements.driver_error as error:
                raise self._translated(error, "COMMIT", (), False) from error

    def rollback(self) -> None:
        """ROLLBACK on the driver, after a write in the pipeline aborted the transaction."""
        assert self.pipeline is not None  # only pipelined writes abort it unseen
        try:
            self.pipeline.rollback()
        except self.statements.driver_error as error:
            raise self._translated(error, "ROLLBACK", (), False) from error

    def send(self, query: Query, values: Mapping[str, Any]) -> None:
        """Send a write whose answer nobody reads: in a commit's pipeline, it waits there."""
        if self.pipelined:
            self._send(query, query.parameters(values), many=False, wait=False)
        else:
            self.execute(query, values)

    def execute(self, query: Query, values: Mapping[str, Any]) -> Any:
        """Send one statement; return the cursor (or SQLAlchemy's result)."""
        return self._send(query, query.parameters(values), many=False)

    def execute_many(self, query: Query, rows: list[dict[str, Any]], *, wait: bool = True) -> Any:
        """Send one statement for many rows (executemany); `wait=False`: see `send`."""
        wait = wait or not self.pipelined
        return self._send(query, [query.parameters(row) for row in rows], many=True, wait=wait)

    def _send(self, query: Query, parameters: Any, *, many: bool, wait: bool = True) -> Any:
        connection = self.connection
        if self.observed:
            return connection.exec_driver_sql(query.sql, parameters, _KEEP_ROWCOUNT)
        pipeline = self.pipeline
        try:
            if pipeline is not None and pipeline.wanted(many):
                if wait:
                    return pipeline.execute(query.sql, parameters, many=many)
                return pipeline.send(query.sql, parameters, many=many)
            if self._cursor is None:
                self._cursor = connection.connection.cursor()
            cursor = self._cursor
            if many:
                cursor.executemany(query.sql, parameters)
            else:
                cursor.execute(query.sql, parameters)
        except self.statements.driver_error as error:
            raise self._translated(error, query.sql, parameters, many) from error
        return cursor

    def _translated(
        self, error: Exception, sql: str, parameters: Any, many: bool
    ) -> sa.exc.StatementError:
        """The driver's error as SQLAlchemy would raise it, dropping a broken connection."""
        connection = self.connection
        dialect = connection.dialect
        broken = dialect.is_disconnect(error, connection.connection, self._cursor)  # type: ignore[arg-type]
        if broken:
            # As SQLAlchemy does: the server is likely gone for the pool's other idle
            # connections too.
            connection.invalidate(error)
            connection.engine.pool.dispose()
        return sa.exc.DBAPIError.instance(
            sql,
            parameters,
            error,
            self.statements.driver_error,
            hide_parameters=connection.engine.hide_parameters,
            connection_invalidated=broken,
            dialect=dialect,
            ismulti=many,
        )

    def written(self, query: Query, values: Mapping[str, Any]) -> bool:
        """Run an INSERT or a version-checked UPDATE; tell whether it wrote its row."""
        try:
            return bool(self.execute(query, values).rowcount == 1)
        except sa.exc.IntegrityError as error:
            if not self.statements.is_duplicate(error):
                raise
            return False

    def writing(self) -> None:
        """Begin the writes (SQLite: BEGIN IMMEDIATE, which waits for its one writer)."""
        if self.statements.begin_writes is not None and not self.transaction.writing:
            self.execute(self.statements.begin_writes, {})
        self.transaction.writing = True

    def timestamp(self, moment: datetime) -> Any:
        """A time as the driver takes it (naive UTC, or text on SQLite)."""
        return self.statements.timestamp_in(moment.astimezone(UTC).replace(tzinfo=None))
