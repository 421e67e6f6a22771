"""Projection throughput: pybondi's runner beside eventsourcing's, same work, same run.

    .venv-bench/bin/python benchmarks/bench_projections.py            # a few minutes
    .venv-bench/bin/python benchmarks/bench_projections.py --quick    # smoke test

Both project the same events, `Deposited(account, amount)` over 50 accounts, into a
balance table (`account` primary key, `balance`), one upsert per event with the same
SQL, on SQLite (a file each, in WAL mode, as eventsourcing sets it) and PostgreSQL (a
schema each). The events are written beforehand, untimed. Timed: from the runner's
construction until the view has handled the last event.

- pybondi: `ProjectionRunner(projection, SQLStore(url)).catch_up()` with a sync handler
  that upserts through `Depends(current_connection)` (`connection.execute(text, ...)`),
  `batch_size` events per transaction with the checkpoint.
- eventsourcing: `ProjectionRunner(application_class=..., projection_class=...,
  view_class=...)`, its view a `SQLiteTrackingRecorder` / `PostgresTrackingRecorder`
  whose method upserts and records the tracking row in one transaction per event, as
  its documentation shows; its subscription reads only the `Deposited` topic. The end
  is found by polling `max_tracking_id` every 5 ms (its `wait` backs off to 0.8 s).

Rounds alternate the two sides; each round starts from new tables. The table gives
events per second (median over the rounds) and the ratio pybondi / eventsourcing. The
script needs eventsourcing, installed only in the benchmark's venv (`make bench` makes
it); PostgreSQL comes from PYBONDI_POSTGRES_URL, and is skipped if unreachable.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pybondi import Depends, Event, current_connection
from pybondi.persistence import Records, SQLStore, StoredEvent
from pybondi.persistence.serialization import Registry
from pybondi.projection import Projection, ProjectionRunner

POSTGRES_URL = os.environ.get("PYBONDI_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ACCOUNTS = 50
BATCH_SIZE = 100

UPSERT = (
    "INSERT INTO {table} (account, balance) VALUES ({a}, {b}) ON CONFLICT (account) "
    "DO UPDATE SET balance = {table}.balance + excluded.balance"
)
CREATE = "CREATE TABLE IF NOT EXISTS {table} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)"

registry = Registry()


@registry.register(name="bench.Deposited")
@dataclass(frozen=True)
class Deposited(Event):
    account: str
    amount: int


# pybondi --------------------------------------------------------------------------------


def pybondi_run(url: str, schema: str | None, events: int) -> float:
    """Events per second of pybondi's runner over `events` new events."""
    prefix = f"b{uuid.uuid4().hex[:8]}_"
    store = SQLStore(url, schema=schema, prefix=prefix)
    store.create_tables()
    table = f"{schema + '.' if schema else ''}{prefix}balances"
    assert isinstance(store.engine, sa.Engine)
    with store.engine.begin() as connection:
        connection.exec_driver_sql(CREATE.format(table=table))
    rows = []
    for n in range(events):
        data = registry.dumps(Deposited(f"account-{n % ACCOUNTS}", 1)).data
        rows.append(StoredEvent(f"account-{n % ACCOUNTS}", n + 1, "bench.Deposited", 1, data))
    for start in range(0, events, 1000):
        store.transact(partial(append, rows[start : start + 1000]))
    upsert = sa.text(UPSERT.format(table=table, a=":account", b=":amount"))
    projection = Projection(f"balances-{prefix}", registry)

    @projection.on
    def deposited(event: Deposited, connection: Any = Depends(current_connection)) -> None:
        connection.execute(upsert, {"account": event.account, "amount": event.amount})

    started = time.perf_counter()
    runner = ProjectionRunner(projection, store, batch_size=BATCH_SIZE)
    handled = runner.catch_up()
    elapsed = time.perf_counter() - started
    with store.engine.connect() as connection:
        total = connection.exec_driver_sql(f"SELECT sum(balance) FROM {table}").scalar()
    assert handled == events and total == events, (handled, total)
    store.dispose()
    return events / elapsed


def append(rows: list[StoredEvent], records: Records) -> None:
    records.append(rows)


