"""Persistence benchmarks: pybondi's SQL store against the raw driver doing the same work.

    python benchmarks/bench_persistence.py               # full run, 1 to 2 minutes
    python benchmarks/bench_persistence.py --quick       # smoke test, a few seconds
    python benchmarks/bench_persistence.py --show-sql    # also print pybondi's SQL
    python benchmarks/bench_persistence.py --breakdown   # also time P1 layer by layer

P1 (save) is one unit of work: load a state-stored aggregate by id, make one change that
publishes one event, commit. Its floor is the same rows written by hand with the same
driver (`sqlite3`, or psycopg 3 for PostgreSQL, sync and async) on one persistent
connection: the statements pybondi issues, in the same order, with the same parameters
and the same JSON. Before timing, the script records pybondi's statements with a
`before_cursor_execute` listener and checks that the floor issues the same sequence.

P2 (load) rebuilds an event-sourced aggregate from 1,000 events, in a session, without
snapshots and from a snapshot at event 1,000. Its floor is the raw driver reading the
stream's rows and `json.loads`-ing each event.

Each workload runs in rounds; a round times the floor and pybondi back to back (their
order alternating), so that a slow spell of a shared machine weighs on both. Results
are per unit of work, median and best over the rounds; the ratio divides pybondi's
median by the floor's median, measured in the same run. The garbage collector is paused
while a round runs, as `timeit` does. PostgreSQL tables live in a schema of this run's
own, dropped at the end; SQLite in a file in a temporary directory. A PostgreSQL server
that cannot be reached is reported and its rows skipped.

`--breakdown` adds P1 timed one layer of the stack at a time (raw driver, SQLAlchemy
Core, the pool, pybondi's store, the full session), in CPU and wall time, to show where
pybondi's share goes.

The script exits 0 whether or not targets are met, since it is a report; it fails only
if a sanity check does (the floor's statements or rows differing from pybondi's).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import re
import sqlite3
import statistics
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from time import perf_counter_ns, process_time_ns
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import pybondi
from pybondi import Aggregate, Event, Messagebus, Root, Session
from pybondi.persistence import Record, Records, SQLStore, StoredEvent
from pybondi.persistence.repositories import EventSourcedRepository, StateRepository
from pybondi.persistence.serialization import Registry

try:
    import psycopg
except ModuleNotFoundError:  # pragma: no cover - the postgres extra is not installed
    psycopg = None  # type: ignore[assignment]

POSTGRES_URL = os.environ.get("PYBONDI_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

P1_TARGET = 1.5
EVENTS = 1_000
SNAPSHOT_EVERY = 100

# The settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Rounds, and units of work per round, of each workload (after a warm-up)."""

    rounds: int
    warmup: int
    save_sqlite: int
    save_postgres: int
    load: int


@dataclass(frozen=True)
class Options:
    """What to run: the settings, and the optional extras."""

    settings: Settings
    show_sql: bool = False
    breakdown: bool = False


FULL = Settings(rounds=5, warmup=50, save_sqlite=100, save_postgres=300, load=20)
QUICK = Settings(rounds=2, warmup=3, save_sqlite=5, save_postgres=20, load=2)

# The domain: a tiny bank ----------------------------------------------------------------


@dataclass
class Deposited(Event):
    account: str
    amount: int


@dataclass(eq=False)
class Account(Aggregate):
    """State-stored: its fields are its stored document (kept the same size every run)."""

    root: Root
    owner: str
    balance: int = 0

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.root.publish(Deposited(self.root.id, amount))


class Ledger(Aggregate):
    """Event-sourced: rebuilt by applying its events to a blank one."""

    def __init__(self, id: str, balance: int = 0, applied: int = 0) -> None:
        self.root = Root(id)
        self.balance = balance
        self.applied = applied

    def deposit(self, amount: int) -> None:
        event = Deposited(self.root.id, amount)
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        self.applied += 1
        if isinstance(event, Deposited):
            self.balance += event.amount


ACCOUNT, DEPOSITED, LEDGER = "bank.Account", "bank.Deposited", "bank.Ledger"


