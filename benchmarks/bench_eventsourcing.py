"""Event-sourced saves on a SQLite file: pybondi beside eventsourcing, same work, same run.

    .venv-bench/bin/python benchmarks/bench_eventsourcing.py           # about a minute
    .venv-bench/bin/python benchmarks/bench_eventsourcing.py --quick   # smoke test

Each side has its own SQLite file in one temporary directory, in WAL mode (pybondi's
`SQLStore` default; eventsourcing switches every file database to it), with SQLite's
default `synchronous=FULL` on both: the settings each side's own connection reports are
printed. The aggregate is a bank account opened by a creation event, whose `deposit(1)`
records one `Deposited` event.

- E1, create + 1 command: a new account is saved (its creation event); then it is
  loaded, `deposit(1)` is applied, and the result saved. pybondi: two sessions on an
  `EventSourcedRepository`, `session.add(Account(id))`, then
  `session.repository.get(id).deposit(1)`. eventsourcing: `app.save(Account())`,
  `app.repository.get(id)`, `deposit(1)`, `app.save(account)`.
- E2, 1 command on an existing aggregate: an account opened beforehand (untimed, one
  event) is loaded, `deposit(1)` applied, and saved: pybondi's one session, and
  eventsourcing's `get`, `deposit`, `save`. Each unit takes another account, so every
  load reads the same one-event stream.

Rounds alternate which side goes first; each round times `units` of each, after a
warm-up. The table gives µs per unit (median and best round) and the ratio pybondi /
eventsourcing of the medians (and of the best rounds). eventsourcing is imported with
`importlib`, from the benchmark's venv only (`make bench` makes it): it is never a
dependency of pybondi's.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from pybondi import Aggregate, Event, Messagebus, Root, Session
from pybondi.persistence import SQLStore
from pybondi.persistence.repositories import EventSourcedRepository
from pybondi.persistence.serialization import Registry

# pybondi's side ---------------------------------------------------------------------------


@dataclass
class Opened(Event):
    account: str


@dataclass
class Deposited(Event):
    account: str
    amount: int


class Account(Aggregate):
    """Event-sourced: `Account(id)` is blank; `open(id)` makes one and records `Opened`."""

    def __init__(self, id: str) -> None:
        self.root = Root(id)
        self.balance = 0

    @classmethod
    def open(cls, id: str) -> Account:
        account = cls(id)
        account.record(Opened(id))
        return account

    def deposit(self, amount: int) -> None:
        self.record(Deposited(self.root.id, amount))

    def record(self, event: Event) -> None:
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        if isinstance(event, Deposited):
            self.balance += event.amount


def bank_registry() -> Registry:
    registry = Registry()
    registry.register(Opened, name="bank.Opened")
    registry.register(Deposited, name="bank.Deposited")
    return registry


class Bondi:
    """pybondi's units of work on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.store = SQLStore(f"sqlite:///{path}")
        self.store.create_tables()
        self.registry = bank_registry()
        self.bus = Messagebus()
        self.count = 0

    def repository(self) -> EventSourcedRepository[Account]:
        return EventSourcedRepository(self.store, Account, self.registry, name="bank.Account")

    def create(self) -> str:
        self.count += 1
        id = f"acc-{self.count}"
        with Session(self.bus, self.repository()) as session:
            session.add(Account.open(id))
        return id

    def command(self, id: str) -> None:
        with Session(self.bus, self.repository()) as session:
            account: Account = session.repository.get(id)
            account.deposit(1)

    def create_and_command(self) -> None:
        self.command(self.create())

    def balance(self, id: str) -> int:
        with Session(self.bus, self.repository()) as session:
            account: Account = session.repository.get(id)
            return account.balance

    def settings(self) -> str:
        engine = self.store.engine
        assert isinstance(engine, sa.Engine)
        with engine.connect() as connection:
            journal = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
            synchronous = connection.exec_driver_sql("PRAGMA synchronous").scalar()
        return describe(journal, synchronous)


# eventsourcing's side ---------------------------------------------------------------------


def es_account_class() -> Any:
    """eventsourcing's aggregate: created with an event; `deposit` records `Deposited`."""
    domain = importlib.import_module("eventsourcing.domain")
    aggregate: Any = domain.Aggregate

    class EsAccount(aggregate):  # type: ignore[misc]
        def __init__(self) -> None:
            self.balance = 0

        @domain.event("Deposited")  # type: ignore[untyped-decorator]
        def deposit(self, amount: int) -> None:
            self.balance += amount

    return EsAccount