# eventsourcing --------------------------------------------------------------------------


def eventsourcing_run(backend: str, where: str, events: int) -> float:
    """Events per second of eventsourcing's runner over `events` new events."""
    application = importlib.import_module("eventsourcing.application")
    projection_module = importlib.import_module("eventsourcing.projection")
    dispatch = importlib.import_module("eventsourcing.dispatch")
    utils = importlib.import_module("eventsourcing.utils")
    recorders = importlib.import_module(f"eventsourcing.{backend}")
    name = f"e{uuid.uuid4().hex[:8]}"

    Account = account_class()
    bank_class: Any = type(f"Bank{name}", (application.Application,), {})
    table = f"{name}_balances"
    if backend == "sqlite":
        base: Any = recorders.SQLiteTrackingRecorder
        upsert = UPSERT.format(table=table, a="?", b="?")

        class View(base):  # type: ignore[misc]
            def construct_create_table_statements(self) -> list[str]:
                return [*super().construct_create_table_statements(), CREATE.format(table=table)]

            def deposit(self, account: str, amount: int, tracking: Any) -> None:
                with self.datastore.transaction(commit=True) as cursor:
                    cursor.execute(upsert, (account, amount))
                    self._insert_tracking(cursor, tracking)

        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": where}
    else:
        base = recorders.PostgresTrackingRecorder
        qualified = f"{where}.{table}"
        upsert = UPSERT.format(table=qualified, a="%s", b="%s")

        class View(base):  # type: ignore[no-redef, misc]
            def __init__(self, datastore: Any, **options: Any) -> None:
                super().__init__(datastore, **options)
                sql = importlib.import_module("psycopg.sql")
                self.sql_create_statements.append(sql.SQL(CREATE.format(table=qualified)))

            def deposit(self, account: str, amount: int, tracking: Any) -> None:
                with self.datastore.transaction(commit=True) as cursor:
                    cursor.execute(upsert, (account, amount), prepare=True)
                    self._insert_tracking(cursor, tracking)

        url = sa.make_url(POSTGRES_URL)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.database or "test",
            "POSTGRES_HOST": url.host or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_SCHEMA": where,
        }
    deposited_topic = utils.get_topic(Account.Deposited)

    projection_base: Any = projection_module.Projection
    projection_name = f"balances{name}"

    class Balances(projection_base):  # type: ignore[misc]
        name = projection_name
        topics = (deposited_topic,)

        @dispatch.singledispatchmethod  # type: ignore[untyped-decorator]
        def process_event(self, domain_event: Any, tracking: Any) -> None:
            pass

        def deposited(self, domain_event: Any, tracking: Any) -> None:
            self.view.deposit(str(domain_event.originator_id), domain_event.amount, tracking)

        process_event.register(Account.Deposited, deposited)

    bank = bank_class(env=env)
    accounts = [Account() for _ in range(ACCOUNTS)]
    for n in range(events):
        accounts[n % ACCOUNTS].deposit(1)
    bank.save(*accounts)
    last = bank.recorder.max_notification_id()
    bank.close()

    started = time.perf_counter()
    if backend == "sqlite":
        follow_without_subscription(bank_class, Balances, View, env, last)
    else:
        runner = projection_module.ProjectionRunner(
            application_class=bank_class, projection_class=Balances, view_class=View, env=env
        )
        with runner:
            while (runner.view.max_tracking_id(bank_class.name) or 0) < last:
                runner.run_forever(timeout=0.005)  # raises the runner's error, if any
    elapsed = time.perf_counter() - started
    return events / elapsed


@functools.cache
def account_class() -> Any:
    """eventsourcing's aggregate, made once: its event classes are registered by topic."""
    domain = importlib.import_module("eventsourcing.domain")

    aggregate: Any = domain.Aggregate

    class Account(aggregate):  # type: ignore[misc]
        def __init__(self) -> None:
            self.balance = 0

        @domain.event("Deposited")  # type: ignore[untyped-decorator]
        def deposit(self, amount: int) -> None:
            self.balance += amount

    return Account


