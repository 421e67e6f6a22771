"""PostgreSQL's connection lost in the middle of a pipeline (psycopg's pipeline mode).

The store reaches PostgreSQL through a TCP proxy (tests/proxy.py) that cuts every
connection as soon as the client sent a given statement, before any answer: in the
pipeline of a transaction's first statement (BEGIN with the inbox claim), or in that of
a commit (the writes with COMMIT, which the server carries out); or while a connection
waits in the pool, so that the next transaction's BEGIN meets a dead one. Each time the
error is one a worker's store health takes for the database out of reach, the
connection is dropped from the pool, psycopg logs nothing of its own (a pipeline left
open would log when collected), and once the proxy forwards again the next transaction
works and sees what the server committed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from pybondi.messaging.envelope import Envelope
from pybondi.persistence import SQLStore
from tests.backends import POSTGRES_URL, Backend
from tests.conftest import Driver, SyncDriver
from tests.proxy import Proxy
from tests.workers import at_port

pytestmark = pytest.mark.postgres

GROUP = "pipeline-outage"


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    with Proxy("127.0.0.1", 5432) as made:
        yield made


@pytest.fixture
def store(backends: dict[str, Backend], driver: Driver, proxy: Proxy) -> Iterator[SQLStore]:
    """A pipelined store through the proxy, with its tables."""
    made = SQLStore(
        at_port(POSTGRES_URL, proxy.port),
        asynchronous=driver.name == "async",
        schema=backends["postgres"].namespace,
        prefix=f"t{uuid.uuid4().hex[:8]}_",
        pipelined=True,
    )
    assert made.statements.pipeline is not None
    driver.io(made, "create_tables")
    yield made
    proxy.restore()  # a test that failed while cut
    driver.io(made, "drop_tables")
    driver.io(made, "dispose")


def message() -> Envelope:
    return Envelope("orders", str(uuid.uuid4()), {"message-type": "json"}, b"{}")


def claimed(driver: Driver, store: SQLStore, first: Envelope, second: Envelope) -> list[bool]:
    """Claim two messages in one transaction, as a worker's unit of work goes.

    The first claim is the transaction's first statement (with its BEGIN); the second
    is a commit's write (with COMMIT).
    """
    transaction = driver.io(store, "begin")
    try:
        return [
            driver.io(transaction, "run", lambda records: records.inbox.claim(GROUP, first)),
            driver.io(
                transaction, "commit_after", lambda records: records.inbox.claim(GROUP, second)
            ),
        ]
    finally:
        driver.io(transaction, "close")


@pytest.mark.parametrize(
    ("marker", "committed"),
    [(b"INSERT", False), (b"COMMIT", True)],
    ids=["first-statement", "commit"],
)
def test_a_connection_lost_mid_pipeline_is_dropped_and_reported_unreachable(
    driver: Driver,
    store: SQLStore,
    proxy: Proxy,
    caplog: pytest.LogCaptureFixture,
    marker: bytes,
    committed: bool,
) -> None:
    caplog.set_level(logging.WARNING)
    messages = message(), message()
    proxy.cut_after(marker)
    with pytest.raises(sa.exc.OperationalError) as lost:
        claimed(driver, store, *messages)
    assert proxy.refused == 0 and proxy.accepted >= 1  # cut by the marker, not refused
    assert lost.value.connection_invalidated
    assert store.unreachable(lost.value)
    assert _psycopg_said(driver, caplog) == []  # pybondi raised the error: nothing more
    proxy.restore()
    # The server committed the claims cut off at their COMMIT, and nothing else.
    assert claimed(driver, store, *messages) == [not committed] * 2
    assert claimed(driver, store, message(), message()) == [True, True]
    assert _autocommit(driver, store) is False  # the pool hands out transactions


def test_a_pooled_connection_cut_while_idle_fails_the_next_begin_once(
    driver: Driver, store: SQLStore, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert claimed(driver, store, message(), message()) == [True, True]  # one in the pool
    proxy.cut()
    time.sleep(0.1)  # the reset reaches the pooled connection's socket
    proxy.restore()
    messages = message(), message()
    with pytest.raises(sa.exc.OperationalError) as lost:
        claimed(driver, store, *messages)  # BEGIN and the claim, on the dead connection
    assert lost.value.connection_invalidated
    assert store.unreachable(lost.value)
    assert _psycopg_said(driver, caplog) == []
    assert claimed(driver, store, *messages) == [True, True]  # nothing was committed
    assert _autocommit(driver, store) is False


def _psycopg_said(driver: Driver, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What psycopg logged, once what the failure left behind has been collected."""
    gc.collect()
    if not isinstance(driver, SyncDriver):
        driver.runner.run(asyncio.sleep(0.05))  # an async generator's finalizer runs there
    return [record.getMessage() for record in caplog.records if record.name.startswith("psycopg")]


def _autocommit(driver: Driver, store: SQLStore) -> bool:
    """Whether a connection from the store's pool is in autocommit."""
    engine: Any = store.engine
    if isinstance(driver, SyncDriver):
        with engine.connect() as connection:
            return bool(connection.connection.driver_connection.autocommit)

    async def raw() -> bool:
        async with engine.connect() as connection:
            pooled = await connection.get_raw_connection()
            return bool(pooled.driver_connection.autocommit)

    return driver.runner.run(raw())
