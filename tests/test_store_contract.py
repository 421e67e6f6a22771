"""The store contract suite (pybondi.testing.contracts.stores) on every store.

Memory, and the real SQLite, PostgreSQL and MariaDB (tests/backends.py: a namespace of
the run's own, tables with a prefix of each test's own), each sync and async. What only
the SQL stores do (waiting on locks across threads, statements, engines) is tested in
tests/test_sql_*.py, tests/test_inbox.py and tests/test_outbox.py.

SQLAlchemy is imported only inside the SQL target's methods: in the core's own venv, the
memory part runs, and the SQL backends skip.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from pybondi.persistence import Store
from pybondi.testing.contracts.stores import StoreContract, StoreTarget
from tests.backends import Backend

# Where a store of ours does not keep the contract yet: each an expected failure
# (strict: once the store is fixed, the test passes and the entry must go).
GAPS: dict[tuple[str, str], str] = {}


class BackendTarget(StoreTarget):
    """A backend of tests/backends.py as the suite's target."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        sql = backend.name != "memory"
        self.keeps_table_rows = self.concurrent_claims_wait = sql

    async def store(self, asynchronous: bool) -> Store:
        made = self.backend.store(asynchronous=asynchronous)
        if self.backend.name != "memory":
            await made.acreate_tables() if asynchronous else made.create_tables()  # type: ignore[attr-defined]
        return made

    async def dispose(self, store: Store) -> None:
        if self.backend.name != "memory":
            await store.adispose()  # type: ignore[attr-defined]

    async def table(self, store: Store) -> Any:
        import sqlalchemy as sa

        from pybondi.persistence import SQLStore

        assert isinstance(store, SQLStore)
        made = sa.Table(
            f"{store.prefix}rows_{uuid.uuid4().hex[:6]}",
            sa.MetaData(schema=store.metadata.schema),
            sa.Column("id", sa.String(50), primary_key=True),
            sa.Column("name", sa.String(100), nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
        )
        if isinstance(store.engine, sa.Engine):
            made.metadata.create_all(store.engine)
        else:
            async with store.engine.begin() as connection:
                await connection.run_sync(made.metadata.create_all)
        return made


class TestStoreContract(StoreContract):
    @pytest.fixture
    def store_target(self, backend: Backend, request: pytest.FixtureRequest) -> StoreTarget:
        if gap := GAPS.get((backend.name, request.function.__name__)):
            request.applymarker(pytest.mark.xfail(reason=gap, strict=True))
        return BackendTarget(backend)
