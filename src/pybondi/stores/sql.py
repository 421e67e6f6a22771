"""SQL stores on SQLAlchemy 2: SQLite embedded, PostgreSQL and MariaDB for production.

    store = SQLStore("sqlite:///bank.db")                       # sync engine
    store = SQLStore("postgresql://localhost/bank", asynchronous=True)
    store.create_tables()                                        # or await store.acreate_tables()

URLs without a driver get pybondi's: psycopg for PostgreSQL, PyMySQL (sync) or aiomysql
(async) for MariaDB and MySQL, aiosqlite for async SQLite. An `Engine` or `AsyncEngine`
you built yourself works too.

Four tables, named with `prefix` (and in `schema`, if given): `aggregates` (one row per
aggregate: its version, and its state if it is state-stored), `events`, `log` (one row:
the last position handed out) and `snapshots`. A version check guards every write to an
aggregate's row, so a stale write changes nothing. Appending events takes the log row's
lock until commit: positions are handed out in commit order and a rolled-back
transaction gives its positions back, so that committed events have no gaps and a reader
that follows the log from a checkpoint misses none.

Every read and write is a sync function of a `Connection`; an async store runs it on its
`AsyncConnection` with `run_sync` (SQLAlchemy's greenlet bridge), so the SQL is written once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from pybondi.exceptions import ConcurrencyError, MissingDependency, SessionError
from pybondi.stores.base import (
    Record,
    Records,
    Snapshot,
    Store,
    StoredEvent,
    TableRecords,
    Transaction,
)

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql, postgresql, sqlite
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("sqlalchemy", "sqlite", "pybondi.stores.sql") from missing

__all__ = ["SQLStore", "SQLTransaction"]

T = TypeVar("T")

# Which driver a URL without one gets, sync and async, and which extra installs it.
_DRIVERS = {
    "sqlite": ("pysqlite", "aiosqlite"),
    "postgresql": ("psycopg", "psycopg"),
    "mysql": ("pymysql", "aiomysql"),
    "mariadb": ("pymysql", "aiomysql"),
}
# The extra that installs each driver pybondi chooses; other drivers are yours to install.
_EXTRAS = {
    "aiosqlite": "sqlite",
    "psycopg": "postgres",
    "pymysql": "mariadb",
    "aiomysql": "mariadb",
}
_BACKEND_EXTRAS = {
    "sqlite": "sqlite",
    "postgresql": "postgres",
    "mysql": "mariadb",
    "mariadb": "mariadb",
}
_STREAM_LENGTH = 255
_CREATE_ATTEMPTS = 3
# Marks a SQLite connection whose transaction pybondi begins itself (see below).
_OWN_SQLITE_CONNECTION = {"pybondi_reads_outside": True}
# SQLAlchemy drops the row count of an INSERT unless asked to keep it.
_KEEP_ROWCOUNT = {"preserve_rowcount": True}


class SQLStore(Store):
    """A store in a SQL database, through a SQLAlchemy engine.

    Args:
        engine: a database URL, or an `Engine` / `AsyncEngine`.
        asynchronous: for a URL, build an async engine (for `async with Session(...)`).
        schema: the database schema (PostgreSQL) or database (MariaDB) of the tables.
        prefix: the tables' name prefix.
        engine_options: passed to `create_engine` / `create_async_engine` with a URL.
    """

    def __init__(
        self,
        engine: str | sa.URL | Engine | AsyncEngine,
        *,
        asynchronous: bool = False,
        schema: str | None = None,
        prefix: str = "pybondi_",
        **engine_options: Any,
    ) -> None:
        made = isinstance(engine, str | sa.URL)
        if isinstance(engine, str | sa.URL):
            engine = _create_engine(sa.make_url(engine), asynchronous, engine_options)
        assert isinstance(engine, Engine | AsyncEngine)
        self.engine: Engine | AsyncEngine = engine
        self.is_async = isinstance(engine, AsyncEngine)
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if sync_engine.dialect.name == "sqlite":
            if not made:
                # Taking over its transactions would change the engine for its other users.
                raise ValueError(
                    f"SQLStore manages SQLite transactions itself, which would change how "
                    f"your engine {sync_engine.url} behaves elsewhere: pass its URL instead "
                    f"(and engine options as keywords), as in SQLStore('{sync_engine.url}')."
                )
            _take_over_sqlite_transactions(sync_engine)
        if not made:
            _check_engine(sync_engine)
        self.metadata = sa.MetaData(schema=schema)
        self.statements = _Statements(self.metadata, prefix, sync_engine.dialect)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"<SQLStore {url}{' async' if self.is_async else ''}>"

    # Transactions -----------------------------------------------------------------------

    def begin(self) -> SQLTransaction:
        """Open a transaction on a connection from the engine's pool."""
        if isinstance(self.engine, AsyncEngine):
            raise SessionError(
                f"{self!r} is async: use it with `async with Session(...)`, or create a "
                f"sync store for sync sessions."
            )
        return SQLTransaction(self.statements, self.engine.connect(), None)

    async def abegin(self) -> SQLTransaction:
        """Open a transaction on an async connection."""
        if not isinstance(self.engine, AsyncEngine):
            raise SessionError(
                f"{self!r} is sync, and would block the event loop: for async sessions, "
                f"create the store with SQLStore(url, asynchronous=True)."
            )
        return SQLTransaction(self.statements, None, await self.engine.connect())

    # Tables -----------------------------------------------------------------------------

    def create_tables(self) -> None:
        """Create the tables that do not exist yet, and the log's row.

        Workers that start together may all call it: tables are created IF NOT EXISTS,
        and an attempt that still collides with another worker's is tried again.
        """
        if isinstance(self.engine, AsyncEngine):
            raise SessionError(f"{self!r} is async: use `await store.acreate_tables()`.")
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    self.statements.create(connection)
                return
            except sa.exc.DBAPIError:
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise

    async def acreate_tables(self) -> None:
        """`create_tables` for async stores."""
        if not isinstance(self.engine, AsyncEngine):
            raise SessionError(f"{self!r} is sync: use `store.create_tables()`.")
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                async with self.engine.begin() as connection:
                    await connection.run_sync(self.statements.create)
                return
            except sa.exc.DBAPIError:
                if attempt == _CREATE_ATTEMPTS - 1:
                    raise

    def drop_tables(self) -> None:
        """Drop the tables, and everything in them."""
        if isinstance(self.engine, AsyncEngine):
            raise SessionError(f"{self!r} is async: use `await store.adrop_tables()`.")
        with self.engine.begin() as connection:
            self.metadata.drop_all(connection)

    async def adrop_tables(self) -> None:
        """`drop_tables` for async stores."""
        if not isinstance(self.engine, AsyncEngine):
            self.drop_tables()
            return
        async with self.engine.begin() as connection:
            await connection.run_sync(self.metadata.drop_all)

    def dispose(self) -> None:
        """Close the engine's pooled connections."""
        if isinstance(self.engine, AsyncEngine):
            self.engine.sync_engine.dispose()
        else:
            self.engine.dispose()

    async def adispose(self) -> None:
        """`dispose` for async stores."""
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        else:
            self.engine.dispose()


