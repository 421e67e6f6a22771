"""A SQL store's transaction: the reads and writes of aggregates, and of messaging."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pybondi.exceptions import ConcurrencyError
from pybondi.persistence.records import (
    MessagingRecords,
    Record,
    Snapshot,
    StoredEvent,
    TableRecords,
)
from pybondi.persistence.sql.deadletters import SQLDeadLetters
from pybondi.persistence.sql.executor import Executor
from pybondi.persistence.sql.inbox import SQLInbox
from pybondi.persistence.sql.outbox import SQLOutbox
from pybondi.persistence.sql.projections import SQLProjections
from pybondi.persistence.sql.query import STREAM_LENGTH
from pybondi.persistence.sql.statements import Statements

if TYPE_CHECKING:
    from pybondi.persistence.sql.transaction import SQLTransaction

__all__ = ["SQLRecords"]

T = TypeVar("T")


class SQLRecords(MessagingRecords, TableRecords):
    """Reads and writes in one transaction, with statements compiled once per store.

    Statements go through an `Executor` (see `sql.executor`: straight to the driver's
    cursor when nothing listens to the engine). The outbox's, inbox's and dead letters'
    reads and writes, and the projections' checkpoints, are parts of their own, made when
    first used.
    """

    def __init__(
        self, statements: Statements, connection: Connection, transaction: SQLTransaction
    ) -> None:
        self._statements = statements
        self._connection = connection
        self._executor = Executor(statements, connection, transaction)
        self.checks_stream_versions = statements.one_writer  # see `append`
        # The version-checked writes sent ahead of COMMIT: (stream, version expected).
        self._checked: list[tuple[str, int]] = []

    def close(self) -> None:
        """Close the cursor, if one was opened."""
        self._executor.close()

    @cached_property
    def outbox(self) -> SQLOutbox:
        """The outbox's reads and writes, in this transaction."""
        return SQLOutbox(self._executor)

    @cached_property
    def inbox(self) -> SQLInbox:
        """The inbox's reads and writes, in this transaction."""
        return SQLInbox(self._executor)

    @cached_property
    def dead_letters(self) -> SQLDeadLetters:
        """The dead letters' reads and writes, in this transaction."""
        return SQLDeadLetters(self._executor, self.inbox, self.outbox)

    @cached_property
    def projections(self) -> SQLProjections:
        """The projections' checkpoints and leases, in this transaction."""
        return SQLProjections(self._executor)

    def commit_after(self, work: Callable[[SQLRecords], T]) -> T:
        """Run `work`; on psycopg, send its writes with COMMIT, in one round trip.

        A version check that failed there aborted the transaction: it is a
        `ConcurrencyError`, as when the writes are checked one by one.
        """
        self._checked.clear()
        try:
            return self._executor.commit_after(lambda: work(self))
        except (sa.exc.IntegrityError, sa.exc.DataError) as error:
            # A row that exists already, or 1 / count(*) of no row updated.
            conflict = self._checked and self._conflict()
            if conflict:
                raise conflict from error
            raise

    def _conflict(self) -> ConcurrencyError | None:
        """The version check that failed in the pipeline, read again after a rollback."""
        self._executor.rollback()
        for stream, expected in self._checked:
            row = self._executor.execute(self._statements.current_version, {"s": stream})
            actual = (row.fetchone() or (None,))[0]
            if actual != (expected or None):
                return ConcurrencyError(stream, expected, actual)
        return None

    def begin_writes(self) -> None:
        """Begin this transaction's writes now (SQLite: BEGIN IMMEDIATE), if not yet."""
        self._executor.writing()

    def ping(self) -> None:
        """SELECT 1: it returns once the database answers."""
        self._executor.execute(self._statements.ping, {}).fetchone()

    def read(self, stream: str) -> Record | None:
        """SELECT the aggregate's row."""
        row = self._executor.execute(self._statements.read, {"s": stream}).fetchone()
        return None if row is None else Record(stream, *row)

    def read_row(self, table: sa.Table, key: str, id: Any) -> Mapping[str, Any] | None:
        """SELECT a row of the application's own table."""
        statement = self._statements.for_table(table, key, "").read
        self._executor.settle()
        row = self._connection.execute(statement, {"id": id}).mappings().first()
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
        self._executor.writing()
        self._executor.settle()
        statements = self._statements.for_table(table, key, version_column)
        row = {**values, version_column: version}
        duplicate: sa.exc.IntegrityError | None = None
        try:
            if expected == 0:
                written = self._connection.execute(statements.insert, row).rowcount
            else:
                where = {"pybondi_id": values[key], "pybondi_expected": expected}
                written = self._connection.execute(statements.update, {**row, **where}).rowcount
        except sa.exc.IntegrityError as error:
            if not self._statements.is_duplicate(error):
                raise
            written, duplicate = 0, error
        if written != 1:
            actual = self._connection.execute(statements.version, {"id": values[key]}).scalar()
            if duplicate is not None and actual is None:
                raise duplicate  # another unique column, not the id: not a version conflict
            raise ConcurrencyError(f"{table.name} {values[key]!r}", expected, actual)

    def write(self, record: Record, expected: int) -> None:
        """INSERT a new row, or UPDATE the row still at `expected`; else ConcurrencyError."""
        statements, stream = self._statements, record.stream
        if len(stream) > STREAM_LENGTH:
            raise ValueError(
                f"Stream names are at most {STREAM_LENGTH} characters; {stream[:40]!r}... has "
                f"{len(stream)}. Use a shorter aggregate id or registered name."
            )
        self._executor.writing()
        values = {
            "s": stream,
            "v": record.version,
            "t": record.schema,
            "d": record.data,
            "e": expected,
        }
        if self._executor.pipelined:  # checked in the server: see `sql.pipelining`
            checked = statements.checked_insert if expected == 0 else statements.checked_update
            self._executor.send(checked, values)
            self._checked.append((stream, expected))
            return
        if self._executor.written(
            statements.insert if expected == 0 else statements.update, values
        ):
            return
        # A current (locking) read: under REPEATABLE READ a plain SELECT would show the
        # version this transaction started from, not the one that beat it.
        row = self._executor.execute(statements.current_version, {"s": stream}).fetchone()
        raise ConcurrencyError(stream, expected, None if row is None else row[0])

    def append(self, events: Sequence[StoredEvent]) -> None:
        """INSERT the events at the log's next positions, in commit order, without gaps.

        PostgreSQL and MariaDB take the positions from the log's row, locking it until
        COMMIT. On SQLite, whose one writer is this transaction until COMMIT, each INSERT
        takes the next position itself, and an event at a version its stream has is a
        `ConcurrencyError` (see `Records.checks_stream_versions`).
        """
        if not events:
            return
        self._executor.writing()
        statements = self._statements
        timestamp = statements.timestamp_in
        rows = [
            {
                "stream": event.stream,
                "version": event.version,
                "type": event.type,
                "type_version": event.schema,
                "data": event.data,
                "recorded_at": timestamp(event.recorded_at.astimezone(UTC).replace(tzinfo=None)),
            }
            for event in events
        ]
        if statements.one_writer:
            for row in rows:  # one by one, to know which stream a conflict is on
                self._append_checked(row)
            return
        first = self._advance(len(rows)) - len(rows) + 1
        for offset, row in enumerate(rows):
            row["position"] = first + offset
        if len(rows) == 1:
            self._executor.send(statements.append, rows[0])
        else:
            self._executor.execute_many(statements.append, rows, wait=False)

    def _append_checked(self, row: dict[str, Any]) -> None:
        """INSERT one event; its (stream, version) taken already is a `ConcurrencyError`."""
        try:
            self._executor.execute(self._statements.append, row)
        except sa.exc.IntegrityError as error:
            # SQLite undid this INSERT alone. Another session's events, committed since
            # this one read the stream, have the version: or another constraint failed.
            stream, version = row["stream"], row["version"]
            last = self._executor.execute(self._statements.stream_version, {"s": stream})
            actual = last.fetchone()[0]
            if actual is None or actual < version:
                raise
            raise ConcurrencyError(stream, version - 1, actual) from error

    def _advance(self, count: int) -> int:
        """Move the log's head by `count` positions, locking it; return the last one taken."""
        statements = self._statements
        if statements.lock_head is None:
            return int(self._executor.execute(statements.advance_head, {"n": count}).fetchone()[0])
        last = int(self._executor.execute(statements.lock_head, {}).fetchone()[0]) + count
        self._executor.execute(statements.move_head, {"p": last})
        return last

    def read_stream(self, stream: str, after: int = 0) -> list[StoredEvent]:
        """SELECT the stream's events after a version."""
        rows = self._executor.execute(
            self._statements.read_stream, {"s": stream, "a": after}
        ).fetchall()
        return self._stored_events(rows)

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """SELECT the log after a position."""
        rows = self._executor.execute(
            self._statements.read_log, {"a": after, "l": limit}
        ).fetchall()
        return self._stored_events(rows)

    def _stored_events(self, rows: list[tuple[Any, ...]]) -> list[StoredEvent]:
        timestamp = self._statements.timestamp_out
        return [
            StoredEvent(stream, version, type, schema, data, position, timestamp(at))
            for position, stream, version, type, schema, data, at in rows
        ]

    def read_snapshot(self, stream: str) -> Snapshot | None:
        """SELECT the stream's snapshot."""
        row = self._executor.execute(self._statements.read_snapshot, {"s": stream}).fetchone()
        return None if row is None else Snapshot(stream, *row)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """INSERT or replace the stream's snapshot."""
        self._executor.writing()
        values = {
            "stream": snapshot.stream,
            "version": snapshot.version,
            "type_version": snapshot.schema,
            "data": snapshot.data,
        }
        self._executor.send(self._statements.write_snapshot, values)
