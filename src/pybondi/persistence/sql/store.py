"""SQL stores on SQLAlchemy 2: SQLite embedded, PostgreSQL and MariaDB for production.

    store = SQLStore("sqlite:///bank.db")                       # sync engine
    store = SQLStore("postgresql://localhost/bank", asynchronous=True)
    store.create_tables()                                        # or await store.acreate_tables()

URLs without a driver get pybondi's: psycopg for PostgreSQL, PyMySQL (sync) or aiomysql
(async) for MariaDB and MySQL, aiosqlite for async SQLite. `postgres://` URLs, the form
hosting services hand out, are PostgreSQL's (`postgres+driver://` too). An `Engine` or
`AsyncEngine` you built yourself works too, with transactions (not AUTOCOMMIT) and
without a `schema_translate_map`; for SQLite, whose transactions the store manages,
pass the URL.

Four tables, named with `prefix` (and in `schema`, if given): `aggregates` (one row per
aggregate: its version, and its state if it is state-stored), `events`, `log` (one row:
the last position handed out) and `snapshots`; and those of the messaging: the outbox's
three (`pybondi.messaging.outbox`), the workers' `inbox` and `dead_letters`
(`pybondi.messaging.worker`). A
version check guards every write to an aggregate's row, so a stale write changes
nothing. Appending events takes the log row's lock until commit: positions are handed
out in commit order and a rolled-back transaction gives its positions back, so that
committed events have no gaps and a reader that follows the log from a checkpoint misses
none. SQLite, whose one writer at a time is the transaction from BEGIN IMMEDIATE to
COMMIT, needs neither row: each event's INSERT takes max(position) + 1, and an
event-sourced stream's version is checked by the events' unique (stream, version).

Every read and write is a sync function of a `Connection`; an async store runs it on its
`AsyncConnection` with `run_sync` (SQLAlchemy's greenlet bridge), so the SQL is written once.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pybondi._redact import redact
from pybondi.exceptions import MissingDependency, SessionError
from pybondi.persistence.store import MessagingStore

try:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
    from sqlalchemy.pool import QueuePool
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("sqlalchemy", "sqlite", "pybondi.persistence.sql") from missing

# After the check above, which names the extra to install when SQLAlchemy is missing.
from pybondi.persistence.sql.statements import Statements
from pybondi.persistence.sql.transaction import READS_OUTSIDE, SQLTransaction

__all__ = ["SQLStore", "SQLTransaction"]

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
_CREATE_ATTEMPTS = 3
_CONNECTION_ERRORS = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.TimeoutError,
    OSError,
    TimeoutError,
)


class SQLStore(MessagingStore):
    """A store in a SQL database, through a SQLAlchemy engine.

    Args:
        engine: a database URL, or an `Engine` / `AsyncEngine`.
        asynchronous: for a URL, build an async engine (for `async with Session(...)`).
        schema: the database schema (PostgreSQL) or database (MariaDB) of the tables.
        prefix: the tables' name prefix.
        sqlite_journal_mode: the journal of a SQLite file, set on each connection:
            "wal" (the default) lets readers go on while one writes, and makes a commit
            one write to the log; with SQLite's default `synchronous=FULL`, kept, a
            commit that returned survives a power cut, as on PostgreSQL. "delete" (or
            another of SQLite's modes) for a file that must stay in it, such as one on a
            network file system, where WAL does not work; None leaves the file's own.
        pipelined: PostgreSQL with psycopg: send a transaction's BEGIN with its first
            statement and a commit's writes with COMMIT (psycopg's pipeline mode), 2
            round trips fewer per unit of work, for a server a network hop away. None
            (the default): wherever the engine is psycopg's; False: each statement on
            its own; True: required (a ValueError on another engine).
        engine_options: passed to `create_engine` / `create_async_engine` with a URL.
    """

    def __init__(
        self,
        engine: str | sa.URL | Engine | AsyncEngine,
        *,
        asynchronous: bool = False,
        schema: str | None = None,
        prefix: str = "pybondi_",
        sqlite_journal_mode: str | None = "wal",
        pipelined: bool | None = None,
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
            _take_over_sqlite_transactions(sync_engine, _journal_mode(sqlite_journal_mode))
        if not made:
            _check_engine(sync_engine)
        self.metadata = sa.MetaData(schema=schema)
        self.prefix = prefix
        self.statements = Statements(self.metadata, prefix, sync_engine.dialect)
        if pipelined and self.statements.pipeline is None:
            raise ValueError(
                f"pipelined=True is psycopg's pipeline mode, for PostgreSQL; this store's "
                f"engine is {sync_engine.dialect.name}+{sync_engine.dialect.driver}."
            )
        if pipelined is False:
            self.statements.pipeline = None

    def __repr__(self) -> str:
        url = redact(self.engine.url.render_as_string(hide_password=False))
        where = f" schema={self.metadata.schema}" if self.metadata.schema else ""
        if self.prefix != "pybondi_":
            where += f" prefix={self.prefix}"
        return f"<SQLStore {url}{where}{' async' if self.is_async else ''}>"

    @property
    def connections(self) -> int | None:
        """The size of the engine's pool (`pool_size=`); None for a pool without one."""
        engine = self.engine
        pool = (engine.sync_engine if isinstance(engine, AsyncEngine) else engine).pool
        return pool.size() if isinstance(pool, QueuePool) else None

    # Transactions -----------------------------------------------------------------------

    def begin(self) -> SQLTransaction:
        """Open a transaction on a connection from the engine's pool."""
        if isinstance(self.engine, AsyncEngine):
            raise SessionError(
                f"{self!r} is async: use it with `async with Session(...)`, or create a "
                f"sync store for sync sessions."
            )
        return SQLTransaction(self, self.engine.connect(), None)

    async def abegin(self) -> SQLTransaction:
        """Open a transaction on an async connection."""
        if not isinstance(self.engine, AsyncEngine):
            raise SessionError(
                f"{self!r} is sync, and would block the event loop: for async sessions, "
                f"create the store with SQLStore(url, asynchronous=True)."
            )
        return SQLTransaction(self, None, await self.engine.connect())

    def unreachable(self, error: BaseException) -> bool:
        """Whether `error` may mean the database is out of reach (a probe then decides).

        Looks through the error's causes for a connection SQLAlchemy dropped as broken,
        its `OperationalError` and `InterfaceError` (the driver lost or could not make
        the connection), its pool's `TimeoutError`, and any `OSError` or `TimeoutError`.
        """
        seen: set[int] = set()
        current: BaseException | None = error
        while current is not None and id(current) not in seen:  # a chain may loop
            seen.add(id(current))
            if isinstance(current, _CONNECTION_ERRORS) or (
                isinstance(current, sa.exc.DBAPIError) and current.connection_invalidated
            ):
                return True
            current = current.__cause__ or current.__context__
        return False

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

    def missing_tables(self) -> list[str]:
        """The names of the store's tables that do not exist (yet)."""
        if isinstance(self.engine, AsyncEngine):
            raise SessionError(f"{self!r} is async: use `await store.amissing_tables()`.")
        with self.engine.connect() as connection:
            return self._missing(connection)

    async def amissing_tables(self) -> list[str]:
        """`missing_tables` for async stores."""
        if not isinstance(self.engine, AsyncEngine):
            return self.missing_tables()
        async with self.engine.connect() as connection:
            return await connection.run_sync(self._missing)

    def _missing(self, connection: Connection) -> list[str]:
        inspector = sa.inspect(connection)
        return [
            table.name
            for table in self.metadata.sorted_tables
            if not inspector.has_table(table.name, schema=table.schema)
        ]

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


