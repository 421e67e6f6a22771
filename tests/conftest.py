"""Shared fixtures: each behaviour is written once and run through both drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pybondi import Command, Event, Messagebus, Publisher, Session
from pybondi.persistence import SQLStore, Store
from tests.backends import BACKENDS, SQL_BACKENDS, Backend
from tests.brokers import KITS, BrokerKit


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
    if isinstance(made, SQLStore):
        driver.io(made, "create_tables")
    yield made
    if isinstance(made, SQLStore):
        # An async engine's connections belong to the driver's loop: dispose of them there.
        driver.io(made, "dispose")


# Brokers -------------------------------------------------------------------------------


@pytest.fixture(params=_backend_params(list(KITS)))
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerKit]:
    """Each real broker (Redis, RabbitMQ, NATS), with names of this test's own, removed after."""
    kit = KITS[request.param]()
    try:
        kit.start()
        yield kit
    finally:
        kit.close()