def bank_registry() -> Registry:
    registry = Registry()
    registry.register(Account, name=ACCOUNT)
    registry.register(Deposited, name=DEPOSITED)
    registry.register(Ledger, name=LEDGER)
    return registry


def dumps(payload: dict[str, Any]) -> str:
    """JSON as pybondi's registry writes it: compact, UTF-8 kept as is."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


# The harness ----------------------------------------------------------------------------


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the collector out of the timed loop, as `timeit` does."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


Unit = Callable[[], object]
AsyncUnit = Callable[[], Awaitable[object]]


def time_units(unit: Unit, number: int) -> float:
    """Nanoseconds per unit of work, over `number` of them."""
    iterations = range(number)
    gc.collect()
    with gc_paused():
        start = perf_counter_ns()
        for _ in iterations:
            unit()
        return (perf_counter_ns() - start) / number


async def atime_units(unit: AsyncUnit, number: int) -> float:
    """Nanoseconds per awaited unit of work, over `number` of them."""
    iterations = range(number)
    gc.collect()
    with gc_paused():
        start = perf_counter_ns()
        for _ in iterations:
            await unit()
        return (perf_counter_ns() - start) / number


def rounds(units: Sequence[Unit], settings: Settings, number: int) -> list[list[float]]:
    """Per unit, ns per unit of work in each round; the order alternates round by round."""
    for unit in units:
        for _ in range(settings.warmup):
            unit()
    times: list[list[float]] = [[] for _ in units]
    for index in range(settings.rounds):
        order = list(range(len(units)))
        for position in order if index % 2 == 0 else reversed(order):
            times[position].append(time_units(units[position], number))
    return times


async def arounds(units: Sequence[AsyncUnit], settings: Settings, number: int) -> list[list[float]]:
    """`rounds` for async units of work, on the running event loop."""
    for unit in units:
        for _ in range(settings.warmup):
            await unit()
    times: list[list[float]] = [[] for _ in units]
    for index in range(settings.rounds):
        order = list(range(len(units)))
        for position in order if index % 2 == 0 else reversed(order):
            times[position].append(await atime_units(units[position], number))
    return times


# What pybondi sends, and checking the floor sends the same ------------------------------

_TABLE = re.compile(r"\bpybondi_(aggregates|events|log|snapshots)\b")


def shape(statement: str) -> str:
    """A statement's verb and table, e.g. 'UPDATE log RETURNING', to compare sequences."""
    words = statement.split()
    verb = words[0].upper()
    if verb in ("BEGIN", "COMMIT", "ROLLBACK"):
        return " ".join(words).upper()
    table = _TABLE.search(statement)
    returning = " RETURNING" if "RETURNING" in statement.upper() else ""
    return f"{verb} {table.group(1) if table else '?'}{returning}"


@dataclass
class Capture:
    """The SQL text of each statement sent through an engine, and each COMMIT."""

    statements: list[str] = field(default_factory=list)

    @property
    def shapes(self) -> list[str]:
        return [shape(statement) for statement in self.statements]


@contextmanager
def capturing(engine: Engine) -> Iterator[Capture]:
    """Record the statements an engine's connections send while the block runs."""
    capture = Capture()

    def on_execute(*args: Any) -> None:
        capture.statements.append(args[2])  # (conn, cursor, statement, parameters, ...)

    def on_commit(*args: Any) -> None:
        capture.statements.append("COMMIT")

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "commit", on_commit)
    try:
        yield capture
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)
        sa.event.remove(engine, "commit", on_commit)


def sync_engine(store: SQLStore) -> Engine:
    engine = store.engine
    return engine if isinstance(engine, Engine) else engine.sync_engine


def check_same(label: str, pybondi_shapes: list[str], floor_shapes: list[str]) -> None:
    if pybondi_shapes != floor_shapes:
        raise SystemExit(
            f"{label}: the floor does not issue pybondi's statements.\n"
            f"  pybondi: {pybondi_shapes}\n  floor:   {floor_shapes}\n"
            f"Update the floor's SQL in bench_persistence.py to match."
        )


def check(label: str, condition: bool, detail: str) -> None:
    if not condition:
        raise SystemExit(f"{label}: sanity check failed: {detail}")


