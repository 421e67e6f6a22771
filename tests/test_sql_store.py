"""What is particular to the SQL stores: statements per session, engines, drivers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Messagebus, Root, Session
from pybondi.exceptions import ConcurrencyError, MissingDependency, SessionError
from pybondi.persistence import SQLStore, Store
from pybondi.persistence.repositories import EventSourcedRepository, StateRepository
from tests.backends import Backend
from tests.conftest import Driver
from tests.counters import Counter
from tests.counters import registry as counters_registry
from tests.test_repositories import Account, registry

# What one session that loads an aggregate, changes it and publishes one event sends,
# per backend. Statement counts are stable where times are not: a change here is a
# change in what every save costs, and should be deliberate.
SAVE_STATEMENTS = {
    # BEGIN IMMEDIATE; the INSERT takes the log's next position itself (one writer).
    "sqlite": ["SELECT", "BEGIN", "UPDATE", "INSERT"],
    "postgres": ["SELECT", "UPDATE", "UPDATE", "INSERT"],  # the log head: UPDATE..RETURNING
    "mariadb": ["SELECT", "UPDATE", "SELECT", "UPDATE", "INSERT"],  # SELECT..FOR UPDATE
}
# The same session on an event-sourced aggregate: it loads the events, and on SQLite
# writes no aggregate row (the events' unique stream and version is the version check).
EVENT_SOURCED_SAVE_STATEMENTS = {
    "sqlite": ["SELECT", "BEGIN", "INSERT"],
    "postgres": ["SELECT", "UPDATE", "UPDATE", "INSERT"],
    "mariadb": ["SELECT", "UPDATE", "SELECT", "UPDATE", "INSERT"],
}


@pytest.fixture
def statements(sql_store: Store) -> Iterator[list[str]]:
    """The SQL statements the store sends, as they are sent."""
    assert isinstance(sql_store, SQLStore)
    engine = sql_store.engine
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    sent: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    sa.event.listen(sync_engine, "before_cursor_execute", note)
    yield sent
    sa.event.remove(sync_engine, "before_cursor_execute", note)


def add_account(driver: Driver, store: Store, *ids: str) -> None:
    """Store new accounts, in a session of their own."""
    with driver.session(Session(Messagebus(), StateRepository(store, Account, registry()))) as unit:
        for id in ids:
            unit.add(Account(Root(id), "ada"))


def test_statements_per_session_save(
    driver: Driver, sql_store: Store, sql_backend: Backend, statements: list[str]
) -> None:
    add_account(driver, sql_store, "a-1")
    statements.clear()

    repository = StateRepository(sql_store, Account, registry())
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "a-1").deposit(1)

    verbs = [statement.split()[0].upper() for statement in statements]
    assert verbs == SAVE_STATEMENTS[sql_backend.name], "\n".join(statements)


def test_statements_per_event_sourced_save(
    driver: Driver, sql_store: Store, sql_backend: Backend, statements: list[str]
) -> None:
    def counters() -> EventSourcedRepository[Counter]:
        return EventSourcedRepository(
            sql_store, Counter, counters_registry(), create=lambda id: Counter(Root(id))
        )

    with driver.session(Session(Messagebus(), counters())) as unit:
        created = Counter(Root("c-1"))
        unit.add(created)
        created.increment()
    statements.clear()

    repository = counters()
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "c-1").increment()

    verbs = [statement.split()[0].upper() for statement in statements]
    assert verbs == EVENT_SOURCED_SAVE_STATEMENTS[sql_backend.name], "\n".join(statements)
    assert [event.version for event in driver.io(sql_store, "read_log")] == [1, 2]


def test_a_session_that_changes_nothing_writes_nothing(
    driver: Driver, sql_store: Store, statements: list[str]
) -> None:
    add_account(driver, sql_store, "a-1")
    statements.clear()
    repository = StateRepository(sql_store, Account, registry())
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "a-1")
    assert [statement.split()[0].upper() for statement in statements] == ["SELECT"]


def test_async_store_in_a_sync_session_says_what_to_do(sql_backend: Backend) -> None:
    store = sql_backend.store(asynchronous=True)
    assert isinstance(store, SQLStore)
    try:
        with pytest.raises(SessionError, match=r"is async: use it with `async with Session"):
            Session(Messagebus(), StateRepository(store, Account, registry())).begin()
    finally:
        store.dispose()


def test_sync_store_in_an_async_session_says_what_to_do(sql_backend: Backend) -> None:
    store = sql_backend.store(asynchronous=False)
    assert isinstance(store, SQLStore)
    repository = StateRepository(store, Account, registry())

    async def begin() -> None:
        async with Session(Messagebus(), repository):
            pass

    try:
        with pytest.raises(SessionError, match=r"asynchronous=True"):
            asyncio.run(begin())
    finally:
        store.dispose()


def test_repository_outside_a_session_says_what_to_do() -> None:
    repository = StateRepository(SQLStore("sqlite://"), Account, registry())
    with pytest.raises(SessionError, match="within a Session"):
        repository.get("a-1")


def test_a_driver_pybondi_does_not_ship_is_named_to_install() -> None:
    # asyncpg is a real PostgreSQL driver, which none of pybondi's extras installs.
    with pytest.raises(MissingDependency, match=r"pip install asyncpg$"):
        SQLStore("postgresql+asyncpg://localhost/test", asynchronous=True)


def test_a_missing_driver_of_an_extra_names_the_extra() -> None:
    # A fresh interpreter in which psycopg cannot be imported, as without pybondi[postgres].
    script = """