class Es:
    """eventsourcing's `Application` on one SQLite file."""

    def __init__(self, path: Path) -> None:
        application = importlib.import_module("eventsourcing.application")
        self.account_class = es_account_class()
        env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
        self.app: Any = application.Application(env=env)

    def create(self) -> Any:
        account = self.account_class()
        self.app.save(account)
        return account.id

    def command(self, id: Any) -> None:
        account = self.app.repository.get(id)
        account.deposit(1)
        self.app.save(account)

    def create_and_command(self) -> None:
        self.command(self.create())

    def balance(self, id: Any) -> int:
        return int(self.app.repository.get(id).balance)

    def settings(self) -> str:
        with self.app.recorder.datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA journal_mode")
            journal = cursor.fetchone()[0]
            cursor.execute("PRAGMA synchronous")
            synchronous = cursor.fetchone()[0]
        return describe(journal, synchronous)

    def close(self) -> None:
        self.app.close()


SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def describe(journal: object, synchronous: object) -> str:
    level = SYNCHRONOUS.get(int(str(synchronous)), str(synchronous))
    return f"journal_mode={journal}, synchronous={level}"


# Timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int
    units: int
    warmup: int


FULL = Settings(rounds=11, units=200, warmup=100)
QUICK = Settings(rounds=2, units=20, warmup=10)


def timed(units: list[Callable[[], object]]) -> float:
    """µs per unit, over the given units, with the collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for unit in units:
            unit()
        return (time.perf_counter_ns() - start) / len(units) / 1000
    finally:
        if enabled:
            gc.enable()


def interleave(
    make_ours: Callable[[], list[Callable[[], object]]],
    make_theirs: Callable[[], list[Callable[[], object]]],
    settings: Settings,
) -> tuple[list[float], list[float]]:
    """Per side, the µs per unit of each round; the rounds alternate who goes first."""
    ours: list[float] = []
    theirs: list[float] = []
    for turn in range(settings.rounds):
        gc.collect()
        mine, others = make_ours(), make_theirs()  # untimed: the accounts E2 needs
        if turn % 2:
            theirs.append(timed(others))
            ours.append(timed(mine))
        else:
            ours.append(timed(mine))
            theirs.append(timed(others))
    return ours, theirs


def row(name: str, ours: list[float], theirs: list[float], target: float) -> str:
    ratio = statistics.median(ours) / statistics.median(theirs)
    best = min(ours) / min(theirs)
    verdict = "PASS" if ratio <= target else "over"
    return (
        f"{name:<34} {statistics.median(ours):>8.0f} {min(ours):>8.0f} "
        f"{statistics.median(theirs):>8.0f} {min(theirs):>8.0f} {ratio:>6.2f} {best:>6.2f} "
        f"{'<= ' + format(target, 'g'):>7} {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 short rounds")
    settings = QUICK if parser.parse_args(argv).quick else FULL
    print(
        f"pybondi {version('pybondi')} vs eventsourcing {version('eventsourcing')}; Python "
        f"{sys.version.split()[0]}, SQLAlchemy {version('sqlalchemy')}, SQLite "
        f"{sqlite3.sqlite_version}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{settings.rounds} interleaved rounds of {settings.units} units per side, "
        f"after {settings.warmup} warm-up units"
    )
    with tempfile.TemporaryDirectory() as folder:
        bondi, es = Bondi(Path(folder) / "pybondi.db"), Es(Path(folder) / "eventsourcing.db")
        try:
            print(f"  pybondi:       {bondi.settings()}")
            print(f"  eventsourcing: {es.settings()}")
            rows = measure(bondi, es, settings)
        finally:
            es.close()
            bondi.store.engine.dispose()
    print(f"\n(load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
    header = (
        f"{'workload, µs per unit':<34} {'pybondi':>8} {'(best)':>8} {'es':>8} {'(best)':>8} "
        f"{'ratio':>6} {'(best)':>6} {'target':>7}"
    )
    print(f"\n{header}\n{'-' * len(header)}")
    print("\n".join(rows))
    return 0


def measure(bondi: Bondi, es: Es, settings: Settings) -> list[str]:
    for _ in range(settings.warmup):
        bondi.create_and_command()
        es.create_and_command()
    check(bondi, es)
    ours1, theirs1 = interleave(
        lambda: [bondi.create_and_command] * settings.units,
        lambda: [es.create_and_command] * settings.units,
        settings,
    )

    def existing(side: Bondi | Es) -> list[Callable[[], object]]:
        ids = [side.create() for _ in range(settings.units)]
        return [lambda id=id: side.command(id) for id in ids]  # type: ignore[misc]

    ours2, theirs2 = interleave(lambda: existing(bondi), lambda: existing(es), settings)
    return [
        row("E1 create + 1 command", ours1, theirs1, 1.0),
        row("E2 1 command, existing aggregate", ours2, theirs2, 0.9),
    ]


def check(bondi: Bondi, es: Es) -> None:
    """Both sides must store what they claim: a created account takes deposits."""
    ours, theirs = bondi.create(), es.create()
    for _ in range(3):
        bondi.command(ours)
        es.command(theirs)
    if (bondi.balance(ours), es.balance(theirs)) != (3, 3):
        raise SystemExit(f"check failed: balances {bondi.balance(ours)}, {es.balance(theirs)}")


if __name__ == "__main__":
    sys.exit(main())
