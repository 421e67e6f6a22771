"""A session's commit is all or nothing, and nothing partial is ever visible, on real SQL.

The unit of work under test changes an existing counter twice and creates a new one
(three events), so that its commit writes two aggregate rows (an UPDATE and an INSERT),
moves the log's head and inserts the events; event-sourced, it also replaces both
snapshots. On SQLite it begins with BEGIN IMMEDIATE, each event's INSERT takes the log's
next position itself (no head row moves), and an event-sourced stream has no aggregate
row (its events are its version). Which statements those are is not written down here:
a clean commit is watched first (SQLAlchemy's `after_cursor_execute` and `commit` events
on the store's engine), and each test then acts after every one of its steps in turn,
the last step being the `commit` event, just before COMMIT.

- Failure: an exception raised after step N propagates from the session, and another
  connection (a second store on the same tables) finds every table exactly as it was
  before the session; the same unit of work, run again, then commits in full. Sync on
  SQLite, PostgreSQL and MariaDB, and async on all three.
- Isolation: with the session paused after step N (on a thread of its own), another
  connection reads the tables and finds none of the session's writes; once released,
  the session commits in full. On SQLite, where a writer could block readers, the
  reader's busy timeout bounds the wait, so a blocked read fails instead of hanging.
- Crash: a process that runs the session and kills itself with `os._exit(1)` after
  step N leaves nothing visible, and no lock behind: the next session commits at once
  (PostgreSQL and MariaDB abort the dead connection's transaction; SQLite ignores or
  rolls back the journal the dead process left).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Messagebus, Root, Session
from pybondi.persistence import SQLStore
from pybondi.persistence.repositories import (
    EventSourcedRepository,
    StateRepository,
    StoreRepository,
)
from tests.backends import Backend, unavailable
from tests.counters import Counter, registry

SERVERS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]
KINDS = ["state", "event-sourced"]
FIRST = "c-1"
COMMIT = "<commit event: before COMMIT>"
WAIT = 30  # seconds: anything still waiting by then is stuck
# Waiting on a lock fails after 10 seconds instead of hanging the run; so does a SQLite
# busy database. The first thing a lock left behind would make the next session do.
TIMEOUTS: dict[str, dict[str, Any]] = {
    "sqlite": {"connect_args": {"timeout": 10}},
    "postgres": {"connect_args": {"options": "-c lock_timeout=10000 -c statement_timeout=30000"}},
    "mariadb": {"connect_args": {"init_command": "SET SESSION innodb_lock_wait_timeout = 10"}},
}


class Injected(Exception):
    """The failure the tests inject into a commit."""


# The unit of work ---------------------------------------------------------------------------


def stream(id: str) -> str:
    return f"counters.Counter-{id}"


def blank(id: Any) -> Counter:
    return Counter(Root(id))


def repository(kind: str, store: SQLStore) -> StoreRepository[Counter]:
    if kind == "state":
        return StateRepository(store, Counter, registry())
    return EventSourcedRepository(store, Counter, registry(), create=blank, snapshot_every=1)


def work(repository: StoreRepository[Counter], new: str, arm: Callable[[], None]) -> None:
    """The unit of work: two increments of the first counter, and a new counter at 1."""
    with Session(Messagebus(), repository) as session:
        first = session.repository.get(FIRST)
        first.increment()
        first.increment()
        second = blank(new)
        session.add(second)
        second.increment()
        arm()  # what follows is the session's commit


async def awork(repository: StoreRepository[Counter], new: str, arm: Callable[[], None]) -> None:
    """`work` on the async path."""
    async with Session(Messagebus(), repository) as session:
        first = await session.repository.aget(FIRST)
        first.increment()
        first.increment()
        second = blank(new)
        session.add(second)
        second.increment()
        arm()


# Watching a commit --------------------------------------------------------------------


class Injector:
    """Counts the steps of a session's commit on a store's engine; acts after one of them.

    A step is a statement (`after_cursor_execute`) or the `commit` event, which SQLAlchemy
    sends just before it asks the driver to COMMIT. Steps count once `arm()` was called
    inside the session, that is from the start of its commit.
    """

    def __init__(self, store: SQLStore) -> None:
        engine = store.engine
        self.engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self.armed = False
        self.seen: list[str] = []
        self.point = 0
        self.action: Callable[[str], None] = lambda step: None
        sa.event.listen(self.engine, "after_cursor_execute", self._executed)
        sa.event.listen(self.engine, "commit", self._committing)

    def remove(self) -> None:
        sa.event.remove(self.engine, "after_cursor_execute", self._executed)
        sa.event.remove(self.engine, "commit", self._committing)

    def arm(self) -> None:
        self.armed = True

    @contextmanager
    def watching(
        self, point: int = 0, action: Callable[[str], None] = lambda step: None
    ) -> Iterator[Injector]:
        """Within the block, call `action(step)` after the `point`-th step (1-based)."""
        self.seen, self.point, self.action, self.armed = [], point, action, False
        try:
            yield self
        finally:
            self.armed = False

    def _executed(self, *arguments: Any) -> None:
        self._step(arguments[2])  # (connection, cursor, statement, parameters, ...)

    def _committing(self, connection: Any) -> None:
        self._step(COMMIT)

    def _step(self, step: str) -> None:
        if self.armed:
            self.seen.append(step)
            if len(self.seen) == self.point:
                self.action(step)


def fail(step: str) -> None:
    raise Injected(f"injected after {step!r}")


class Pause:
    """Holds the session at its step, on the session's thread, until the test resumes it."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.resume = threading.Event()

    def __call__(self, step: str) -> None:
        self.paused.set()
        if not self.resume.wait(WAIT):
            raise TimeoutError("the test never resumed the session")


