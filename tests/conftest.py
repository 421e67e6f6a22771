"""Shared fixtures: each behaviour is written once and run through both drivers.

Nothing here imports an extra (SQLAlchemy, a broker client): the core's tests also run
where only pybondi and pytest are installed (`make pytest-core`). There, the test modules
that need an extra are left out of the collection (`needs`), and said so in the header.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pybondi import Command, Event, Messagebus, Publisher, Session

if TYPE_CHECKING:
    from pybondi.persistence import Store
    from tests.backends import Backend
    from tests.brokers import BrokerKit

BACKENDS = ["memory", "sqlite", "postgres", "mariadb"]
SQL_BACKENDS = ["sqlite", "postgres", "mariadb"]
BROKERS = ["redis", "rabbitmq", "nats"]

# What a test module may import that an extra installs: package -> the extra.
EXTRAS = {
    "sqlalchemy": "sqlite",
    "aiosqlite": "sqlite",
    "psycopg": "postgres",
    "pymysql": "mariadb",
    "aiomysql": "mariadb",
    "redis": "redis",
    "aio_pika": "rabbitmq",
    "nats": "nats",
    "pydantic": "pydantic",
    "fastapi": "dev",
    "httpx": "dev",
}
# pybondi's modules and names that import one of them.
NEEDING = {
    "pybondi.persistence.sql": "sqlalchemy",
    "pybondi.messaging.brokers.redis": "redis",
    "pybondi.messaging.brokers.rabbitmq": "aio_pika",
    "pybondi.messaging.brokers.nats": "nats",
    "SQLStore": "sqlalchemy",
}
TESTS = Path(__file__).parent


@cache
def needs(module: Path) -> frozenset[str]:
    """The packages of extras a test module imports, itself or through tests' helpers."""
    found: set[str] = set()
    # Only the module's own top-level imports: those inside functions, under
    # TYPE_CHECKING or in a try that tolerates their absence are for when it is there.
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(alias.name for alias in node.names)]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top in EXTRAS:
                found.add(top)
            found.update(package for prefix, package in NEEDING.items() if name.startswith(prefix))
            if name.startswith("tests.") and (helper := TESTS / f"{name[6:]}.py").exists():
                found |= needs(helper)
    return frozenset(found)