def _create_engine(
    url: sa.URL, asynchronous: bool, options: Mapping[str, Any]
) -> Engine | AsyncEngine:
    backend, _, driver = url.drivername.partition("+")
    if backend == "postgres":
        # The scheme most hosting services hand out (Heroku, Render, Fly...), which
        # SQLAlchemy dropped in 1.4: it means PostgreSQL, with a driver or without.
        backend = "postgresql"
        url = url.set(drivername=f"{backend}+{driver}" if driver else backend)
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


_JOURNAL_MODES = ("wal", "delete", "truncate", "persist", "memory", "off")


def _journal_mode(mode: str | None) -> str | None:
    if mode is not None and mode.lower() not in _JOURNAL_MODES:
        raise ValueError(
            f"sqlite_journal_mode={mode!r} is no SQLite journal mode: use one of "
            f"{', '.join(map(repr, _JOURNAL_MODES))}, or None to leave the file's own."
        )
    return mode and mode.lower()


def _take_over_sqlite_transactions(engine: Engine, journal_mode: str | None) -> None:
    """Let pybondi, not Python's sqlite3 module, decide when SQLite transactions begin.

    Reads run outside a transaction: an open read transaction would keep every other
    connection from committing (or, in WAL mode, fail this one's first write). Writes
    begin with BEGIN IMMEDIATE, which waits for the database's one writer slot; the
    version check then runs on the latest committed state, as on the other databases.
    A file database gets `journal_mode` on each connection (an in-memory one has none).
    """
    url = engine.url
    in_file = url.database not in (None, "", ":memory:") and url.query.get("mode") != "memory"

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        if in_file and journal_mode is not None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA journal_mode={journal_mode}")  # one of _JOURNAL_MODES
            finally:
                cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin_for_others(connection: Connection) -> None:
        # Other users of the store's engine (your own queries, create_tables) get the
        # usual transactions: SQLAlchemy's documented recipe for pysqlite.
        if not connection.get_execution_options().get(READS_OUTSIDE):
            connection.exec_driver_sql("BEGIN")
