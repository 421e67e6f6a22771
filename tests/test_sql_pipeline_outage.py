"""PostgreSQL's connection lost in the middle of a pipeline (psycopg's pipeline mode).

The store reaches PostgreSQL through a TCP proxy (tests/proxy.py) that cuts every
connection as soon as the client sent a given statement, before any answer: in the
pipeline of a transaction's first statement (BEGIN with the inbox claim), or in that of
a commit (the writes with COMMIT, which the server carries out). Either way the error
is one a worker's store health takes for the database out of reach, the connection is
dropped from the pool, psycopg logs nothing of its own, and once the proxy forwards
again the next transaction works and sees what the server committed.
"""

from __future__ import annotations

import logging
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


def claimed(driver: Driver, store: SQLStore, envelope: Envelope) -> bool:
    """Claim the message in a transaction of its own, committed with the claim."""
    transaction = driver.io(store, "begin")
    try:
        return bool(
            driver.io(
                transaction, "commit_after", lambda records: records.inbox.claim(GROUP, envelope)
            )
        )
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
    envelope = message()
    proxy.cut_after(marker)
    with pytest.raises(sa.exc.OperationalError) as lost:
        claimed(driver, store, envelope)
    assert proxy.refused == 0 and proxy.accepted >= 1  # cut by the marker, not refused
    assert lost.value.connection_invalidated
    assert store.unreachable(lost.value)
    psycopg_said = [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]
    assert psycopg_said == []  # pybondi raised the error once: nothing more to log
    proxy.restore()
    # The server committed the claim cut off at its COMMIT, and only that one.
    assert claimed(driver, store, envelope) is not committed
    assert claimed(driver, store, message()) is True
    assert _autocommit(driver, store) is False  # the pool hands out transactions


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