def follow_without_subscription(
    bank_class: Any, projection_class: Any, view_class: Any, env: dict[str, str], last: int
) -> None:
    """What eventsourcing's ProjectionRunner does, with a loop for its subscription.

    Its SQLite recorder has no subscriptions (the runner raises NotImplementedError), so
    the same view and projection are driven by a loop over `select_notifications`,
    pages of 100 of the projection's topics from the view's last tracking id, each event
    mapped and processed as the runner's subscription would.
    """
    persistence = importlib.import_module("eventsourcing.persistence")
    projection_module = importlib.import_module("eventsourcing.projection")
    bank = bank_class(env=env)
    factory = persistence.InfrastructureFactory.construct(
        env=projection_module.ProjectionRunner._construct_env(projection_class.name, env)
    )
    view = factory.tracking_recorder(view_class)
    projection = projection_class(view=view)
    position = view.max_tracking_id(bank.name) or 0
    while position < last:
        notifications = bank.recorder.select_notifications(
            position, 100, topics=projection.topics, inclusive_of_start=False
        )
        for notification in notifications:
            tracking = persistence.Tracking(bank.name, notification.id)
            projection.process_event(bank.mapper.to_domain_event(notification), tracking)
            position = notification.id
    bank.close()


# The run --------------------------------------------------------------------------------


def postgres_schema(statement: str) -> None:
    engine = sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as connection:
        connection.exec_driver_sql(statement)
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few events, 1 round")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    events, rounds = (300, 1) if options.quick else (options.events, options.rounds)
    print(
        f"pybondi {version('pybondi')} vs eventsourcing {version('eventsourcing')}; Python "
        f"{sys.version.split()[0]}, SQLAlchemy {version('sqlalchemy')}, psycopg "
        f"{version('psycopg')}, SQLite {sqlite3.sqlite_version}; {events} events over "
        f"{ACCOUNTS} accounts, pybondi batch_size={BATCH_SIZE}, {rounds} round(s)"
    )
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as folder:

        def sqlite_pair(turn: int) -> tuple[float, float]:
            ours = Path(folder) / f"pybondi{turn}.db"
            with sqlite3.connect(ours) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
            theirs = str(Path(folder) / f"eventsourcing{turn}.db")
            if turn % 2:
                return pybondi_run(f"sqlite:///{ours}", None, events), eventsourcing_run(
                    "sqlite", theirs, events
                )
            theirs_rate = eventsourcing_run("sqlite", theirs, events)
            return pybondi_run(f"sqlite:///{ours}", None, events), theirs_rate

        results["SQLite"] = run_rounds(rounds, sqlite_pair)
    schema = f"pybondi_bench_{uuid.uuid4().hex[:8]}"
    try:
        postgres_schema(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError as error:
        print(f"skipped: PostgreSQL not reachable at {POSTGRES_URL} ({error.orig})")
    else:
        try:

            def postgres_pair(turn: int) -> tuple[float, float]:
                if turn % 2:
                    ours = pybondi_run(POSTGRES_URL, schema, events)
                    return ours, eventsourcing_run("postgres", schema, events)
                theirs = eventsourcing_run("postgres", schema, events)
                return pybondi_run(POSTGRES_URL, schema, events), theirs

            results["PostgreSQL"] = run_rounds(rounds, postgres_pair)
        finally:
            postgres_schema(f"DROP SCHEMA {schema} CASCADE")
    print(f"\n{'backend':<11} {'pybondi ev/s':>13} {'eventsourcing ev/s':>19} {'ratio':>7}")
    for backend, rates in results.items():
        ours, theirs = statistics.median(rates["pybondi"]), statistics.median(rates["es"])
        print(f"{backend:<11} {ours:>13,.0f} {theirs:>19,.0f} {ours / theirs:>7.2f}")
    return 0


def run_rounds(rounds: int, pair: Any) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"pybondi": [], "es": []}
    for turn in range(rounds):
        ours, theirs = pair(turn)
        rates["pybondi"].append(ours)
        rates["es"].append(theirs)
        print(f"  round {turn + 1}: pybondi {ours:,.0f} ev/s, eventsourcing {theirs:,.0f} ev/s")
    return rates


if __name__ == "__main__":
    sys.exit(main())
