"""A SQL store's tables, and its statements compiled once for one dialect."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pybondi.persistence.sql.deadletters import DeadLetterStatements
from pybondi.persistence.sql.inbox import InboxStatements
from pybondi.persistence.sql.outbox import OutboxStatements
from pybondi.persistence.sql.projections import ProjectionStatements
from pybondi.persistence.sql.query import (
    NAME,
    POSITION,
    TEXT,
    TIMESTAMP,
    Query,
    insert_ignoring_duplicates,
    is_duplicate,
    unchanged,
    upsert,
)

if TYPE_CHECKING:
    from pybondi.persistence.sql.pipelining import Pipeline

__all__ = ["Statements", "TableStatements"]


def _last_position(events: sa.Table) -> Any:
    """The position of the log's last event; 0 for an empty log."""
    return sa.func.coalesce(sa.func.max(events.c.position), sa.literal_column("0"))


def _taking_next_position(events: sa.Table) -> Any:
    """An INSERT of an event at the log's next position, max(position) + 1.

    Only where one transaction at a time writes (SQLite): see `Statements.one_writer`.
    """
    values = [column for column in events.c if column is not events.c.position]
    following = _last_position(events) + sa.literal_column("1")
    parameters = (sa.bindparam(column.name, type_=column.type) for column in values)
    return events.insert().from_select(
        [events.c.position, *values], sa.select(following, *parameters)
    )


class TableStatements:
    """The statements on one application table, built once."""

    def __init__(self, table: sa.Table, key: str, version: str, dialect: sa.Dialect) -> None:
        id_column = table.c[key]
        self.read = sa.select(table).where(id_column == sa.bindparam("id"))
        if not version:
            return
        version_column = table.c[version]
        self.version = (
            sa.select(version_column)
            .where(id_column == sa.bindparam("id"))
            .with_for_update(read=True)
        )
        self.insert = insert_ignoring_duplicates(dialect, table).execution_options(
            preserve_rowcount=True
        )
        self.update = table.update().where(
            id_column == sa.bindparam("pybondi_id"),
            version_column == sa.bindparam("pybondi_expected"),
        )


