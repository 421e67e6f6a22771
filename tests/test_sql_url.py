"""`postgres://`, the URL scheme hosting services hand out, means PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from pybondi.exceptions import MissingDependency
from pybondi.persistence import SQLStore
from tests.backends import Backend, unavailable
from tests.conftest import Driver


def as_hosts_give_it(url: str) -> str:
    return url.replace("postgresql://", "postgres://", 1)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgres://app:secret@db.example.com:5432/bank", "psycopg"),
        ("postgres+psycopg://app@db.example.com/bank", "psycopg"),
        ("postgresql://app@db.example.com/bank", "psycopg"),
    ],
)
def test_postgres_urls_make_postgresql_stores(url: str, driver: str) -> None:
    # Building an engine connects to nothing: no server is needed to see what it talks to.
    made = sa.make_url(url)
    store = SQLStore(url)
    assert isinstance(store.engine, sa.Engine)
    assert (store.engine.dialect.name, store.engine.dialect.driver) == ("postgresql", driver)
    assert store.engine.url.host == made.host
    assert store.engine.url.database == made.database
    assert "secret" not in repr(store)
    store.dispose()


def test_an_async_store_takes_a_postgres_url() -> None:
    store = SQLStore("postgres://app@db.example.com/bank", asynchronous=True)
    assert store.is_async
    assert (store.engine.dialect.name, store.engine.dialect.driver) == ("postgresql", "psycopg")


def test_a_postgres_url_keeps_its_driver() -> None:
    # asyncpg, which no extra of pybondi installs, is what this URL asks for.
    with pytest.raises(MissingDependency, match=r"pip install asyncpg$"):
        SQLStore("postgres+asyncpg://app@db.example.com/bank", asynchronous=True)


@pytest.mark.postgres
def test_a_postgres_url_reaches_the_server(backends: dict[str, Backend], driver: Driver) -> None:
    backend = backends["postgres"]
    if backend.error is not None:
        unavailable("postgres", backend.error)
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    store = SQLStore(
        as_hosts_give_it(backend.url),
        asynchronous=driver.name == "async",
        schema=backend.namespace,
        prefix=prefix,
    )
    try:
        driver.io(store, "create_tables")
        assert driver.io(store, "missing_tables") == []
    finally:
        driver.io(store, "dispose")
    # The tables are there for a store on the usual URL too: it was the same database.
    same = SQLStore(backend.url, schema=backend.namespace, prefix=prefix)
    try:
        assert same.missing_tables() == []
    finally:
        same.dispose()