import sys
sys.modules["psycopg"] = None
from pybondi.persistence import SQLStore
try:
    SQLStore("postgresql://localhost/test")
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("MissingDependency")
    assert "pip install 'pybondi[postgres]'" in result.stdout


def test_an_sqlite_engine_of_your_own_is_refused_with_what_to_pass() -> None:
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match=r"pass its URL instead"):
        SQLStore(engine)
    engine.dispose()


def test_workers_creating_the_tables_at_once_all_succeed(sql_backend: Backend) -> None:
    prefix = f"race{uuid.uuid4().hex[:6]}_"
    stores = [sql_backend.store(prefix=prefix) for _ in range(4)]
    failures: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def create(store: Store) -> None:
        assert isinstance(store, SQLStore)
        start.wait()
        try:
            store.create_tables()
        except BaseException as failure:
            failures.append(failure)

    threads = [threading.Thread(target=create, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert failures == []
        assert stores[0].read_log() == []
    finally:
        for store in stores:
            assert isinstance(store, SQLStore)
            store.dispose()


def test_rows_are_written_in_one_order_whatever_the_loading_order(
    driver: Driver, sql_store: Store
) -> None:
    # Two sessions that lock the same rows in different orders could deadlock.
    assert isinstance(sql_store, SQLStore)
    engine = sql_store.engine
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    add_account(driver, sql_store, "x", "y")
    written: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith("UPDATE") and "aggregates" in statement:
            written.append(repr(parameters))

    sa.event.listen(sync_engine, "before_cursor_execute", note)
    repository = StateRepository(sql_store, Account, registry())
    try:
        with driver.session(Session(Messagebus(), repository)):
            driver.io(repository, "get", "y").deposit(1)
            driver.io(repository, "get", "x").deposit(1)
    finally:
        sa.event.remove(sync_engine, "before_cursor_execute", note)
    assert len(written) == 2
    assert "bank.Account-x" in written[0] and "bank.Account-y" in written[1]


def test_pybondi_works_without_sqlalchemy_and_says_which_extra_to_install() -> None:
    # A fresh interpreter in which SQLAlchemy cannot be imported, as on an installation
    # without the extras.
    script = """
import sys
sys.modules["sqlalchemy"] = None
import pybondi, pybondi.persistence
import pybondi.persistence.repositories, pybondi.persistence.serialization
from pybondi.persistence import MemoryStore
MemoryStore()
try:
    from pybondi.persistence import SQLStore
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("MissingDependency")
    assert "pip install 'pybondi[sqlite]'" in result.stdout


def test_cursor_listeners_get_sqlalchemy_s_execution_context(
    driver: Driver, sql_store: Store
) -> None:
    # Tracing tools (OpenTelemetry, Sentry) keep their span on the context.
    assert isinstance(sql_store, SQLStore)
    engine = sql_store.engine
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    traced: list[str] = []

    def start(_conn: Any, _cursor: Any, statement: str, _p: Any, context: Any, _m: Any) -> None:
        context.span = statement.split(maxsplit=1)[0]

    def end(_conn: Any, _cursor: Any, _s: str, _p: Any, context: Any, _m: Any) -> None:
        traced.append(context.span)

    sa.event.listen(sync_engine, "before_cursor_execute", start)
    sa.event.listen(sync_engine, "after_cursor_execute", end)
    try:
        add_account(driver, sql_store, "a-1")
    finally:
        sa.event.remove(sync_engine, "before_cursor_execute", start)
        sa.event.remove(sync_engine, "after_cursor_execute", end)
    assert "INSERT" in traced


def test_hide_parameters_hides_them_in_errors(sql_backend: Backend) -> None:
    store = SQLStore(
        sql_backend.store().engine.url,  # type: ignore[attr-defined]
        schema=sql_backend.namespace,
        prefix=f"missing{uuid.uuid4().hex[:6]}_",  # tables never created
        hide_parameters=True,
    )
    repository = StateRepository(store, Account, registry())
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, Session(Messagebus(), repository):
            repository.get("secret-id")
        assert "secret-id" not in str(caught.value)
    finally:
        store.dispose()


def test_engines_that_would_break_the_promises_are_refused() -> None:
    url = "postgresql+psycopg://localhost/test"
    with pytest.raises(ValueError, match="AUTOCOMMIT"):
        SQLStore(sa.create_engine(url, isolation_level="AUTOCOMMIT"))
    with pytest.raises(ValueError, match="AUTOCOMMIT"):
        SQLStore(sa.create_engine(url).execution_options(isolation_level="AUTOCOMMIT"))
    translated = sa.create_engine(url, execution_options={"schema_translate_map": {None: "x"}})
    with pytest.raises(ValueError, match=r"schema_translate_map.*schema="):
        SQLStore(translated)


def test_your_own_transactions_on_a_sqlite_store_s_engine_roll_back(tmp_path: Any) -> None:
    store = SQLStore(f"sqlite:///{tmp_path / 'own.db'}")
    store.create_tables()
    engine = store.engine
    assert isinstance(engine, sa.Engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (text VARCHAR(20))")
    with pytest.raises(RuntimeError), engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO notes VALUES ('lost')")
        raise RuntimeError("roll back")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM notes").scalar() == 0
    store.dispose()


def journal_mode(store: SQLStore) -> str:
    engine = store.engine
    assert isinstance(engine, sa.Engine)
    with engine.connect() as connection:
        return str(connection.exec_driver_sql("PRAGMA journal_mode").scalar())


@pytest.mark.sqlite
def test_sqlite_files_are_in_wal_mode_unless_told_otherwise(tmp_path: Any) -> None:
    made = {
        mode: SQLStore(f"sqlite:///{tmp_path / f'{mode}.db'}", sqlite_journal_mode=mode)
        for mode in ("wal", "delete")
    }
    made["default"] = SQLStore(f"sqlite:///{tmp_path / 'default.db'}")
    made["memory"] = SQLStore("sqlite://")  # an in-memory database has no journal file
    try:
        modes = {name: journal_mode(store) for name, store in made.items()}
    finally:
        for store in made.values():
            store.dispose()
    assert modes == {"wal": "wal", "delete": "delete", "default": "wal", "memory": "memory"}


@pytest.mark.sqlite
def test_an_sqlite_journal_mode_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="'fast' is no SQLite journal mode: use one of 'wal'"):
        SQLStore("sqlite://", sqlite_journal_mode="fast")


@pytest.mark.sqlite
def test_a_sqlite_file_of_an_earlier_pre_release_goes_on(tmp_path: Any) -> None:
    # Before: `position` was a BIGINT (not SQLite's rowid), every append moved the log's
    # row, and event-sourced streams had an aggregates row. Such a file goes on as it is.
    store = SQLStore(f"sqlite:///{tmp_path / 'earlier.db'}")
    engine = store.engine
    assert isinstance(engine, sa.Engine)
    events = store.statements.events
    with engine.begin() as connection:  # as the earlier version made it
        connection.exec_driver_sql(
            "CREATE TABLE pybondi_events (position BIGINT NOT NULL, stream VARCHAR(255) NOT "
            "NULL, version INTEGER NOT NULL, type VARCHAR(255) NOT NULL, type_version INTEGER "
            "NOT NULL, data TEXT NOT NULL, recorded_at DATETIME NOT NULL, PRIMARY KEY "
            "(position), CONSTRAINT pybondi_events_stream_version UNIQUE (stream, version))"
        )
    store.create_tables()
    stream = "counters.Counter-c-1"
    written = {"type": "counters.Incremented", "type_version": 1, "recorded_at": datetime.now()}
    with engine.begin() as connection:
        assert "BIGINT" in str(
            connection.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = ?", (events.name,)
            ).scalar()
        )
        connection.execute(store.statements.log.update().values(position=2))
        connection.execute(
            store.statements.aggregates.insert().values(stream=stream, version=2, type_version=1)
        )
        for version in (1, 2):
            data = f'{{"counter": "c-1", "value": {version}}}'
            row = {"position": version, "stream": stream, "version": version, "data": data}
            connection.execute(events.insert().values(**row, **written))
    try:
        counters = EventSourcedRepository(
            store, Counter, counters_registry(), create=lambda id: Counter(Root(id))
        )
        with Session(Messagebus(), counters) as session:
            session.repository.get("c-1").increment()
            created = Counter(Root("c-2"))
            session.add(created)
            created.increment()
        log = store.read_log()
        assert [(e.position, e.stream, e.version) for e in log[2:]] == [
            (3, stream, 3),
            (4, "counters.Counter-c-2", 1),
        ]
        assert store.transact(lambda records: records.projections.head()) == 4
        with Session(Messagebus(), counters) as session:
            assert session.repository.get("c-1").value == 3
        # A session that read c-1 at 3 before another wrote 4 is still a conflict.
        stale = EventSourcedRepository(
            store, Counter, counters_registry(), create=lambda id: Counter(Root(id))
        )
        with pytest.raises(ConcurrencyError), Session(Messagebus(), stale) as session:
            session.repository.get("c-1").increment()
            with Session(Messagebus(), counters) as other:
                other.repository.get("c-1").increment()
        assert [event.version for event in store.read_log(4)] == [4]
    finally:
        store.dispose()