class SQLTransaction(Transaction):
    """A unit of work on one pooled connection, sync or async."""

    def __init__(
        self,
        statements: _Statements,
        connection: Connection | None,
        aconnection: AsyncConnection | None,
    ) -> None:
        self.statements = statements
        self.connection = connection
        self.aconnection = aconnection
        self.writing = False  # whether the writes' explicit BEGIN (SQLite) was sent

    def run(self, work: Callable[[Records], T]) -> T:
        """Call `work` with records on this transaction's connection."""
        if self.connection is None:
            raise SessionError(
                "This store is async: use the async path (`async with Session(...)`, "
                "`await repository.aget(id)`, `await transaction.arun(work)`)."
            )
        return self._work(self.connection, work)

    async def arun(self, work: Callable[[Records], T]) -> T:
        """Run `work` on the async connection, without blocking the event loop."""
        if self.aconnection is None:
            raise SessionError(
                "This store is sync: use the sync path (`with Session(...)`, "
                "`repository.get(id)`, `transaction.run(work)`)."
            )
        return await self.aconnection.run_sync(self._work, work)

    def _work(self, connection: Connection, work: Callable[[Records], T]) -> T:
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

    def rollback(self) -> None:
        """ROLLBACK."""
        self.writing = False
        if self.connection is not None:
            self.connection.rollback()

    def close(self) -> None:
        """Give the connection back to the pool, rolling back what was not committed."""
        if self.connection is not None:
            self.connection.close()

    async def acommit(self) -> None:
        """COMMIT, awaited."""
        self.writing = False
        if self.aconnection is not None:
            await self.aconnection.commit()
        else:
            self.commit()

    async def arollback(self) -> None:
        """ROLLBACK, awaited."""
        self.writing = False
        if self.aconnection is not None:
            await self.aconnection.rollback()
        else:
            self.rollback()

    async def aclose(self) -> None:
        """`close`, awaited."""
        if self.aconnection is not None:
            await self.aconnection.close()
        else:
            self.close()


