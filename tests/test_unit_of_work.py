"""What a handler reaches of its unit of work: its session, result, connection, after-commit.

`current_session` and `on_commit` run on every driver; `current_connection` on every SQL
backend (a read model in the session's own transaction), and is refused elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from pybondi import (
    Aggregate,
    Command,
    ConcurrencyError,
    Depends,
    Event,
    Message,
    Messagebus,
    Root,
    Session,
    SessionError,
    current_connection,
    current_session,
)
from pybondi.messaging import Outbox
from pybondi.persistence import MemoryStore, Registry, SQLStore, StateRepository, Store
from tests.backends import Backend
from tests.conftest import AsyncDriver, Driver


@dataclass
class Open(Command):
    id: str
    balance: int = 0


@dataclass
class Opened(Event):
    id: str
    balance: int


class Account(Aggregate):
    def __init__(self, id: str, balance: int = 0) -> None:
        self.root = Root(id)
        self.balance = balance


registry = Registry()
registry.register(Account, name="uow.Account")
registry.register(Opened, name="uow.Opened")


def opening(bus: Messagebus) -> None:
    @bus.register
    def open_account(command: Open, session: Session = Depends(current_session)) -> str:
        account = Account(command.id, command.balance)
        session.repository.add(account)
        account.root.publish(Opened(command.id, command.balance))
        return f"opened {command.id}"


# current_session and execute's result ---------------------------------------------------


def test_handlers_get_their_own_session_and_execute_returns_the_result(driver: Driver) -> None:
    bus = Messagebus()
    opening(bus)
    seen: list[Session] = []

    @bus.on(Opened)
    def note(event: Opened, session: Session = Depends(current_session)) -> None:
        seen.append(session)

    session = Session(bus)
    with driver.session(session):
        assert current(driver) is session
        assert driver.execute(session, Open("a")) == "opened a"
        inner = Session(bus)
        with driver.session(inner):  # a session opened inside: current until it closes
            assert current(driver) is inner
        assert current(driver) is session
    assert seen == [session]
    with pytest.raises(SessionError, match="No session is open in this thread or task"):
        current(driver)


def current(driver: Driver) -> Session:
    """`current_session()` where the driver runs the sessions (the async one: its loop)."""
    if isinstance(driver, AsyncDriver):

        async def get() -> Session:
            return current_session()

        return driver.runner.run(get())
    return current_session()


def test_a_command_executed_by_a_handler_is_queued_and_returns_none(driver: Driver) -> None:
    bus = Messagebus()
    opening(bus)
    results: list[object] = []

    @bus.on(Opened)
    def open_another(event: Opened, session: Session = Depends(current_session)) -> None:
        if event.id == "a":
            results.append(session.execute(Open("b")))

    session = Session(bus)
    with driver.session(session):
        driver.execute(session, Open("a"))
        assert set(session.repository.aggregates) == {"a", "b"}
    assert results == [None]


def test_sessions_in_concurrent_tasks_and_threads_each_see_their_own() -> None:
    async def in_task(name: str) -> Session:
        async with Session() as session:
            await asyncio.sleep(0.01)  # the other task runs meanwhile
            assert current_session() is session
            return session

    async def both() -> tuple[Session, Session]:
        return await asyncio.gather(in_task("a"), in_task("b"))

    first, second = asyncio.run(both())
    assert first is not second
    found: list[bool] = []

    def in_thread() -> None:
        with Session() as session:
            found.append(current_session() is session)

    threads = [threading.Thread(target=in_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [True] * 4


# on_commit -------------------------------------------------------------------------------


def test_on_commit_actions_run_after_the_commit_only(driver: Driver) -> None:
    done: list[str] = []
    bus = Messagebus()

    @bus.on(Opened)
    def mail(event: Opened, session: Session = Depends(current_session)) -> None:
        session.on_commit(lambda: done.append(f"mail {event.id}"))

    opening(bus)
    with driver.session(Session(bus)) as session:
        driver.execute(session, Open("a"))
        assert done == []  # not yet: the unit of work may still roll back
    assert done == ["mail a"]
    with pytest.raises(RuntimeError), driver.session(Session(bus)) as session:
        driver.execute(session, Open("b"))
        raise RuntimeError("rolled back")
    assert done == ["mail a"]  # never for a rollback


def test_on_commit_actions_never_run_when_the_commit_fails(driver: Driver, store: Store) -> None:
    done: list[str] = []
    bus = Messagebus()
    opening(bus)

    @bus.on(Opened)
    def mail(event: Opened, session: Session = Depends(current_session)) -> None:
        session.on_commit(lambda: done.append(event.id))

    with driver.session(Session(bus, StateRepository(store, Account, registry))) as session:
        driver.execute(session, Open("a"))
    with (
        pytest.raises(ConcurrencyError),
        driver.session(Session(bus, StateRepository(store, Account, registry))) as session,
    ):
        driver.execute(session, Open("a"))  # a second account "a": the commit fails
    assert done == ["a"]


def test_a_failing_action_does_not_stop_the_others_and_says_the_commit_happened(
    driver: Driver,
) -> None:
    done: list[str] = []

    def fail() -> None:
        raise ValueError("the mail server is down")

    session = Session()
    with pytest.raises(ValueError, match="mail server") as failed, driver.session(session):
        session.on_commit(fail)
        session.on_commit(lambda: done.append("evicted"))
    assert done == ["evicted"]
    assert any("had committed" in note for note in failed.value.__notes__)


def test_async_actions_are_awaited_on_the_async_path() -> None:
    done: list[str] = []

    async def evict() -> None:
        await asyncio.sleep(0)
        done.append("evicted")

    async def main() -> None:
        async with Session() as session:
            session.on_commit(evict)

    asyncio.run(main())
    assert done == ["evicted"]


def test_on_commit_goes_with_the_outbox_in_one_session(sql_store: Store, driver: Driver) -> None:
    assert isinstance(sql_store, SQLStore)
    done: list[str] = []
    bus = Messagebus()
    opening(bus)
    outbox = Outbox(sql_store, registry)

    @bus.on(Opened)
    def announce(event: Opened, session: Session = Depends(current_session)) -> None:
        session.publisher.publish("accounts", Message(event))
        session.on_commit(lambda: done.append(event.id))

    repository = StateRepository(sql_store, Account, registry)
    with driver.session(Session(bus, repository, outbox)) as session:
        driver.execute(session, Open("a"))
    assert done == ["a"]
    rows = driver.io(sql_store, "transact", lambda records: records.outbox.pending_topics())
    assert rows == ["accounts"]


# current_connection: read models in the session's transaction ------------------------------


@dataclass
class View:
    """A read model of the balances: a table of the test's own beside the store's."""

    store: SQLStore
    table: sa.Table
    reader: SQLStore  # a sync store on the same database, to read back with plain SQL

    def balances(self) -> dict[str, int]:
        engine = self.reader.engine
        assert isinstance(engine, sa.Engine)
        with engine.connect() as connection:
            return {id: balance for id, balance in connection.execute(sa.select(self.table))}

    def keep(self, bus: Messagebus) -> None:
        """Register an event handler that writes the view through current_connection.

        Async on an async store (its connection is an `AsyncConnection`), else sync. A row
        per event, `<id>-<balance>`.
        """
        table = self.table

        def row(event: Opened) -> Any:
            return table.insert().values(id=f"{event.id}-{event.balance}", balance=event.balance)

        if self.store.is_async:

            @bus.on(Opened)
            async def keep(event: Opened, connection: Any = Depends(current_connection)) -> None:
                assert isinstance(connection, AsyncConnection)
                await connection.execute(row(event))

        else:

            @bus.on(Opened)
            def keep_sync(event: Opened, connection: Any = Depends(current_connection)) -> None:
                assert isinstance(connection, sa.Connection)
                connection.execute(row(event))


@pytest.fixture
def view(sql_backend: Backend, sql_store: Store) -> Iterator[View]:
    assert isinstance(sql_store, SQLStore)
    reader = sql_backend.store(prefix=sql_store.prefix)
    assert isinstance(reader, SQLStore) and isinstance(reader.engine, sa.Engine)
    table = sa.Table(
        f"{sql_store.prefix}balances",
        sa.MetaData(schema=sql_store.metadata.schema),
        sa.Column("id", sa.String(50), primary_key=True),
        sa.Column("balance", sa.Integer, nullable=False),
    )
    table.create(reader.engine)
    yield View(sql_store, table, reader)
    table.drop(reader.engine)
    reader.dispose()


def sessions(view: View, bus: Messagebus) -> Session:
    return Session(bus, StateRepository(view.store, Account, registry))


def test_a_read_model_written_by_a_handler_commits_with_the_aggregate(
    driver: Driver, view: View
) -> None:
    bus = Messagebus()
    opening(bus)
    view.keep(bus)
    with driver.session(sessions(view, bus)) as session:
        driver.execute(session, Open("a", 5))
        assert view.balances() == {}  # not visible to others before the commit
    assert view.balances() == {"a-5": 5}


@pytest.mark.parametrize("failure", ["an exception", "a version conflict at commit"])
def test_a_read_model_row_goes_with_a_rolled_back_or_failed_unit_of_work(
    driver: Driver, view: View, failure: str
) -> None:
    bus = Messagebus()
    opening(bus)
    view.keep(bus)
    with driver.session(sessions(view, bus)) as session:
        driver.execute(session, Open("a", 5))
    failed = pytest.raises((RuntimeError, ConcurrencyError))
    with failed, driver.session(sessions(view, bus)) as session:
        driver.execute(session, Open("b" if failure == "an exception" else "a", 7))
        if failure == "an exception":
            raise RuntimeError("rolled back")
    assert view.balances() == {"a-5": 5}


def test_current_connection_without_sql_says_what_to_use() -> None:
    bus = Messagebus()

    @bus.on(Opened)
    def keep(event: Opened, connection: Any = Depends(current_connection)) -> None: ...

    for repository in (None, StateRepository(MemoryStore(), Account, registry)):
        with (
            pytest.raises(SessionError, match="repository on a SQLStore"),
            Session(bus, repository) as session,
        ):
            session.dispatch(Opened("a", 1))