class Statements:
    """The tables and every statement on them, built once for one dialect.

    The outbox's are in `outbox` (see `sql.outbox`), the inbox's in `inbox` (`sql.inbox`),
    the dead letters' in `dead_letters` (`sql.deadletters`), the projections' checkpoints'
    in `projections` (`sql.projections`).
    """

    def __init__(self, metadata: sa.MetaData, prefix: str, dialect: sa.Dialect) -> None:
        text, timestamp, stream = TEXT, TIMESTAMP, NAME
        self.aggregates = aggregates = sa.Table(
            f"{prefix}aggregates",
            metadata,
            sa.Column("stream", stream, primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("type_version", sa.Integer, nullable=False),
            sa.Column("data", text),
        )
        self.events = events = sa.Table(
            f"{prefix}events",
            metadata,
            sa.Column("position", POSITION, primary_key=True, autoincrement=False),
            sa.Column("stream", stream, nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("type", stream, nullable=False),
            sa.Column("type_version", sa.Integer, nullable=False),
            sa.Column("data", text, nullable=False),
            sa.Column("recorded_at", timestamp, nullable=False),
            sa.UniqueConstraint("stream", "version", name=f"{prefix}events_stream_version"),
        )
        self.log = sa.Table(
            f"{prefix}log",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("position", sa.BigInteger, nullable=False),
        )
        self.snapshots = snapshots = sa.Table(
            f"{prefix}snapshots",
            metadata,
            sa.Column("stream", stream, primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("type_version", sa.Integer, nullable=False),
            sa.Column("data", text, nullable=False),
        )
        self.dialect = dialect
        # SQLite has one writer at a time, from BEGIN IMMEDIATE to COMMIT. There an
        # event's INSERT takes the log's next position itself, max(position) + 1, which
        # no other transaction can take before this one ends (and gives back if it rolls
        # back); and the events' unique (stream, version) checks the version of an
        # event-sourced stream, which then needs no row in `aggregates` (see
        # `SQLRecords.append`): one statement per save for each. PostgreSQL and MariaDB
        # write concurrently: a save locks the log's head row until COMMIT, and takes
        # each aggregate's row to check its version before the head's lock.
        self.one_writer = dialect.name == "sqlite"
        self.driver_error: type[Exception] = dialect.loaded_dbapi.Error
        self.begin_writes = (
            Query(sa.text("BEGIN IMMEDIATE"), dialect) if dialect.name == "sqlite" else None
        )
        # What the driver takes and gives for a timestamp: SQLAlchemy's own conversions
        # (SQLite keeps timestamps as text), applied by hand since pybondi bypasses them.
        stored_at = events.c.recorded_at.type.dialect_impl(dialect)
        self.timestamp_in: Callable[[datetime], Any] = (
            stored_at.bind_processor(dialect) or unchanged
        )
        to_datetime: Callable[[Any], Any] = stored_at.result_processor(dialect, None) or unchanged
        self.timestamp_out: Callable[[Any], datetime] = lambda value: to_datetime(value).replace(
            tzinfo=UTC
        )

        def compiled(statement: Any) -> Query:
            return Query(statement, dialect)

        param = sa.bindparam
        stream_is = aggregates.c.stream == param("s")
        self.read = compiled(
            sa.select(aggregates.c.version, aggregates.c.type_version, aggregates.c.data).where(
                stream_is
            )
        )
        self.current_version = compiled(
            sa.select(aggregates.c.version).where(stream_is).with_for_update(read=True)
        )
        self.insert = compiled(
            insert_ignoring_duplicates(dialect, aggregates).values(
                stream=param("s"), version=param("v"), type_version=param("t"), data=param("d")
            )
        )
        self.update = compiled(
            aggregates.update()
            .where(stream_is, aggregates.c.version == param("e"))
            .values(version=param("v"), type_version=param("t"), data=param("d"))
        )
        # A commit's writes sent ahead of COMMIT in psycopg's pipeline (`sql.pipelining`)
        # fail in the server when they change nothing: the row exists already (a plain
        # INSERT), or is no longer at the version read (1 / count(*) of the rows updated).
        self.pipeline: type[Pipeline] | None = None
        if dialect.name == "postgresql" and dialect.driver == "psycopg":
            from pybondi.persistence.sql.pipelining import Pipeline  # noqa: PLC0415 - psycopg

            self.pipeline = Pipeline
            self.checked_insert = compiled(
                aggregates.insert().values(
                    stream=param("s"), version=param("v"), type_version=param("t"), data=param("d")
                )
            )
            updated = (
                aggregates.update()
                .where(stream_is, aggregates.c.version == param("e"))
                .values(version=param("v"), type_version=param("t"), data=param("d"))
                .returning(aggregates.c.version)
                .cte("pybondi_updated")
            )
            self.checked_update = compiled(
                sa.select(sa.literal_column("1") / sa.func.count()).select_from(updated)
            )
        self.append = compiled(
            _taking_next_position(events) if self.one_writer else events.insert()
        )
        self.stream_version = compiled(
            sa.select(sa.func.max(events.c.version)).where(events.c.stream == param("s"))
        )
        self.read_stream = compiled(
            sa.select(events)
            .where(events.c.stream == param("s"), events.c.version > param("a"))
            .order_by(events.c.version)
        )
        self.read_log = compiled(
            sa.select(events)
            .where(events.c.position > param("a"))
            .order_by(events.c.position)
            .limit(param("l"))
        )
        self.read_snapshot = compiled(
            sa.select(snapshots.c.version, snapshots.c.type_version, snapshots.c.data).where(
                snapshots.c.stream == param("s")
            )
        )
        self.write_snapshot = compiled(
            upsert(dialect, snapshots, ["version", "type_version", "data"])
        )
        # The log's head moves in one statement where UPDATE..RETURNING exists; MariaDB
        # locks the row with SELECT..FOR UPDATE first, then moves it.
        log, head = self.log, self.log.c.id == 1
        self.advance_head = compiled(
            log.update()
            .where(head)
            .values(position=log.c.position + param("n"))
            .returning(log.c.position)
        )
        self.lock_head: Query | None = None
        if not dialect.update_returning:
            self.lock_head = compiled(sa.select(log.c.position).where(head).with_for_update())
            self.move_head = compiled(log.update().where(head).values(position=param("p")))
        self.tables: dict[tuple[sa.Table, str, str], TableStatements] = {}
        self.ping = compiled(sa.select(sa.literal(1)))
        self.outbox = OutboxStatements(dialect, metadata, prefix)
        self.inbox = InboxStatements(dialect, metadata, prefix)
        self.dead_letters = DeadLetterStatements(dialect, metadata, prefix)
        # The log's head, as projections read it: its row, or (one writer) its last event.
        log_head = sa.select(log.c.position).where(head)
        if self.one_writer:
            log_head = sa.select(_last_position(events))
        self.projections = ProjectionStatements(dialect, metadata, prefix, log_head)

    def for_table(self, table: sa.Table, key: str, version: str) -> TableStatements:
        """The statements on an application table, built at first use."""
        found = self.tables.get((table, key, version))
        if found is None:
            found = self.tables[table, key, version] = TableStatements(
                table, key, version, self.dialect
            )
        return found

    def is_duplicate(self, error: sa.exc.IntegrityError) -> bool:
        """Whether an INSERT failed only because its row exists; see `query.is_duplicate`."""
        return is_duplicate(self.dialect, error)

    def create(self, connection: Connection) -> None:
        """Create what is missing, and the log's one row, even with others doing the same."""
        for table in self.aggregates.metadata.sorted_tables:
            connection.execute(sa.schema.CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(sa.schema.CreateIndex(index, if_not_exists=True))
        if connection.execute(sa.select(self.log.c.id)).first() is None:
            try:
                connection.execute(
                    insert_ignoring_duplicates(self.dialect, self.log).values(id=1, position=0)
                )
            except sa.exc.IntegrityError as error:
                if not self.is_duplicate(error):
                    raise