# The floors: the same statements, by hand -----------------------------------------------


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Connection(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = (), /) -> _Cursor: ...

    def commit(self) -> None: ...


@dataclass(frozen=True)
class FloorSQL:
    """The statements pybondi sends on one backend, written out for the raw driver."""

    read: str
    begin_writes: str | None
    update: str
    advance: str | None  # None: the INSERT takes the next position itself (SQLite)
    append: str
    read_stream: str
    recorded_at: Callable[[], object]  # the value the driver gets for `recorded_at`

    @property
    def save_shapes(self) -> list[str]:
        begin = [] if self.begin_writes is None else [self.begin_writes]
        advance = [] if self.advance is None else [self.advance]
        statements = [self.read, *begin, self.update, *advance, self.append, "COMMIT"]
        return [shape(statement) for statement in statements]


def floor_sql(dialect: str, schema: str | None) -> FloorSQL:
    mark = "?" if dialect == "sqlite" else "%s"
    at = f"{schema}." if schema else ""
    aggregates, log, events = (f"{at}pybondi_{name}" for name in ("aggregates", "log", "events"))
    columns = "position, stream, version, type, type_version, data, recorded_at"
    # SQLite's one writer (BEGIN IMMEDIATE) lets the INSERT take max(position) + 1.
    following = f"SELECT coalesce(max(position), 0) + 1, {', '.join([mark] * 6)} FROM {events}"
    sqlite = dialect == "sqlite"

    def naive_utc() -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)

    def sqlite_text() -> str:  # what SQLAlchemy's SQLite DateTime binds: text
        return naive_utc().isoformat(" ", "microseconds")

    return FloorSQL(
        read=f"SELECT version, type_version, data FROM {aggregates} WHERE stream = {mark}",
        begin_writes="BEGIN IMMEDIATE" if sqlite else None,
        update=(
            f"UPDATE {aggregates} SET version = {mark}, type_version = {mark}, data = {mark} "
            f"WHERE stream = {mark} AND version = {mark}"
        ),
        advance=None
        if sqlite
        else f"UPDATE {log} SET position = position + {mark} WHERE id = {mark} RETURNING position",
        append=f"INSERT INTO {events} ({columns}) "
        + (following if sqlite else f"VALUES ({', '.join([mark] * 7)})"),
        read_stream=(
            f"SELECT {columns} FROM {events} WHERE stream = {mark} AND version > {mark} "
            f"ORDER BY version"
        ),
        recorded_at=sqlite_text if sqlite else naive_utc,
    )


def floor_save(connection: _Connection, sql: FloorSQL, id: str) -> None:
    """P1 by hand: read the row, deposit 1, write it with its version checked, log it."""
    stream = f"{ACCOUNT}-{id}"
    execute = connection.execute
    version, type_version, data = execute(sql.read, (stream,)).fetchone()
    state = json.loads(data)
    state["balance"] += 1
    if sql.begin_writes is not None:
        execute(sql.begin_writes)
    new = version + 1
    written = execute(sql.update, (new, type_version, dumps(state), stream, version))
    if written.rowcount != 1:
        raise RuntimeError(f"{stream} is no longer at version {version}")
    event = (stream, new, DEPOSITED, 1, dumps({"account": id, "amount": 1}), sql.recorded_at())
    if sql.advance is None:
        execute(sql.append, event)
    else:
        (position,) = execute(sql.advance, (1, 1)).fetchone()
        execute(sql.append, (position, *event))
    connection.commit()


async def one(cursor: psycopg.AsyncCursor[Any]) -> Any:
    row = await cursor.fetchone()
    assert row is not None
    return row


async def afloor_save(connection: psycopg.AsyncConnection[Any], sql: FloorSQL, id: str) -> None:
    """`floor_save` on psycopg's AsyncConnection."""
    stream = f"{ACCOUNT}-{id}"
    execute = connection.execute
    version, type_version, data = await one(await execute(sql.read, (stream,)))
    state = json.loads(data)
    state["balance"] += 1
    new = version + 1
    written = await execute(sql.update, (new, type_version, dumps(state), stream, version))
    if written.rowcount != 1:
        raise RuntimeError(f"{stream} is no longer at version {version}")
    assert sql.advance is not None  # PostgreSQL's
    (position,) = await one(await execute(sql.advance, (1, 1)))
    event = dumps({"account": id, "amount": 1})
    await execute(sql.append, (position, stream, new, DEPOSITED, 1, event, sql.recorded_at()))
    await connection.commit()