# Stores, and what another connection sees ----------------------------------------------


def open_store(backend: Backend, prefix: str, asynchronous: bool = False) -> SQLStore:
    if backend.error is not None:
        unavailable(backend.name, backend.error)
    return connect(backend.name, backend.url, backend.namespace, prefix, asynchronous)


def connect(
    name: str, url: str, schema: str | None, prefix: str, asynchronous: bool = False
) -> SQLStore:
    return SQLStore(url, asynchronous=asynchronous, schema=schema, prefix=prefix, **TIMEOUTS[name])


@dataclass(frozen=True)
class Contents:
    """Every row of the store's tables, as a connection of its own reads them."""

    aggregates: dict[str, dict[str, Any]]
    events: list[dict[str, Any]]
    log_row: int  # the log table's one row, which SQLite leaves as it is
    head: int  # the log's head as the store reports it, to projections
    snapshots: dict[str, dict[str, Any]]

    def version(self, stream: str) -> int:
        """The stream's version: its aggregate row's, or else its last event's."""
        if stream in self.aggregates:
            return int(self.aggregates[stream]["version"])
        return max(int(e["version"]) for e in self.events if e["stream"] == stream)


def contents(observer: SQLStore) -> Contents:
    tables = observer.statements
    assert isinstance(observer.engine, sa.Engine)
    with observer.engine.connect() as connection:

        def rows(table: sa.Table, order: sa.Column[Any]) -> list[dict[str, Any]]:
            selected = connection.execute(sa.select(table).order_by(order))
            return [dict(row._mapping) for row in selected]

        log_row = connection.execute(sa.select(tables.log.c.position)).scalar_one()
        query = tables.projections.head
        head = connection.exec_driver_sql(query.sql, query.parameters({})).scalar_one()
        return Contents(
            aggregates={
                r["stream"]: r for r in rows(tables.aggregates, tables.aggregates.c.stream)
            },
            events=rows(tables.events, tables.events.c.position),
            log_row=log_row,
            head=head,
            snapshots={r["stream"]: r for r in rows(tables.snapshots, tables.snapshots.c.stream)},
        )


def value(observer: SQLStore, kind: str, id: str) -> int:
    reader = repository(kind, observer)
    with Session(Messagebus(), reader):
        return reader.get(id).value


def keeps_rows(observer: SQLStore, kind: str) -> bool:
    """Whether the counters have aggregate rows: all but event-sourced ones on SQLite."""
    return kind == "state" or not observer.statements.one_writer