def missing(module: Path) -> set[str]:
    return {package for package in needs(module) if find_spec(package) is None}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave out the test modules whose extras are not installed (the core's venv)."""
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return bool(missing(collection_path)) or None
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    left_out = {path.name: missing(path) for path in sorted(TESTS.glob("test_*.py"))}
    left_out = {name: packages for name, packages in left_out.items() if packages}
    if not left_out:
        return None
    extras = sorted({EXTRAS[package] for packages in left_out.values() for package in packages})
    return (
        f"left out {len(left_out)} test modules whose extras are not installed "
        f"({', '.join(extras)}): {', '.join(left_out)}"
    )


class SyncDriver:
    """Runs pybondi's sync methods."""

    name = "sync"

    def handle(self, bus: Messagebus, message: Command | Event) -> Any:
        return bus.handle(message)

    def deliver(self, publisher: Publisher) -> None:
        publisher.commit()

    @contextmanager
    def session(self, session: Session) -> Iterator[Session]:
        with session:
            yield session

    def execute(self, session: Session, command: Command) -> Any:
        return session.execute(command)

    def dispatch(self, session: Session, message: Command | Event) -> Any:
        return session.dispatch(message)

    def commit(self, session: Session) -> None:
        session.commit()

    def rollback(self, session: Session) -> None:
        session.rollback()

    def io(self, target: Any, method: str, *args: Any) -> Any:
        """Call a method that does I/O: `method` itself on the sync path."""
        return getattr(target, method)(*args)

    def close(self) -> None:
        pass


class AsyncDriver:
    """Runs the async twins on one event loop, as `async with` / `await` would."""

    name = "async"

    def __init__(self) -> None:
        self.runner = asyncio.Runner()

    def handle(self, bus: Messagebus, message: Command | Event) -> Any:
        return self.runner.run(bus.ahandle(message))

    def deliver(self, publisher: Publisher) -> None:
        self.runner.run(publisher.acommit())

    @contextmanager
    def session(self, session: Session) -> Iterator[Session]:
        # This is what `async with session:` does, spelled out for a sync test body.
        self.runner.run(session.__aenter__())
        try:
            yield session
        except BaseException as error:
            self.runner.run(session.__aexit__(type(error), error, error.__traceback__))
            raise
        self.runner.run(session.__aexit__(None, None, None))

    def execute(self, session: Session, command: Command) -> Any:
        return self.runner.run(session.aexecute(command))

    def dispatch(self, session: Session, message: Command | Event) -> Any:
        return self.runner.run(session.adispatch(message))

    def commit(self, session: Session) -> None:
        self.runner.run(session.acommit())

    def rollback(self, session: Session) -> None:
        self.runner.run(session.arollback())

    def io(self, target: Any, method: str, *args: Any) -> Any:
        """Call a method that does I/O: its `a`-prefixed twin, awaited, on the async path."""
        return self.runner.run(getattr(target, f"a{method}")(*args))

    def close(self) -> None:
        self.runner.close()


Driver = SyncDriver | AsyncDriver


@pytest.fixture(params=[SyncDriver, AsyncDriver], ids=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    instance = request.param()
    yield instance
    instance.close()


# Stores --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    """One namespace per backend for the whole run, made when first needed."""
    from tests.backends import Backend

    made: dict[str, Backend] = {}
    tmp = tmp_path_factory.mktemp("stores")

    class Lazy(dict[str, Backend]):
        def __missing__(self, name: str) -> Backend:
            backend = made[name] = self[name] = Backend(name)
            backend.setup(tmp)
            return backend

    yield Lazy()
    for backend in made.values():
        backend.teardown()


def _backend_params(names: list[str]) -> list[Any]:
    """Each backend as a parameter carrying its marker (`-m postgres` runs just those)."""
    return [
        pytest.param(name, marks=() if name == "memory" else getattr(pytest.mark, name))
        for name in names
    ]


@pytest.fixture(params=_backend_params(BACKENDS))
def backend(request: pytest.FixtureRequest, backends: dict[str, Backend]) -> Backend:
    """Each store backend: memory, SQLite, PostgreSQL, MariaDB."""
    return backends[request.param]


@pytest.fixture(params=_backend_params(SQL_BACKENDS))
def sql_backend(request: pytest.FixtureRequest, backends: dict[str, Backend]) -> Backend:
    """Each SQL backend."""
    return backends[request.param]


@pytest.fixture
def store(backend: Backend, driver: Driver) -> Iterator[Store]:
    """A store with fresh tables, sync or async to match the driver."""
    yield from _store(backend, driver)


@pytest.fixture
def sql_store(sql_backend: Backend, driver: Driver) -> Iterator[Store]:
    """A SQL store with fresh tables, sync or async to match the driver."""
    yield from _store(sql_backend, driver)


def _store(backend: Backend, driver: Driver) -> Iterator[Store]:
    made = backend.store(asynchronous=driver.name == "async")
    sql = backend.name != "memory"  # a SQLStore, whose module needs SQLAlchemy
    if sql:
        driver.io(made, "create_tables")
    yield made
    if sql:
        # An async engine's connections belong to the driver's loop: dispose of them there.
        driver.io(made, "dispose")


# Brokers -------------------------------------------------------------------------------


@pytest.fixture(params=_backend_params(BROKERS))
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerKit]:
    """Each real broker (Redis, RabbitMQ, NATS), with names of this test's own, removed after."""
    from tests.brokers import KITS

    kit = KITS[request.param]()
    try:
        kit.start()
        yield kit
    finally:
        kit.close()
