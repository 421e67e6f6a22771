"""What is particular to the SQL stores: statements per session, engines, drivers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Messagebus, Root, Session
from pybondi.exceptions import MissingDependency, SessionError
from pybondi.repositories import StateRepository
from pybondi.stores import SQLStore, Store
from tests.backends import Backend
from tests.conftest import Driver
from tests.test_repositories import Account, registry

# What one session that loads an aggregate, changes it and publishes one event sends,
# per backend. Statement counts are stable where times are not: a change here is a
# change in what every save costs, and should be deliberate.
SAVE_STATEMENTS = {
    "sqlite": ["SELECT", "BEGIN", "UPDATE", "UPDATE", "INSERT"],  # BEGIN IMMEDIATE
    "postgres": ["SELECT", "UPDATE", "UPDATE", "INSERT"],  # the log head: UPDATE..RETURNING
    "mariadb": ["SELECT", "UPDATE", "SELECT", "UPDATE", "INSERT"],  # SELECT..FOR UPDATE
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


def test_statements_per_session_save(
    driver: Driver, sql_store: Store, sql_backend: Backend, statements: list[str]
) -> None:
    with driver.session(
        Session(Messagebus(), StateRepository(sql_store, Account, registry()))
    ) as s:
        s.add(Account(Root("a-1"), "ada"))
    statements.clear()

    repository = StateRepository(sql_store, Account, registry())
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "a-1").deposit(1)

    verbs = [statement.split()[0].upper() for statement in statements]
    assert verbs == SAVE_STATEMENTS[sql_backend.name], "\n".join(statements)


def test_a_session_that_changes_nothing_writes_nothing(
    driver: Driver, sql_store: Store, statements: list[str]
) -> None:
    with driver.session(
        Session(Messagebus(), StateRepository(sql_store, Account, registry()))
    ) as s:
        s.add(Account(Root("a-1"), "ada"))
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


def test_a_missing_driver_names_the_extra_to_install() -> None:
    # asyncpg is a real PostgreSQL driver that pybondi does not install.
    with pytest.raises(MissingDependency, match=r"pip install 'pybondi\[postgres\]'"):
        SQLStore("postgresql+asyncpg://localhost/test", asynchronous=True)


def test_pybondi_works_without_sqlalchemy_and_says_which_extra_to_install() -> None:
    # A fresh interpreter in which SQLAlchemy cannot be imported, as on an installation
    # without the extras.
    script = """
import sys
sys.modules["sqlalchemy"] = None
import pybondi, pybondi.stores, pybondi.repositories, pybondi.serialization
from pybondi.stores import MemoryStore
MemoryStore()
try:
    from pybondi.stores import SQLStore
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("MissingDependency")
    assert "pip install 'pybondi[sqlite]'" in result.stdout