def assert_committed(observer: SQLStore, kind: str, before: Contents, new: str) -> None:
    """Everything the unit of work wrote is there, and nothing else changed."""
    after = contents(observer)
    first, second = stream(FIRST), stream(new)
    version = before.version(first)
    assert after.head == before.head + 3
    assert after.log_row == (before.log_row if observer.statements.one_writer else after.head)
    assert after.events[: len(before.events)] == before.events
    assert [
        (e["position"], e["stream"], e["version"], e["type"])
        for e in after.events[len(before.events) :]
    ] == [
        (before.head + 1, first, version + 1, "counters.Incremented"),
        (before.head + 2, first, version + 2, "counters.Incremented"),
        (before.head + 3, second, 1, "counters.Incremented"),
    ]
    if keeps_rows(observer, kind):
        assert sorted(after.aggregates) == sorted([*before.aggregates, second])
        assert (after.aggregates[first]["version"], after.aggregates[second]["version"]) == (
            version + 2,
            1,
        )
    else:  # event-sourced on SQLite: the events alone
        assert after.aggregates == before.aggregates == {}
    assert (after.version(first), after.version(second)) == (version + 2, 1)
    unchanged = set(before.aggregates) - {first}
    assert {s: after.aggregates[s] for s in unchanged} == {
        s: before.aggregates[s] for s in unchanged
    }
    assert (value(observer, kind, FIRST), value(observer, kind, new)) == (version + 2, 1)


# Running the session: sync on a thread of its own, or async on an event loop's thread ---


class Driver:
    """Starts units of work in the background and returns their futures."""

    def __init__(self, asynchronous: bool) -> None:
        self.asynchronous = asynchronous
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="session-loop")
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="session")
        if asynchronous:
            self.loop_thread.start()

    def start(self, store: SQLStore, kind: str, new: str, arm: Callable[[], None]) -> Future[None]:
        if self.asynchronous:
            return asyncio.run_coroutine_threadsafe(
                awork(repository(kind, store), new, arm), self.loop
            )
        return self.executor.submit(work, repository(kind, store), new, arm)

    def run(self, store: SQLStore, kind: str, new: str, arm: Callable[[], None]) -> None:
        self.start(store, kind, new, arm).result(WAIT)

    def dispose(self, store: SQLStore) -> None:
        if self.asynchronous:
            asyncio.run_coroutine_threadsafe(store.adispose(), self.loop).result(WAIT)
        else:
            store.dispose()

    def close(self) -> None:
        self.executor.shutdown()
        if self.asynchronous:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop_thread.join(WAIT)
        self.loop.close()


@dataclass
class Setup:
    """A store under test, an observer on the same tables, and the clean commit's steps."""

    backend: Backend
    prefix: str
    kind: str
    store: SQLStore
    observer: SQLStore
    driver: Driver
    injector: Injector
    steps: list[str]


@contextmanager
def setup(backend: Backend, kind: str, asynchronous: bool = False) -> Iterator[Setup]:
    """Tables with the first counter at 1; the steps a clean commit of the work takes."""
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    observer = open_store(backend, prefix)
    store = open_store(backend, prefix, asynchronous)
    driver = Driver(asynchronous)
    injector = Injector(store)
    try:
        observer.create_tables()
        with Session(Messagebus(), repository(kind, observer)) as session:
            first = blank(FIRST)
            session.add(first)
            first.increment()
        before = contents(observer)
        with injector.watching():
            driver.run(store, kind, "clean", injector.arm)
        steps = [*injector.seen]
        assert_committed(observer, kind, before, "clean")
        assert steps[-1] == COMMIT
        writes = [*steps[:-1]]
        tables = ["events"] + (["snapshots"] if kind != "state" else [])
        tables += ["aggregates"] if keeps_rows(observer, kind) else []
        tables += [] if observer.statements.one_writer else ["log"]
        for table in tables:
            assert any(f"{prefix}{table}" in statement for statement in writes), (table, writes)
        yield Setup(backend, prefix, kind, store, observer, driver, injector, steps)
    finally:
        injector.remove()
        driver.dispose(store)
        driver.close()
        observer.dispose()


def steps_of(request: pytest.FixtureRequest, steps: list[str]) -> list[tuple[int, str]]:
    request.node.user_properties.append(("steps", len(steps)))
    return list(enumerate(steps, start=1))


def where(point: int, steps: list[str]) -> str:
    return f"after step {point} of {len(steps)}: {steps[point - 1]!r}"


# Tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("server", SERVERS)
def test_a_failure_after_any_step_of_commit_leaves_the_database_as_it_was(
    server: str,
    kind: str,
    asynchronous: bool,
    backends: dict[str, Backend],
    request: pytest.FixtureRequest,
) -> None:
    with setup(backends[server], kind, asynchronous) as s:
        for point, step in steps_of(request, s.steps):
            new = f"new-{point}"
            before = contents(s.observer)
            with s.injector.watching(point, fail), pytest.raises(Injected) as caught:
                s.driver.run(s.store, kind, new, s.injector.arm)
            assert caught.value.args == (f"injected after {step!r}",)
            # Rolling back and closing went without a hitch: no failure was noted on it.
            assert getattr(caught.value, "__notes__", []) == [], where(point, s.steps)
            assert s.injector.seen == s.steps[:point], where(point, s.steps)
            assert contents(s.observer) == before, where(point, s.steps)
            # The same unit of work, again: it commits, and all of it is visible.
            s.driver.run(s.store, kind, new, lambda: None)
            assert_committed(s.observer, kind, before, new)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("server", SERVERS)
def test_another_connection_sees_nothing_of_a_commit_under_way(
    server: str,
    kind: str,
    asynchronous: bool,
    backends: dict[str, Backend],
    request: pytest.FixtureRequest,
) -> None:
    with setup(backends[server], kind, asynchronous) as s:
        for point, _ in steps_of(request, s.steps):
            new = f"new-{point}"
            before = contents(s.observer)
            pause = Pause()
            with s.injector.watching(point, pause):
                session = s.driver.start(s.store, kind, new, s.injector.arm)
                try:
                    assert pause.paused.wait(WAIT), f"the session never reached step {point}"
                    meanwhile = contents(s.observer)
                    first = value(s.observer, kind, FIRST)
                finally:
                    pause.resume.set()
                    session.result(WAIT)
            assert meanwhile == before, where(point, s.steps)
            assert first == before.version(stream(FIRST)), where(point, s.steps)
            assert_committed(s.observer, kind, before, new)


def crash_in_session(
    name: str, url: str, schema: str | None, prefix: str, kind: str, new: str, point: int, pipe: Any
) -> None:
    """A process that runs the unit of work when told to, and dies after step `point`."""
    store = connect(name, url, schema, prefix)
    injector = Injector(store)

    def die(step: str) -> None:
        pipe.send(step)
        os._exit(1)

    if pipe.recv() == "go":
        with injector.watching(point, die):
            work(repository(kind, store), new, injector.arm)
        pipe.send(None)  # the commit ended without reaching the point: the test fails
    store.dispose()


@pytest.mark.stress
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("server", SERVERS)
def test_a_process_that_dies_during_commit_leaves_nothing_and_no_lock(
    server: str, kind: str, backends: dict[str, Backend], request: pytest.FixtureRequest
) -> None:
    context = multiprocessing.get_context("spawn")
    with setup(backends[server], kind) as s:
        # One process per step, all started at once (they take a second to start), each
        # waiting for its turn: the crashes happen one after the other on the same tables.
        backend, points = s.backend, steps_of(request, s.steps)
        tables = (backend.name, backend.url, backend.namespace, s.prefix, kind)
        pipes = [context.Pipe() for _ in points]
        processes = [
            context.Process(
                target=crash_in_session,
                args=(*tables, f"new-{point}", point, theirs),
                name=f"crash-after-step-{point}",
            )
            for (point, _), (_, theirs) in zip(points, pipes, strict=True)
        ]
        try:
            for process, (_, theirs) in zip(processes, pipes, strict=True):
                process.start()
                theirs.close()
            for (point, step), process, (ours, _) in zip(points, processes, pipes, strict=True):
                before = contents(s.observer)
                ours.send("go")
                process.join(WAIT)
                assert process.exitcode == 1, where(point, s.steps)
                assert ours.poll(0) and ours.recv() == step, where(point, s.steps)
                assert contents(s.observer) == before, where(point, s.steps)
                s.driver.run(s.store, kind, f"new-{point}", lambda: None)
                assert_committed(s.observer, kind, before, f"new-{point}")
        finally:
            for process, (ours, _) in zip(processes, pipes, strict=True):
                if process.is_alive():
                    process.kill()
                process.join(WAIT)
                ours.close()
