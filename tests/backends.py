"""The stores the contract suite runs on: memory, and real SQLite, PostgreSQL and MariaDB.

Each service-backed backend makes its own uniquely named schema (PostgreSQL), database
(MariaDB) or file (SQLite) for the test run, gives each test its own table prefix, and
removes everything afterwards. A server that cannot be reached skips its tests with the
reason, except under CI=true, where it fails them: CI must never pass by skipping.
Where SQLAlchemy is not installed (the core's own venv, `make pytest-core`), the SQL
backends skip: that venv lacks the extras by design. SQLAlchemy is imported only then.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from pybondi.persistence import MemoryStore, Store, Transaction

POSTGRES_URL = os.environ.get("PYBONDI_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("PYBONDI_MARIADB_URL", "mariadb://root@127.0.0.1:3306/test")


def unavailable(service: str, error: BaseException) -> None:
    """Skip (or, under CI=true, fail) a test whose server cannot be reached."""
    reason = f"{service} is not reachable ({type(error).__name__}: {error})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; under CI=true a missing service is a failure.")
    pytest.skip(reason)


def unique(kind: str) -> str:
    """A name no other test run on this machine uses."""
    return f"pybondi_{kind}_{uuid.uuid4().hex[:12]}"


@dataclass
class Backend:
    """Makes stores on one kind of database, in a namespace of this test run's own."""

    name: str
    url: str = ""
    namespace: str | None = None  # the schema (PostgreSQL) or database (MariaDB)
    error: BaseException | None = None
    created: bool = False

    def store(self, asynchronous: bool = False, prefix: str | None = None, **options: Any) -> Store:
        """A new store with its own tables (not created yet)."""
        if self.name == "memory":
            return MemoryStore()
        if find_spec("sqlalchemy") is None:
            pytest.skip(f"{self.name} needs SQLAlchemy: pip install 'pybondi[{self.name}]'")
        if self.error is not None:
            unavailable(self.name, self.error)
        from pybondi.persistence import SQLStore

        return SQLStore(
            self.url,
            asynchronous=asynchronous,
            schema=self.namespace,
            prefix=prefix or f"t{uuid.uuid4().hex[:8]}_",
            **options,
        )

    def setup(self, tmp: Path) -> None:
        """Create the run's namespace, noting the error if the server is unreachable."""
        if self.name == "memory" or find_spec("sqlalchemy") is None:
            return
        import sqlalchemy as sa

        try:
            if self.name == "sqlite":
                self.url = f"sqlite:///{tmp / 'store.db'}"
            elif self.name == "postgres":
                self.url, self.namespace = POSTGRES_URL, unique("test")
                self._admin(f"CREATE SCHEMA {self.namespace}")
            elif self.name == "mariadb":
                self.url, self.namespace = MARIADB_URL, unique("test")
                self._admin(f"CREATE DATABASE {self.namespace}")
            self.created = self.namespace is not None
        except sa.exc.OperationalError as error:
            self.error = error

    def teardown(self) -> None:
        """Drop the run's namespace."""
        if self.created and self.name == "postgres":
            self._drop_postgres_schema()
        elif self.created and self.name == "mariadb":
            self._admin(f"DROP DATABASE {self.namespace}")

    def _drop_postgres_schema(self) -> None:
        # DROP SCHEMA ... CASCADE locks every object of the schema in one transaction: a
        # whole run's tables (thousands) overflow PostgreSQL's lock table ("out of shared
        # memory": max_locks_per_transaction). So the tables go a few at a time first.
        tables = self._admin(
            "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = %(schema)s",
            {"schema": self.namespace},
        )
        for start in range(0, len(tables), 50):
            names = ", ".join(f"{self.namespace}.{name}" for name in tables[start : start + 50])
            self._admin(f"DROP TABLE IF EXISTS {names} CASCADE")
        self._admin(f"DROP SCHEMA {self.namespace} CASCADE")

    def _admin(self, statement: str, parameters: dict[str, Any] | None = None) -> list[Any]:
        """Run one statement in a transaction of its own; the first column of its rows."""
        import sqlalchemy as sa

        from pybondi.persistence import SQLStore

        store = SQLStore(self.url, connect_args={"connect_timeout": 3})
        assert isinstance(store.engine, sa.Engine)
        try:
            with store.engine.begin() as connection:
                result = connection.exec_driver_sql(statement, parameters)
                return list(result.scalars()) if result.returns_rows else []
        finally:
            store.dispose()


class AggregatesOnly(Store):
    """A store of aggregates alone, as a user's own might be: no outbox, no inbox."""

    def begin(self) -> Transaction:
        return MemoryStore().begin()