def floor_load(connection: _Connection, sql: FloorSQL, id: str) -> int:
    """P2 by hand: read the stream's events and parse each; return the balance."""
    rows = connection.execute(sql.read_stream, (f"{LEDGER}-{id}", 0)).fetchall()
    loads = json.loads
    balance = 0
    for row in rows:
        balance += loads(row[5])["amount"]
    connection.commit()
    return balance


# pybondi's units of work ----------------------------------------------------------------


def bondi_save(store: SQLStore, registry: Registry, id: str) -> None:
    with Session(Messagebus(), StateRepository(store, Account, registry)) as session:
        session.repository.get(id).deposit(1)


async def abondi_save(store: SQLStore, registry: Registry, id: str) -> None:
    async with Session(Messagebus(), StateRepository(store, Account, registry)) as session:
        (await session.repository.aget(id)).deposit(1)


def bondi_load(store: SQLStore, registry: Registry, id: str, snapshots: bool) -> Ledger:
    every = SNAPSHOT_EVERY if snapshots else None
    repository = EventSourcedRepository(store, Ledger, registry, snapshot_every=every)
    with Session(Messagebus(), repository) as session:
        ledger: Ledger = session.repository.get(id)
    return ledger


def open_accounts(store: SQLStore, registry: Registry, *ids: str) -> None:
    with Session(Messagebus(), StateRepository(store, Account, registry)) as session:
        for id in ids:
            session.add(Account(Root(id), "ada"))


def balance_of(store: SQLStore, registry: Registry, id: str) -> int:
    with Session(Messagebus(), StateRepository(store, Account, registry)) as session:
        account: Account = session.repository.get(id)
        return account.balance


# The breakdown: where P1's time goes, layer by layer -------------------------------------


def store_save(store: SQLStore, id: str) -> None:
    """P1 through pybondi's store interface: a transaction, its records, JSON by hand."""
    stream = f"{ACCOUNT}-{id}"

    def work(records: Records) -> None:
        record = records.read(stream)
        assert record is not None and record.data is not None
        state = json.loads(record.data)
        state["balance"] += 1
        new = record.version + 1
        records.write(Record(stream, new, record.schema, dumps(state)), record.version)
        records.append(
            [StoredEvent(stream, new, DEPOSITED, 1, dumps({"account": id, "amount": 1}))]
        )

    transaction = store.begin()
    try:
        transaction.run(work)
        transaction.commit()
    finally:
        transaction.close()


def registry_work(registry: Registry, document: str, id: str) -> None:
    """The registry's part of P1: load the state, dump it and the event."""
    account: Account = registry.loads(ACCOUNT, 1, document, id=id)
    registry.dumps(account)
    registry.dumps(Deposited(id, 1))


