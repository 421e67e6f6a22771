"""Many writers on one aggregate, on real PostgreSQL and MariaDB servers (and threads on a
SQLite file): nothing is lost.

Threads (and, separately, processes with engines of their own) run read-modify-write
cycles on the same counter, each in a session of its own, retrying a cycle only when the
session raises `ConcurrencyError`. Every other error fails the test with its traceback.

What the assertions prove, after the last writer is done:

- no lost update: the stored counter equals the number of sessions that committed, and
  its stored version equals it too (each commit moved it by exactly one);
- no duplicated or phantom event: the log holds exactly one `Incremented` per commit;
- the log is gapless and in commit order: positions 1..N and stream versions 1..N, with
  no gap and no repeat, and the event at version v says the counter became v, although
  thousands of the writers' transactions were rolled back on the way;
- the version check is what settles every race: the only error seen is
  `ConcurrencyError`, never a deadlock, a lock timeout or a serialization failure.

The first cycle to commit creates the counter (the others' attempts to create it at the
same time are conflicts too), so that the log holds the counter's `Incremented` events
and nothing else. A losing cycle waits a few random milliseconds before it tries again,
as a real retry loop would: without it the losers' wasted attempts, all on one GIL, made
the thread test three times slower for no more evidence. The number of conflicts each
test saw is printed (`pytest -s`) and kept as the test's `conflicts` user property.

Positions given back by rolled-back transactions are test_sql_atomicity's concern: a
conflicting transaction here fails its version check before it takes any.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from pybondi import Messagebus, Root, Session
from pybondi.exceptions import ConcurrencyError, NotFound
from pybondi.persistence import SQLStore, Store, StoredEvent
from pybondi.persistence.repositories import (
    EventSourcedRepository,
    StateRepository,
    StoreRepository,
)
from pybondi.persistence.serialization import Registry
from tests.backends import Backend
from tests.counters import Counter, registry

SERVERS = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]
# Threads of one process on one SQLite file too: its one writer at a time takes the log's
# positions and, for an event-sourced stream, checks the version on the events alone.
WITH_SQLITE = [pytest.param("sqlite", marks=pytest.mark.sqlite), *SERVERS]
COUNTER = "the-counter"
STREAM = f"counters.Counter-{COUNTER}"
BACKOFF = 0.003  # seconds: the first retry waits up to this long, later ones up to 8 times more
JOIN_TIMEOUT = 300  # seconds: a writer still running by then is stuck, not slow


# Repositories of counters --------------------------------------------------------------


def state_repository(store: Store, types: Registry) -> StoreRepository[Counter]:
    return StateRepository(store, Counter, types)


def event_sourced_repository(store: Store, types: Registry) -> StoreRepository[Counter]:
    return EventSourcedRepository(store, Counter, types, create=lambda id: Counter(Root(id)))


Repositories = Callable[[Store, Registry], StoreRepository[Counter]]


# The writers ----------------------------------------------------------------------------


def increment_until_committed(store: Store, types: Registry, repository: Repositories) -> int:
    """One read-modify-write cycle, retried on ConcurrencyError only; return the retries."""
    conflicts = 0
    while True:
        try:
            with Session(Messagebus(), repository(store, types)) as session:
                try:
                    counter = session.repository.get(COUNTER)
                except NotFound:  # the first cycle to commit creates it
                    counter = Counter(Root(COUNTER))
                    session.add(counter)
                counter.increment()
        except ConcurrencyError:
            conflicts += 1
            # Back off a little, as a real retry loop would: every attempt that loses the
            # race costs CPU that the winner (and the server) needs.
            time.sleep(random.uniform(0, BACKOFF * 2 ** min(conflicts - 1, 3)))
            continue
        return conflicts


def run_cycles(
    store: Store, types: Registry, repository: Repositories, cycles: int
) -> tuple[int, int]:
    """`cycles` committed increments; return (commits, conflicts)."""
    commits = conflicts = 0
    for _ in range(cycles):
        conflicts += increment_until_committed(store, types, repository)
        commits += 1
    return commits, conflicts


def count_in_process(
    url: str, schema: str | None, prefix: str, cycles: int, start: Any, results: Any
) -> None:
    """A writer process: its own engine on the same tables; reports through `results`."""
    store = SQLStore(url, schema=schema, prefix=prefix)
    try:
        store.read_log(0, 1)  # connect before the start, so that the writers start together
        start.wait(timeout=JOIN_TIMEOUT)
        commits, conflicts = run_cycles(store, registry(), state_repository, cycles)
        results.put(("ok", commits, conflicts))
    except BaseException:
        results.put(("error", traceback.format_exc(), 0))
    finally:
        store.dispose()


# Checks ---------------------------------------------------------------------------------


def whole_log(store: Store, page: int = 500) -> list[StoredEvent]:
    """Every event of the log, read page by page as a projection would follow it."""
    events: list[StoredEvent] = []
    while batch := store.read_log(events[-1].position if events else 0, page):
        assert len(batch) <= page
        events += batch
    return events


def assert_nothing_lost(store: SQLStore, types: Registry, repository: Repositories, n: int) -> None:
    reader = repository(store, types)
    with Session(Messagebus(), reader):
        counter = reader.get(COUNTER)
        assert counter.value == n
        assert reader.versions[COUNTER] == n
    events = whole_log(store)
    assert len(events) == n
    assert {(event.stream, event.type) for event in events} == {(STREAM, "counters.Incremented")}
    assert [event.position for event in events] == list(range(1, n + 1))
    assert [event.version for event in events] == list(range(1, n + 1))
    # The events are in commit order: the one at version v says the counter became v.
    assert [types.loads(e.type, e.schema, e.data).value for e in events] == list(range(1, n + 1))


def note_conflicts(
    request: pytest.FixtureRequest, what: str, conflicts: int, seconds: float
) -> None:
    request.node.user_properties.append(("conflicts", conflicts))
    request.node.user_properties.append(("seconds", round(seconds, 2)))
    print(f"\n{request.node.name}: {what}: {conflicts} conflicts in {seconds:.1f}s")


def new_store(backend: Backend, prefix: str | None = None) -> SQLStore:
    store = backend.store(prefix=prefix)
    assert isinstance(store, SQLStore)
    store.create_tables()
    return store


def in_threads(
    store: Store, types: Registry, repository: Repositories, threads: int, cycles: int
) -> tuple[int, int]:
    """Run the cycles on `threads` threads started together; return the totals."""
    start = threading.Barrier(threads)
    results: list[tuple[int, int]] = []
    failures: list[str] = []

    def writer() -> None:
        try:
            start.wait(timeout=JOIN_TIMEOUT)
            results.append(run_cycles(store, types, repository, cycles))
        except BaseException:
            failures.append(traceback.format_exc())

    workers = [threading.Thread(target=writer, name=f"writer-{n}") for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOIN_TIMEOUT)
    assert not [worker.name for worker in workers if worker.is_alive()], "a writer is stuck"
    if failures:
        pytest.fail(
            "A writer failed with an error other than ConcurrencyError:\n" + "\n".join(failures)
        )
    assert len(results) == threads
    return sum(c for c, _ in results), sum(c for _, c in results)


# Tests ----------------------------------------------------------------------------------


@pytest.mark.stress
@pytest.mark.parametrize("server", WITH_SQLITE)
def test_threads_on_one_state_stored_aggregate_lose_nothing(
    server: str, backends: dict[str, Backend], request: pytest.FixtureRequest
) -> None:
    threads, cycles = 8, 200
    store, types = new_store(backends[server]), registry()
    try:
        began = time.perf_counter()
        commits, conflicts = in_threads(store, types, state_repository, threads, cycles)
        note_conflicts(
            request, f"{threads} threads x {cycles}", conflicts, time.perf_counter() - began
        )
        assert commits == threads * cycles
        assert_nothing_lost(store, types, state_repository, threads * cycles)
    finally:
        store.dispose()


@pytest.mark.stress
@pytest.mark.parametrize("server", SERVERS)
def test_processes_on_one_state_stored_aggregate_lose_nothing(
    server: str, backends: dict[str, Backend], request: pytest.FixtureRequest
) -> None:
    processes, cycles = 4, 200
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    backend = backends[server]
    store, types = new_store(backend, prefix), registry()
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=count_in_process,
            args=(backend.url, backend.namespace, prefix, cycles, start, results),
            name=f"writer-{n}",
        )
        for n in range(processes)
    ]
    try:
        began = time.perf_counter()
        for worker in workers:
            worker.start()
        reports = [results.get(timeout=JOIN_TIMEOUT) for _ in workers]
        seconds = time.perf_counter() - began
        for worker in workers:
            worker.join(JOIN_TIMEOUT)
        failures = [text for status, text, _ in reports if status == "error"]
        if failures:
            pytest.fail(
                "A writer process failed with an error other than ConcurrencyError:\n"
                + "\n".join(failures)
            )
        assert [worker.exitcode for worker in workers] == [0] * processes
        commits = sum(report[1] for report in reports)
        conflicts = sum(report[2] for report in reports)
        note_conflicts(request, f"{processes} processes x {cycles}", conflicts, seconds)
        assert commits == processes * cycles
        assert_nothing_lost(store, types, state_repository, processes * cycles)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        results.close()
        results.join_thread()
        store.dispose()


@pytest.mark.stress
@pytest.mark.parametrize("server", WITH_SQLITE)
def test_threads_on_one_event_sourced_aggregate_lose_nothing(
    server: str, backends: dict[str, Backend], request: pytest.FixtureRequest
) -> None:
    threads, cycles = 4, 50
    store, types = new_store(backends[server]), registry()
    try:
        began = time.perf_counter()
        commits, conflicts = in_threads(store, types, event_sourced_repository, threads, cycles)
        note_conflicts(
            request, f"{threads} threads x {cycles}", conflicts, time.perf_counter() - began
        )
        assert commits == threads * cycles
        assert_nothing_lost(store, types, event_sourced_repository, threads * cycles)
    finally:
        store.dispose()
