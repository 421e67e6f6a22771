"""bench_core.py's W5L on whichever pybondi this interpreter imports: 1.2.1, in its venv.

    .venv-bench-121/bin/python benchmarks/session_121.py   # driven by bench_core.py

pybondi 1.2.1 has the same import name as pybondi, so bench_core.py runs it in a venv of
its own (`make .venv-bench-121/.installed-pybondi-1.2.1`) as this script, a subprocess it
keeps for the whole run and asks for one timing at a time, between its own workloads'
timings, so that the rounds interleave. The protocol is one line each way:

    check            -> "ok <python version> <pybondi version> <path>"  (or exits with an error)
    w5l <number>     -> ns taken by <number> W5L units, loop included
    floor <number>   -> ns taken by <number> calls of echo(x), the floor of this interpreter

W5L is the seed README's session: a new aggregate, `session.add`, `session.execute` of a
command whose handler makes the root publish one event with one handler, and the commit,
with a handler on `Added` and one on `Commited`. Handlers return their argument.
The script is written against 1.2.1's API (`Session(messagebus=..., publisher=...,
repository=...)`: 1.2.1's positional order is messagebus, publisher, repository), which
pybondi keeps, so it also runs, and type-checks, against pybondi.
"""

from __future__ import annotations

import gc
import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import pybondi
from pybondi.aggregate import Aggregate, Root
from pybondi.events import Added, Commited
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import Publisher
from pybondi.repository import Repository
from pybondi.session import Session


class Account(Aggregate):
    def __init__(self, id: str) -> None:
        self.root = Root(id)


@dataclass
class Deposit(Command):
    account: Account


class Deposited(Event):
    pass


calls: dict[str, int] = {"added": 0, "deposit": 0, "deposited": 0, "committed": 0}


def on_added(event: Any) -> Any:
    return event


def deposit(command: Deposit) -> None:
    command.account.root.publish(Deposited())


def on_deposited(event: Deposited) -> Deposited:
    return event


def on_committed(event: Any) -> Any:
    return event


def lifecycle_bus() -> Messagebus:
    bus = Messagebus()
    bus.on(Added)(on_added)
    bus.register(Deposit)(deposit)
    bus.on(Deposited)(on_deposited)
    bus.on(Commited)(on_committed)
    return bus


def w5l_unit(bus: Messagebus, publisher: Publisher) -> Callable[[int], None]:
    def unit(index: int) -> None:
        account = Account("a-1")
        with Session(messagebus=bus, publisher=publisher, repository=Repository()) as session:
            session.add(account)
            session.execute(Deposit(account))

    return unit


def echo(x: object) -> object:
    return x


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_loop(call: Callable[[Any], Any], arg: object, number: int) -> int:
    iterations = range(number)
    with gc_paused():
        start = perf_counter_ns()
        for _ in iterations:
            call(arg)
        return perf_counter_ns() - start


def check(unit: Callable[[int], None]) -> str:
    """Run one unit with counting handlers; say which pybondi ran it, or exit with an error."""
    counted = Messagebus()
    for event_type, name in ((Added, "added"), (Deposited, "deposited"), (Commited, "committed")):
        counted.on(event_type)(counter(name))
    counted.register(Deposit)(counting_deposit)
    w5l_unit(counted, Publisher())(0)
    if calls != dict.fromkeys(calls, 1):
        raise SystemExit(f"session_121.py: expected each handler to run once, got {calls}")
    unit(0)  # the timed bus, once, so that nothing is compiled in the first timing
    return (
        f"ok {platform.python_version()} {getattr(pybondi, '__version__', '1.2.1')} "
        f"{Path(pybondi.__file__).parent}"
    )


def counter(name: str) -> Callable[[Any], None]:
    def handler(event: Any) -> None:
        calls[name] += 1

    return handler


def counting_deposit(command: Deposit) -> None:
    calls["deposit"] += 1
    deposit(command)


def serve(lines: Iterator[str]) -> None:
    unit = w5l_unit(lifecycle_bus(), Publisher())
    for line in lines:
        request, _, argument = line.strip().partition(" ")
        if request == "check":
            answer = check(unit)
        elif request == "w5l":
            answer = str(time_loop(unit, 0, int(argument)))
        elif request == "floor":
            answer = str(time_loop(echo, object(), int(argument)))
        else:
            raise SystemExit(f"session_121.py: unknown request {line!r}")
        print(answer, flush=True)


if __name__ == "__main__":
    serve(iter(sys.stdin))
