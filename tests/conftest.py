"""Shared fixtures: each behaviour is written once and run through both drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pybondi import Command, Event, Messagebus, Publisher, Session


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

    def execute(self, session: Session, command: Command) -> None:
        session.execute(command)

    def dispatch(self, session: Session, message: Command | Event) -> None:
        session.dispatch(message)

    def commit(self, session: Session) -> None:
        session.commit()

    def rollback(self, session: Session) -> None:
        session.rollback()

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

    def execute(self, session: Session, command: Command) -> None:
        self.runner.run(session.aexecute(command))

    def dispatch(self, session: Session, message: Command | Event) -> None:
        self.runner.run(session.adispatch(message))

    def commit(self, session: Session) -> None:
        self.runner.run(session.acommit())

    def rollback(self, session: Session) -> None:
        self.runner.run(session.arollback())

    def close(self) -> None:
        self.runner.close()


Driver = SyncDriver | AsyncDriver


@pytest.fixture(params=[SyncDriver, AsyncDriver], ids=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    instance = request.param()
    yield instance
    instance.close()