def breakdown(backend: Backend, store: SQLStore, settings: Settings, number: int) -> list[str]:
    """CPU and wall time per P1 session, adding one layer of pybondi's stack at a time."""
    registry, sql = bank_registry(), floor_sql(backend.dialect, backend.schema)
    ids = ("b-floor", "b-store", "b-bondi")
    open_accounts(store, registry, *ids)
    document = dumps({"owner": "ada", "balance": 1})
    connection = backend.connect()
    layers: list[tuple[str, Unit]] = [
        ("raw driver: the floor", lambda: floor_save(connection, sql, "b-floor")),
        ("+ pool, pybondi store: transaction, records", lambda: store_save(store, "b-store")),
        ("pybondi P1 session", lambda: bondi_save(store, registry, "b-bondi")),
        ("registry alone: loads + 2 dumps", lambda: registry_work(registry, document, "b-x")),
    ]
    try:
        for _, unit in layers:
            for _ in range(settings.warmup):
                unit()
        wall: list[list[float]] = [[] for _ in layers]
        cpu: list[list[float]] = [[] for _ in layers]
        for index in range(settings.rounds):
            order = list(range(len(layers)))
            for position in order if index % 2 == 0 else reversed(order):
                unit = layers[position][1]
                gc.collect()
                with gc_paused():
                    start, start_cpu = perf_counter_ns(), process_time_ns()
                    for _ in range(number):
                        unit()
                    wall[position].append((perf_counter_ns() - start) / number / 1e3)
                    cpu[position].append((process_time_ns() - start_cpu) / number / 1e3)
    finally:
        close(connection)
    cpus, walls = [min(times) for times in cpu], [min(times) for times in wall]
    rest = cpus[2] - cpus[1] - cpus[3]
    lines = [
        f"P1 breakdown on {backend.name}: us per session, best of {settings.rounds} rounds "
        f"(CPU time of this process; wall time in brackets)",
    ]
    lines.append(f"  {layers[0][0]:<44} {cpus[0]:8.0f} [{walls[0]:7.0f}]")
    step, wall_step = cpus[1] - cpus[0], walls[1] - walls[0]
    lines += [
        f"  {layers[1][0]:<44} {step:+8.0f} [{wall_step:+7.0f}]",
        f"  {'+ registry (timed alone)':<44} {cpus[3]:+8.0f}",
        f"  {'+ repository, session, messagebus, publisher':<44} {rest:+8.0f}",
        f"  {'= ' + layers[2][0]:<44} {cpus[2]:8.0f} [{walls[2]:7.0f}]",
    ]
    return lines


# Results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: pybondi against its floor, per unit of work."""

    backend: str
    workload: str
    floor: list[float]  # ns per unit of work, one per round
    bondi: list[float]
    target: float | None = None
    statements: int | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.bondi) / statistics.median(self.floor)

    @property
    def best_ratio(self) -> float:
        return min(self.bondi) / min(self.floor)

    @property
    def added(self) -> float:
        """What pybondi adds, in ns: the median of the rounds' differences."""
        return statistics.median(b - f for b, f in zip(self.bondi, self.floor, strict=True))

    @property
    def status(self) -> str:
        if self.target is None:
            return "report"
        return "PASS" if self.ratio <= self.target else "over"


def microseconds(times: list[float]) -> str:
    return f"{statistics.median(times) / 1e3:8.1f} ({min(times) / 1e3:7.1f})"