class SQLRecords(TableRecords):
    """Reads and writes in one transaction, on the driver's cursor.

    pybondi's own statements are compiled once per store and sent on the DBAPI cursor of
    the SQLAlchemy connection: SQLAlchemy's per-execution work cost more than the round
    trip itself (see benchmarks/README.md). SQLAlchemy still owns the connection, the pool
    and the transaction, its `before_cursor_execute` and `after_cursor_execute` events see
    every statement (tracing tools rely on them), and driver errors reach you as
    SQLAlchemy's exceptions, with broken connections invalidated.
    """

    __slots__ = ("_cursor", "connection", "observed", "statements", "transaction")

    def __init__(
        self, statements: _Statements, connection: Connection, transaction: SQLTransaction
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

    def _execute(self, query: _Query, values: Mapping[str, Any]) -> Any:
        return self._send(query, query.parameters(values), many=False)

    def _execute_many(self, query: _Query, rows: list[dict[str, Any]]) -> Any:
        return self._send(query, [query.parameters(row) for row in rows], many=True)

    def _send(self, query: _Query, parameters: Any, *, many: bool) -> Any:
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

    def _written(self, query: _Query, values: Mapping[str, Any]) -> bool:
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
        if len(stream) > _STREAM_LENGTH:
            raise ValueError(
                f"Stream names are at most {_STREAM_LENGTH} characters; {stream[:40]!r}... has "
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


class _Query:
    """A statement compiled once for a dialect: its SQL, and how to pass its parameters."""

    __slots__ = ("fixed", "names", "sql")

    def __init__(self, statement: Any, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        # Drivers with positional placeholders (?, %s) take a tuple in this order.
        self.names = tuple(compiled.positiontup or ()) if compiled.positional else None
        # Values written into the statement itself, such as the 1 of `id == 1`.
        binds = compiled.binds.items()
        self.fixed = {name: bind.value for name, bind in binds if not bind.required}

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The values as the driver takes them."""
        if self.fixed:
            values = {**self.fixed, **values}
        if self.names is None:
            return values
        return tuple(values[name] for name in self.names)


class _TableStatements:
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
        self.insert = _insert_ignoring_duplicates(dialect, table).execution_options(
            preserve_rowcount=True
        )
        self.update = table.update().where(
            id_column == sa.bindparam("pybondi_id"),
            version_column == sa.bindparam("pybondi_expected"),
        )


class _Statements:
    """The tables and every statement on them, built once for one dialect."""

    def __init__(self, metadata: sa.MetaData, prefix: str, dialect: sa.Dialect) -> None:
        text = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
        timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
        # Names compare byte for byte: MariaDB's default collation would make 'ada', 'ADA'
        # and 'ada ' one aggregate.
        stream = sa.String(_STREAM_LENGTH).with_variant(
            mysql.VARCHAR(_STREAM_LENGTH, collation="utf8mb4_nopad_bin"), "mysql", "mariadb"
        )
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
            sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
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
        self.driver_error: type[Exception] = dialect.loaded_dbapi.Error
        self.begin_writes = (
            _Query(sa.text("BEGIN IMMEDIATE"), dialect) if dialect.name == "sqlite" else None
        )
        # What the driver takes and gives for a timestamp: SQLAlchemy's own conversions
        # (SQLite keeps timestamps as text), applied by hand since pybondi bypasses them.
        stored_at = events.c.recorded_at.type.dialect_impl(dialect)
        self.timestamp_in: Callable[[datetime], Any] = (
            stored_at.bind_processor(dialect) or _unchanged
        )
        to_datetime: Callable[[Any], Any] = stored_at.result_processor(dialect, None) or _unchanged
        self.timestamp_out: Callable[[Any], datetime] = lambda value: to_datetime(value).replace(
            tzinfo=UTC
        )

        def compiled(statement: Any) -> _Query:
            return _Query(statement, dialect)

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
            _insert_ignoring_duplicates(dialect, aggregates).values(
                stream=param("s"), version=param("v"), type_version=param("t"), data=param("d")
            )
        )
        self.update = compiled(
            aggregates.update()
            .where(stream_is, aggregates.c.version == param("e"))
            .values(version=param("v"), type_version=param("t"), data=param("d"))
        )
        self.append = compiled(events.insert())
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
            _upsert(dialect, snapshots, ["version", "type_version", "data"])
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
        self.lock_head: _Query | None = None
        if not dialect.update_returning:
            self.lock_head = compiled(sa.select(log.c.position).where(head).with_for_update())
            self.move_head = compiled(log.update().where(head).values(position=param("p")))
        self.tables: dict[tuple[sa.Table, str, str], _TableStatements] = {}

    def for_table(self, table: sa.Table, key: str, version: str) -> _TableStatements:
        """The statements on an application table, built at first use."""
        found = self.tables.get((table, key, version))
        if found is None:
            found = self.tables[table, key, version] = _TableStatements(
                table, key, version, self.dialect
            )
        return found

    def is_duplicate(self, error: sa.exc.IntegrityError) -> bool:
        """Whether an INSERT failed only because its row exists (MariaDB/MySQL: 1062).

        PostgreSQL and SQLite INSERT with ON CONFLICT DO NOTHING instead. MariaDB's INSERT
        IGNORE would do that too, but it also turns truncated values, NULLs in NOT NULL
        columns and broken foreign keys into warnings; a duplicate key error there undoes
        the statement only, and the transaction goes on.
        """
        code = getattr(error.orig, "args", ())[:1]
        return self.dialect.name in ("mysql", "mariadb") and code == (1062,)

    def create(self, connection: Connection) -> None:
        """Create what is missing, and the log's one row, even with others doing the same."""
        for table in self.aggregates.metadata.sorted_tables:
            connection.execute(sa.schema.CreateTable(table, if_not_exists=True))
        if connection.execute(sa.select(self.log.c.id)).first() is None:
            try:
                connection.execute(
                    _insert_ignoring_duplicates(self.dialect, self.log).values(id=1, position=0)
                )
            except sa.exc.IntegrityError as error:
                if not self.is_duplicate(error):
                    raise


def _insert_ignoring_duplicates(dialect: sa.Dialect, table: sa.Table) -> Any:
    """An INSERT that, on a duplicate primary key, inserts nothing; the transaction goes on.

    Any other constraint it breaks is still an error. On MariaDB and MySQL it is a plain
    INSERT whose duplicate key error the caller catches.
    """
    key = [column.name for column in table.primary_key.columns]
    if dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=key)
    if dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=key)
    return table.insert()  # MariaDB/MySQL: see _Statements.is_duplicate


def _upsert(dialect: sa.Dialect, table: sa.Table, columns: list[str]) -> Any:
    """An INSERT that replaces `columns` of the row with the same primary key."""
    if dialect.name in ("postgresql", "sqlite"):
        module: Any = postgresql if dialect.name == "postgresql" else sqlite
        statement = module.insert(table)
        replaced = {name: statement.excluded[name] for name in columns}
        return statement.on_conflict_do_update(index_elements=["stream"], set_=replaced)
    statement = mysql.insert(table)
    return statement.on_duplicate_key_update({name: statement.inserted[name] for name in columns})


def _create_engine(
    url: sa.URL, asynchronous: bool, options: Mapping[str, Any]
) -> Engine | AsyncEngine:
    backend, _, driver = url.drivername.partition("+")
    if not driver and backend in _DRIVERS:
        driver = _DRIVERS[backend][asynchronous]
        url = url.set(drivername=f"{backend}+{driver}")
    if backend in ("mysql", "mariadb"):
        # MariaDB's default, REPEATABLE READ, would show a session the state of an
        # aggregate as of the session's first read, not its latest commit, and make it
        # fail its version check where the other databases let it commit. The version
        # checks, not the isolation level, keep writes safe.
        options = {"isolation_level": "READ COMMITTED", **options}
    if asynchronous:
        _require("greenlet", _BACKEND_EXTRAS.get(backend), "An async store")
    try:
        if asynchronous:
            return create_async_engine(url, **options)
        return sa.create_engine(url, **options)
    except ModuleNotFoundError as missing:
        package = (missing.name or driver).partition(".")[0]
        raise MissingDependency(package, _EXTRAS.get(package), f"A {backend} store") from missing


def _require(package: str, extra: str | None, purpose: str) -> None:
    """Fail now, naming the extra, rather than at the first query."""
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as missing:
        raise MissingDependency(package, extra, purpose) from missing


def _check_engine(engine: Engine) -> None:
    """Refuse engine settings under which a session could not keep its promises."""
    options = engine.get_execution_options()
    # create_engine(isolation_level=...) is kept on the dialect, not in the options.
    level = options.get("isolation_level") or getattr(
        engine.dialect, "_on_connect_isolation_level", None
    )
    if level == "AUTOCOMMIT":
        raise ValueError(
            f"Engine {engine.url} runs in AUTOCOMMIT: each statement of a session would "
            f"commit on its own, and a failed session would leave half its writes. Pass an "
            f"engine with transactions (READ COMMITTED, say)."
        )
    if options.get("schema_translate_map"):
        raise ValueError(
            f"Engine {engine.url} has a schema_translate_map, which pybondi's precompiled "
            f"statements would not follow: pass SQLStore(..., schema=...) instead."
        )


def _take_over_sqlite_transactions(engine: Engine) -> None:
    """Let pybondi, not Python's sqlite3 module, decide when SQLite transactions begin.

    Reads run outside a transaction: an open read transaction would keep every other
    connection from committing (or, in WAL mode, fail this one's first write). Writes
    begin with BEGIN IMMEDIATE, which waits for the database's one writer slot; the
    version check then runs on the latest committed state, as on the other databases.
    """

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_for_others(connection: Connection) -> None:
        # Other users of the store's engine (your own queries, create_tables) get the
        # usual transactions: SQLAlchemy's documented recipe for pysqlite.
        if not connection.get_execution_options().get("pybondi_reads_outside"):
            connection.exec_driver_sql("BEGIN")


def _unchanged(value: Any) -> Any:
    return value
