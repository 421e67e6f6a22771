"""Reads and writes of a SQL store's transaction: pybondi's statements on the driver's cursor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pybondi.exceptions import ConcurrencyError
from pybondi.stores._sqlinbox import InboxRecords
from pybondi.stores._sqloutbox import OutboxRecords
from pybondi.stores._sqlstatements import STREAM_LENGTH, Query, Statements
from pybondi.stores.base import Record, Snapshot, StoredEvent, TableRecords

if TYPE_CHECKING:
    from pybondi.stores.sql import SQLTransaction

__all__ = ["SQLRecords"]

# SQLAlchemy drops the row count of an INSERT unless asked to keep it.
_KEEP_ROWCOUNT = {"preserve_rowcount": True}


class SQLRecords(TableRecords, OutboxRecords, InboxRecords):
    """Reads and writes in one transaction, with statements compiled once per store.

    When nothing listens to the engine, they go straight to the DBAPI cursor of the
    SQLAlchemy connection: SQLAlchemy's per-execution work cost more than the round trip
    itself (see benchmarks/README.md). Driver errors still reach you as SQLAlchemy's
    exceptions, and a broken connection is dropped from the pool. When something listens
    (cursor or error events, tracing tools, echo), they go through SQLAlchemy's own
    execution, so that the listeners get everything they expect. Either way SQLAlchemy
    owns the connection, the pool and the transaction.
    """

    __slots__ = ("_cursor", "connection", "observed", "statements", "transaction")

    def __init__(
        self, statements: Statements, connection: Connection, transaction: SQLTransaction
    ) -> None:
        self.statements = statements
        self.connection = connection
        self.transaction = transaction
        self._cursor: Any = None
        # Anyone watching this connection's statements (cursor or error events, tracing
        # tools, echo) gets them through SQLAlchemy's own execution, with its context.
        dispatch = connection.dispatch
        self.observed = bool(
            dispatch.before_cursor_execute
            or dispatch.after_cursor_execute
            or connection.dialect.dispatch.handle_error
            or connection.engine.echo
        )

    def close(self) -> None:
        """Close the cursor, if one was opened."""
        if self._cursor is not None:
            self._cursor.close()

    def _execute(self, query: Query, values: Mapping[str, Any]) -> Any:
        return self._send(query, query.parameters(values), many=False)

    def _execute_many(self, query: Query, rows: list[dict[str, Any]]) -> Any:
        return self._send(query, [query.parameters(row) for row in rows], many=True)

    def _send(self, query: Query, parameters: Any, *, many: bool) -> Any:
        connection = self.connection
        if self.observed:
            return connection.exec_driver_sql(query.sql, parameters, _KEEP_ROWCOUNT)
        if self._cursor is None:
            self._cursor = connection.connection.cursor()
        cursor = self._cursor
        try:
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

    def _written(self, query: Query, values: Mapping[str, Any]) -> bool:
        """Run an INSERT or a version-checked UPDATE; tell whether it wrote its row."""
        try:
            return bool(self._execute(query, values).rowcount == 1)
        except sa.exc.IntegrityError as error:
            if not self.statements.is_duplicate(error):
                raise
            return False

    def _writing(self) -> None:
        if self.statements.begin_writes is not None and not self.transaction.writing:
            self._execute(self.statements.begin_writes, {})
        self.transaction.writing = True

    def read(self, stream: str) -> Record | None:
        """SELECT the aggregate's row."""
        row = self._execute(self.statements.read, {"s": stream}).fetchone()
        return None if row is None else Record(stream, *row)

    def read_row(self, table: sa.Table, key: str, id: Any) -> Mapping[str, Any] | None:
        """SELECT a row of the application's own table."""
        statement = self.statements.for_table(table, key, "").read
        row = self.connection.execute(statement, {"id": id}).mappings().first()
        return None if row is None else dict(row)

    def write_row(
        self,
        table: sa.Table,
        values: Mapping[str, Any],
        key: str,
        *,
        version_column: str,
        version: int,
        expected: int,
    ) -> None:
        """INSERT or version-checked UPDATE of a row of the application's own table."""
        self._writing()
        statements = self.statements.for_table(table, key, version_column)
        row = {**values, version_column: version}
        duplicate: sa.exc.IntegrityError | None = None
        try:
            if expected == 0:
                written = self.connection.execute(statements.insert, row).rowcount
            else:
                where = {"pybondi_id": values[key], "pybondi_expected": expected}
                written = self.connection.execute(statements.update, {**row, **where}).rowcount
        except sa.exc.IntegrityError as error:
            if not self.statements.is_duplicate(error):
                raise
            written, duplicate = 0, error
        if written != 1:
            actual = self.connection.execute(statements.version, {"id": values[key]}).scalar()
            if duplicate is not None and actual is None:
                raise duplicate  # another unique column, not the id: not a version conflict
            raise ConcurrencyError(f"{table.name} {values[key]!r}", expected, actual)

    def write(self, record: Record, expected: int) -> None:
        """INSERT a new row, or UPDATE the row still at `expected`; else ConcurrencyError."""
        statements, stream = self.statements, record.stream
        if len(stream) > STREAM_LENGTH:
            raise ValueError(
                f"Stream names are at most {STREAM_LENGTH} characters; {stream[:40]!r}... has "
                f"{len(stream)}. Use a shorter aggregate id or registered name."
            )
        self._writing()
        values = {
            "s": stream,
            "v": record.version,
            "t": record.schema,
            "d": record.data,
            "e": expected,
        }
        if self._written(statements.insert if expected == 0 else statements.update, values):
            return
        # A current (locking) read: under REPEATABLE READ a plain SELECT would show the
        # version this transaction started from, not the one that beat it.
        row = self._execute(statements.current_version, {"s": stream}).fetchone()
        raise ConcurrencyError(stream, expected, None if row is None else row[0])

    def append(self, events: Sequence[StoredEvent]) -> None:
        """Take the next positions from the log row (locking it until commit), then INSERT."""
        if not events:
            return
        self._writing()
        statements = self.statements
        first = self._advance(len(events)) - len(events) + 1
        timestamp = statements.timestamp_in
        rows = [
            {
                "position": first + offset,
                "stream": event.stream,
                "version": event.version,
                "type": event.type,
                "type_version": event.schema,
                "data": event.data,
                "recorded_at": timestamp(event.recorded_at.astimezone(UTC).replace(tzinfo=None)),
            }
            for offset, event in enumerate(events)
        ]
        if len(rows) == 1:
            self._execute(statements.append, rows[0])
        else:
            self._execute_many(statements.append, rows)

    def _advance(self, count: int) -> int:
        """Move the log's head by `count` positions, locking it; return the last one taken."""
        statements = self.statements
        if statements.lock_head is None:
            return int(self._execute(statements.advance_head, {"n": count}).fetchone()[0])
        last = int(self._execute(statements.lock_head, {}).fetchone()[0]) + count
        self._execute(statements.move_head, {"p": last})
        return last

    def read_stream(self, stream: str, after: int = 0) -> list[StoredEvent]:
        """SELECT the stream's events after a version."""
        rows = self._execute(self.statements.read_stream, {"s": stream, "a": after}).fetchall()
        return self._stored_events(rows)

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """SELECT the log after a position."""
        rows = self._execute(self.statements.read_log, {"a": after, "l": limit}).fetchall()
        return self._stored_events(rows)

    def _stored_events(self, rows: list[tuple[Any, ...]]) -> list[StoredEvent]:
        timestamp = self.statements.timestamp_out
        return [
            StoredEvent(stream, version, type, schema, data, position, timestamp(at))
            for position, stream, version, type, schema, data, at in rows
        ]

    def read_snapshot(self, stream: str) -> Snapshot | None:
        """SELECT the stream's snapshot."""
        row = self._execute(self.statements.read_snapshot, {"s": stream}).fetchone()
        return None if row is None else Snapshot(stream, *row)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """INSERT or replace the stream's snapshot."""
        self._writing()
        values = {
            "stream": snapshot.stream,
            "version": snapshot.version,
            "type_version": snapshot.schema,
            "data": snapshot.data,
        }
        self._execute(self.statements.write_snapshot, values)