def table(rows: list[Row]) -> list[str]:
    width = max(len(row.workload) for row in rows)
    head = (
        f"{'backend':<10} {'workload':<{width}}  {'floor us med (min)':>18}  "
        f"{'pybondi us med (min)':>20}  {'added us':>8}  {'ratio':>5}  {'(min)':>5}  "
        f"{'target':>6}  {'status':<6}  stmts"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        target = "-" if row.target is None else f"<={row.target:g}"
        statements = "-" if row.statements is None else str(row.statements)
        lines.append(
            f"{row.backend:<10} {row.workload:<{width}}  {microseconds(row.floor):>18}  "
            f"{microseconds(row.bondi):>20}  {row.added / 1e3:>+8.0f}  {row.ratio:>5.2f}  "
            f"{row.best_ratio:>5.2f}  "
            f"{target:>6}  {row.status:<6}  {statements}"
        )
    return lines


# The workloads, backend by backend ------------------------------------------------------


@dataclass
class Backend:
    """One database: its SQLAlchemy URL, how to open a raw connection, where the tables are."""

    name: str
    url: str
    connect: Callable[[], _Connection]
    schema: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.name == "SQLite" else "postgresql"

    def store(self, asynchronous: bool = False) -> SQLStore:
        return SQLStore(self.url, asynchronous=asynchronous, schema=self.schema)


def p1_number(backend: Backend, settings: Settings) -> int:
    return settings.save_sqlite if backend.dialect == "sqlite" else settings.save_postgres


def p1_save(backend: Backend, store: SQLStore, options: Options) -> Row:
    settings = options.settings
    registry, sql = bank_registry(), floor_sql(backend.dialect, backend.schema)
    open_accounts(store, registry, "a-bondi", "a-floor")
    connection = backend.connect()
    try:
        bondi_save(store, registry, "a-bondi")  # the first pass compiles and caches
        with capturing(sync_engine(store)) as capture:
            bondi_save(store, registry, "a-bondi")
        check_same(f"P1 save on {backend.name}", capture.shapes, sql.save_shapes)
        describe(backend, "P1", capture, options.show_sql)
        number = p1_number(backend, settings)
        floor, bondi = rounds(
            [
                lambda: floor_save(connection, sql, "a-floor"),
                lambda: bondi_save(store, registry, "a-bondi"),
            ],
            settings,
            number,
        )
        # The floor's rows must be what pybondi writes: it reads them back as its own.
        sessions = settings.warmup + settings.rounds * number
        for id, expected in (("a-bondi", sessions + 2), ("a-floor", sessions)):
            balance = balance_of(store, registry, id)
            check("P1 save", balance == expected, f"{id} has {balance}, expected {expected}")
        log = store.read_log(0, 1_000_000)
        positions = [event.position for event in log]
        check("P1 save", positions == list(range(1, len(log) + 1)), "the log has gaps")
        last = {event.stream: event for event in log}
        mine, theirs = last[f"{ACCOUNT}-a-bondi"], last[f"{ACCOUNT}-a-floor"]
        check("P1 save", mine.data == dumps({"account": "a-bondi", "amount": 1}), mine.data)
        check("P1 save", theirs.data == dumps({"account": "a-floor", "amount": 1}), theirs.data)
        check("P1 save", (theirs.type, theirs.version) == (DEPOSITED, sessions + 1), "version")
    finally:
        close(connection)
    return Row(backend.name, "P1 save", floor, bondi, P1_TARGET, len(capture.statements))


def describe(backend: Backend, workload: str, capture: Capture, show_sql: bool) -> None:
    extra = " (+ the BEGIN psycopg sends before the first)" if backend.dialect != "sqlite" else ""
    backend.notes.append(
        f"{workload} statements per session on {backend.name}: {len(capture.statements)}{extra}"
        f" = {', '.join(capture.shapes)}"
    )
    if show_sql:
        for statement in capture.statements:
            print(f"  [{backend.name} {workload}] {' '.join(statement.split())}", flush=True)


def close(connection: _Connection) -> None:
    closer = getattr(connection, "close", None)
    if closer is not None:
        closer()


def p2_load(backend: Backend, store: SQLStore, settings: Settings) -> list[Row]:
    registry, sql = bank_registry(), floor_sql(backend.dialect, backend.schema)
    writer = EventSourcedRepository(store, Ledger, registry, snapshot_every=SNAPSHOT_EVERY)
    with Session(Messagebus(), writer) as session:
        ledger = Ledger("L-1")
        session.add(ledger)
        for _ in range(EVENTS):
            ledger.deposit(1)
    connection = backend.connect()
    try:
        check("P2 floor", floor_load(connection, sql, "L-1") == EVENTS, "balance")
        for snapshots in (False, True):
            loaded = bondi_load(store, registry, "L-1", snapshots)
            check("P2 load", (loaded.balance, loaded.applied) == (EVENTS, EVENTS), "balance")
        floor, plain, snapshot = rounds(
            [
                lambda: floor_load(connection, sql, "L-1"),
                lambda: bondi_load(store, registry, "L-1", False),
                lambda: bondi_load(store, registry, "L-1", True),
            ],
            settings,
            settings.load,
        )
    finally:
        close(connection)
    return [
        Row(backend.name, f"P2 load {EVENTS:,} events", floor, plain),
        Row(backend.name, f"P2 load, snapshot at {EVENTS:,}", floor, snapshot),
    ]


async def p1_async_save(backend: Backend, options: Options, raw_url: str) -> Row:
    assert psycopg is not None
    settings = options.settings
    registry, sql = bank_registry(), floor_sql(backend.dialect, backend.schema)
    store = backend.store(asynchronous=True)
    connection = await psycopg.AsyncConnection.connect(raw_url)
    try:
        await store.acreate_tables()
        async with Session(Messagebus(), StateRepository(store, Account, registry)) as session:
            for id in ("a-async-bondi", "a-async-floor"):
                session.add(Account(Root(id), "ada"))
        await abondi_save(store, registry, "a-async-bondi")
        with capturing(sync_engine(store)) as capture:
            await abondi_save(store, registry, "a-async-bondi")
        check_same(f"P1 async save on {backend.name}", capture.shapes, sql.save_shapes)
        describe(backend, "P1 async", capture, options.show_sql)
        floor, bondi = await arounds(
            [
                lambda: afloor_save(connection, sql, "a-async-floor"),
                lambda: abondi_save(store, registry, "a-async-bondi"),
            ],
            settings,
            settings.save_postgres,
        )
    finally:
        await connection.close()
        await store.adispose()
    return Row(backend.name, "P1 async save", floor, bondi, None, len(capture.statements))


def run_backend(backend: Backend, options: Options) -> list[Row]:
    store = backend.store()
    try:
        store.create_tables()
        rows = [p1_save(backend, store, options)]
        print(f"  {backend.name}: P1 done", flush=True)
        rows += p2_load(backend, store, options.settings)
        print(f"  {backend.name}: P2 done", flush=True)
        if options.breakdown:
            number = p1_number(backend, options.settings)
            backend.notes += breakdown(backend, store, options.settings, number)
            print(f"  {backend.name}: P1 breakdown done", flush=True)
        return rows
    finally:
        store.dispose()


def sqlite_rows(options: Options) -> tuple[list[Row], list[str]]:
    with tempfile.TemporaryDirectory(prefix="pybondi_bench_") as directory:
        path = Path(directory) / "bench.db"

        def connect() -> _Connection:
            return sqlite3.connect(path, isolation_level=None)  # as pybondi sets it up

        backend = Backend("SQLite", f"sqlite:///{path}", connect)
        return run_backend(backend, options), backend.notes


def postgres_rows(options: Options) -> tuple[list[Row], list[str]]:
    if psycopg is None:
        return [], [
            "PostgreSQL skipped: psycopg is not installed (pip install 'pybondi[postgres]')"
        ]
    url = sa.make_url(POSTGRES_URL)
    raw_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"pybondi_bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(raw_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as error:
        reason = " ".join(str(error).split())
        return [], [f"PostgreSQL skipped: not reachable at {url.render_as_string()} ({reason})"]

    def connect() -> _Connection:
        return psycopg.connect(raw_url)

    backend = Backend("PostgreSQL", POSTGRES_URL, connect, schema)
    try:
        rows = run_backend(backend, options)
        rows.insert(1, asyncio.run(p1_async_save(backend, options, raw_url)))
        print("  PostgreSQL: P1 async done", flush=True)
        return rows, backend.notes
    finally:
        with psycopg.connect(raw_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def header(settings: Settings) -> list[str]:
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.machine()}, {platform.system()})",
        f"pybondi {pybondi.__version__} from {Path(pybondi.__file__).parent}",
        f"SQLAlchemy {sa.__version__}, psycopg "
        f"{version('psycopg') if psycopg is not None else '-'}, SQLite {sqlite3.sqlite_version}",
        f"{settings.rounds} interleaved rounds after {settings.warmup} warm-up units; P1: "
        f"{settings.save_postgres} (PostgreSQL) / {settings.save_sqlite} (SQLite) sessions "
        f"per round, P2: {settings.load} loads per round",
    ]


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run, for a smoke test")
    parser.add_argument("--show-sql", action="store_true", help="print pybondi's statements")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time P1 one layer of the stack at a time"
    )
    arguments = parser.parse_args(argv)
    settings = QUICK if arguments.quick else FULL
    return Options(settings, arguments.show_sql, arguments.breakdown)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    print("\n".join(header(options.settings)), flush=True)
    rows, notes = sqlite_rows(options)
    postgres, postgres_notes = postgres_rows(options)
    rows += postgres
    notes += postgres_notes
    print()
    print("\n".join(table(rows)))
    print()
    print("\n".join(notes))
    print(
        "ratio = pybondi median / floor median; (min) = best / best; added = median of the "
        "rounds' differences. P2 rows compare with the no-snapshot floor."
    )
    over = [f"{row.workload} on {row.backend}" for row in rows if row.status == "over"]
    print(f"over target: {', '.join(over)}" if over else "all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
