"""Micro-benchmarks of pybondi's hot paths, reported as ratios to a bare function call.

    python benchmarks/bench_core.py           # full run, about 15 s
    python benchmarks/bench_core.py --quick   # smoke test, a few seconds
    python benchmarks/bench_core.py --pybondi-121 PYTHON  # 1.2.1's venv, for W5L's peer

Every workload is timed with the same loop, `for _ in range(n): call(arg)`, where `call`
is a local variable (a bound method such as `bus.handle`, or a plain function) and `arg`
is prebuilt. The floor is that very loop around `echo(x)`, a trivial module-level
function, measured in the same run. Each result is the best of 7 repeats, each
calibrated to last about 0.15 s, with the garbage collector paused as `timeit` does. The
repeats run in rounds that time the floor and every workload once, so a slow spell of a
shared machine weighs on all of them alike. Dividing by the floor cancels most of the
machine's speed, so ratios can be compared across machines and runs; ns figures cannot.
The async workloads are timed inside the same `asyncio.run`, against the same floor.

Before timing, each workload runs once under `sys.setprofile` to check that the handlers
it is meant to reach run the expected number of times (and that an overridden dependency
is replaced). The script exits 0 whether or not targets are met, since it is a report;
it fails only if such a check does.

W5L, the seed README's session with lifecycle handlers, is also timed on pybondi 1.2.1:
`benchmarks/session_121.py` runs in 1.2.1's own venv (`.venv-bench-121`, made by
`make bench`; the same import name, and Python 3.12) as a subprocess, asked for each of
its timings in turn within the same rounds, beside its own interpreter's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from math import ceil
from pathlib import Path
from time import perf_counter_ns
from types import CodeType, FrameType
from typing import Any

import pybondi
from pybondi import (
    Added,
    Aggregate,
    Command,
    Committed,
    Depends,
    Event,
    Message,
    Messagebus,
    Publisher,
    Repository,
    Root,
    Session,
    SQLStore,
    current_connection,
    current_session,
)

AnyCall = Callable[[Any], Any]
AsyncCall = Callable[[Any], Awaitable[Any]]

# The harness ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long to time: `repeats` runs of about `repeat_ns` each, after calibration."""

    repeats: int
    repeat_ns: int
    probe_ns: int


FULL = Settings(repeats=7, repeat_ns=150_000_000, probe_ns=20_000_000)
QUICK = Settings(repeats=3, repeat_ns=20_000_000, probe_ns=5_000_000)


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


def time_loop(call: AnyCall, arg: object, number: int) -> int:
    """Nanoseconds taken by `number` calls of `call(arg)`, loop included."""
    iterations = range(number)
    with gc_paused():
        start = perf_counter_ns()
        for _ in iterations:
            call(arg)
        return perf_counter_ns() - start


async def atime_loop(call: AsyncCall, arg: object, number: int) -> int:
    """Nanoseconds taken by `number` awaits of `call(arg)`, loop included."""
    iterations = range(number)
    with gc_paused():
        start = perf_counter_ns()
        for _ in iterations:
            await call(arg)
        return perf_counter_ns() - start


def scaled(number: int, elapsed_ns: int, settings: Settings) -> int:
    """The iteration count that makes one repeat last about `settings.repeat_ns`."""
    return max(1, ceil(number * settings.repeat_ns / max(elapsed_ns, 1)))


@dataclass(frozen=True)
class Workload:
    """`call(arg)` is one iteration; `units` operations are reported per iteration.

    `expected` lists the functions one iteration must run, with how many times.
    """

    name: str
    call: Callable[[Any], Any]
    arg: object
    target: float | None = None
    units: int = 1
    is_async: bool = False
    expected: tuple[tuple[Callable[..., Any], int], ...] = field(default=())
    timer: Callable[[int], int] | None = None  # times `number` iterations elsewhere


async def time_once(workload: Workload, number: int) -> int:
    """Nanoseconds taken by `number` iterations of the workload."""
    if workload.timer is not None:
        return workload.timer(number)

    if workload.is_async:
        return await atime_loop(workload.call, workload.arg, number)
    return time_loop(workload.call, workload.arg, number)


async def calibrate(workload: Workload, settings: Settings) -> int:
    """The iteration count that makes one repeat of the workload last `repeat_ns` or so."""
    number = 1
    while (elapsed := await time_once(workload, number)) < settings.probe_ns:
        number *= 10
    return scaled(number, elapsed, settings)


async def rounds(workloads: list[Workload], settings: Settings) -> list[list[float]]:
    """Per workload, the ns per iteration of each repeat.

    The repeats are interleaved: each round times every workload once, so a slow spell of
    the machine hits the floor and the workloads alike rather than one of them.
    """
    numbers = [await calibrate(workload, settings) for workload in workloads]
    times: list[list[float]] = [[] for _ in workloads]
    for _ in range(settings.repeats):
        gc.collect()
        for workload, number, timed in zip(workloads, numbers, times, strict=True):
            timed.append(await time_once(workload, number) / number)
    return times


# The messages, handlers and dependencies ------------------------------------------------


def echo(x: object) -> object:
    return x


class Ping(Event):
    pass


class Ask(Command):
    pass


class Account(Aggregate):
    def __init__(self, id: str) -> None:
        self.root = Root(id)


@dataclass
class Deposit(Command):
    account: Account


class Deposited(Event):
    pass


def on_ping(event: Ping) -> Ping:
    return event


def real_clock() -> int:
    return 1


def fake_clock() -> int:
    return 0


def on_ping_with_clock(event: Ping, clock: int = Depends(real_clock)) -> Ping:
    return event


def on_ping_in_session(event: Ping, session: Session = Depends(current_session)) -> Ping:
    return event


def on_ping_with_connection(event: Ping, connection: Any = Depends(current_connection)) -> Ping:
    return event


def on_ask(command: Ask) -> Ask:
    return command


def fresh_handler() -> Callable[[Any], Any]:
    """A new function object each call: the bus ignores a second registration of one."""

    def handler(message: Any) -> Any:
        return message

    return handler


def deposit(command: Deposit) -> None:
    command.account.root.publish(Deposited())


def on_deposited(event: Deposited) -> Deposited:
    return event


def on_added(event: Added[Account]) -> Added[Account]:
    return event


def on_committed(event: Committed[Account]) -> Committed[Account]:
    return event


# The workloads --------------------------------------------------------------------------

TOPIC = "accounts"
LIFECYCLE = "W5L session with Added/Committed handlers"
BATCH = 100
SUBSCRIBERS = 2


def one_handler_bus() -> Messagebus:
    bus = Messagebus()
    bus.on(Ping)(on_ping)
    return bus


def overridden_bus() -> Messagebus:
    bus = Messagebus()
    bus.on(Ping)(on_ping_with_clock)
    bus.dependency_overrides[real_clock] = fake_clock
    return bus


def bus_of(handler: Callable[[Ping], Ping]) -> Messagebus:
    bus = Messagebus()
    bus.on(Ping)(handler)
    return bus


def open_session() -> Session:
    """A session on an in-memory SQLite store, left open for the whole run.

    It is the current session of every workload (asyncio.run's task copies this context),
    for the handlers that take `Depends(current_session)` or `Depends(current_connection)`.
    """
    store = SQLStore("sqlite://")
    session = Session(Messagebus(), transaction=store.begin())
    session.__enter__()
    return session


def command_bus() -> Messagebus:
    bus = Messagebus()
    bus.register(Ask)(on_ask)
    return bus


def ten_handler_bus() -> tuple[Messagebus, Callable[[Any], Any]]:
    bus = Messagebus()
    handlers = [fresh_handler() for _ in range(10)]
    for handler in handlers:
        bus.on(Ping)(handler)
    return bus, handlers[0]


def session_bus() -> Messagebus:
    bus = Messagebus()
    bus.register(Deposit)(deposit)
    bus.on(Deposited)(on_deposited)
    return bus


def lifecycle_bus() -> Messagebus:
    """W5L's bus: the seed README's session, with handlers on `Added` and `Committed`."""
    bus = session_bus()
    bus.on(Added)(on_added)
    bus.on(Committed)(on_committed)
    return bus


def lifecycle_unit(bus: Messagebus, publisher: Publisher) -> AnyCall:
    """One W5L unit, as `session_121.py` runs it on pybondi 1.2.1: a new aggregate each time."""

    def unit(index: int) -> None:
        account = Account("a-1")
        with Session(bus, Repository(), publisher) as session:
            session.add(account)
            session.execute(Deposit(account))

    return unit


def session_unit(bus: Messagebus, publisher: Publisher, account: Account) -> AnyCall:
    def unit(command: Deposit) -> None:
        with Session(bus, Repository(), publisher) as session:
            session.add(account)
            session.execute(command)

    return unit


def asession_unit(bus: Messagebus, publisher: Publisher, account: Account) -> AsyncCall:
    async def unit(command: Deposit) -> None:
        async with Session(bus, Repository(), publisher) as session:
            session.add(account)
            await session.aexecute(command)

    return unit


def publish_batch(publisher: Publisher) -> tuple[AnyCall, Callable[[Any], Any]]:
    subscriber = fresh_handler()
    publisher.subscribe(TOPIC)(subscriber)
    publisher.subscribe(TOPIC)(fresh_handler())
    publish, commit = publisher.publish, publisher.commit

    def batch(messages: list[Message[int]]) -> None:
        for message in messages:
            publish(TOPIC, message)
        commit()

    return batch, subscriber


def sync_workloads() -> list[Workload]:
    ten_bus, ten_handler = ten_handler_bus()
    bus = session_bus()
    account = Account("a-1")
    batch, subscriber = publish_batch(Publisher())
    messages = [Message(index) for index in range(BATCH)]
    return [
        Workload(
            "W1 event -> 1 handler", one_handler_bus().handle, Ping(), 6, expected=((on_ping, 1),)
        ),
        Workload(
            "W2 event -> 1 handler, 1 overridden Depends",
            overridden_bus().handle,
            Ping(),
            12,
            expected=((on_ping_with_clock, 1), (fake_clock, 1), (real_clock, 0)),
        ),
        Workload(
            "W2s event -> 1 handler, Depends(current_session)",
            bus_of(on_ping_in_session).handle,
            Ping(),
            12,
            expected=((on_ping_in_session, 1), (current_session, 1)),
        ),
        Workload(
            "W2c event -> 1 handler, Depends(current_connection)",
            bus_of(on_ping_with_connection).handle,
            Ping(),
            12,
            expected=((on_ping_with_connection, 1), (current_connection, 1)),
        ),
        Workload(
            "W3 command -> its handler", command_bus().handle, Ask(), 6, expected=((on_ask, 1),)
        ),
        Workload(
            "W4 event -> 10 handlers", ten_bus.handle, Ping(), 20, expected=((ten_handler, 10),)
        ),
        Workload(
            "W5 session: add, execute, commit",
            session_unit(bus, Publisher(), account),
            Deposit(account),
            100,
            expected=((deposit, 1), (on_deposited, 1)),
        ),
        Workload(
            LIFECYCLE,
            lifecycle_unit(lifecycle_bus(), Publisher()),
            0,
            expected=((on_added, 1), (deposit, 1), (on_deposited, 1), (on_committed, 1)),
        ),
        Workload(
            f"W6 publish+commit, per delivery ({BATCH} msgs x {SUBSCRIBERS} subs)",
            batch,
            messages,
            8,
            units=BATCH * SUBSCRIBERS,
            expected=((subscriber, BATCH * SUBSCRIBERS),),
        ),
        Workload("W7 Message(payload)", Message, {"balance": 10}),
    ]


def async_workloads() -> list[Workload]:
    bus = session_bus()
    account = Account("a-1")
    return [
        Workload(
            "W1a await ahandle(event)",
            one_handler_bus().ahandle,
            Ping(),
            is_async=True,
            expected=((on_ping, 1),),
        ),
        Workload(
            "W3a await ahandle(command)",
            command_bus().ahandle,
            Ask(),
            is_async=True,
            expected=((on_ask, 1),),
        ),
        Workload(
            "W5a async session: add, aexecute, commit",
            asession_unit(bus, Publisher(), account),
            Deposit(account),
            is_async=True,
            expected=((deposit, 1), (on_deposited, 1)),
        ),
    ]


# pybondi 1.2.1, W5L's peer, in its own venv ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
VENV_121 = ROOT / ".venv-bench-121" / "bin" / "python"
TARGET_121 = 5.0  # W5L: pybondi at least this many times faster than 1.2.1


class Peer121:
    """`session_121.py` under pybondi 1.2.1's interpreter, answering one request at a time."""

    def __init__(self, python: Path) -> None:
        # The pybondi it imports must be the venv's: never ./src, nor a PYTHONPATH given
        # to this script. (`absolute`, not `resolve`: a venv's python is a symlink.)
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen(
            [str(python.absolute()), str(ROOT / "benchmarks" / "session_121.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            env=environment,
        )
        answer = self.ask("check")
        if not answer.startswith("ok "):
            raise SystemExit(f"session_121.py did not start: {answer!r}")
        self.python, self.version, self.path = answer.split(" ", 3)[1:]

    def ask(self, request: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def timer(self, request: str) -> Callable[[int], int]:
        return lambda number: int(self.ask(f"{request} {number}"))

    def workloads(self) -> list[Workload]:
        return [
            Workload("1.2.1 floor: echo(x)", echo, None, timer=self.timer("floor")),
            Workload(f"1.2.1 {LIFECYCLE}", echo, None, timer=self.timer("w5l")),
        ]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=10)


def start_peer(python: Path | None) -> Peer121 | None:
    """The 1.2.1 subprocess, or None (said why) when its venv is missing."""
    if python is None or not python.exists():
        print(
            f"pybondi 1.2.1: no interpreter at {python or VENV_121}; W5L runs without its "
            "peer (make .venv-bench-121/.installed-pybondi-1.2.1 makes it)"
        )
        return None
    peer = Peer121(python)
    print(f"pybondi 1.2.1 on Python {peer.python} from {peer.path} (a subprocess)")
    return peer


def peer_report(
    ours: list[float], floor: list[float], theirs: list[float], their_floor: list[float]
) -> list[str]:
    """W5L against 1.2.1: the speed-ups of the best and the median rounds, raw and per floor."""
    best = min(theirs) / min(ours)
    median = statistics.median(theirs) / statistics.median(ours)
    normalised = (min(theirs) / min(their_floor)) / (min(ours) / min(floor))
    verdict = "PASS" if best >= TARGET_121 else "under"
    return [
        f"W5L vs pybondi 1.2.1 (same rounds): pybondi {min(ours) / 1000:.2f} us, "
        f"1.2.1 {min(theirs) / 1000:.2f} us (its floor {min(their_floor):.1f} ns)",
        f"  pybondi is {best:.2f}x faster (best rounds), {median:.2f}x (median rounds), "
        f"{normalised:.2f}x per each interpreter's floor; target >= {TARGET_121:g}x: {verdict}",
    ]


# Checking that each workload does what it claims ----------------------------------------


def count_calls(action: Callable[[], object], codes: list[CodeType]) -> list[int]:
    """How many times each code object starts running while `action()` runs."""
    counts = dict.fromkeys(codes, 0)

    def profiler(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code in counts:
            counts[frame.f_code] += 1

    sys.setprofile(profiler)
    try:
        action()
    finally:
        sys.setprofile(None)
    return [counts[code] for code in codes]


def run_once(workload: Workload) -> None:
    if workload.is_async:
        asyncio.run(workload.call(workload.arg))
    else:
        workload.call(workload.arg)


def check(workload: Workload) -> None:
    """Raise SystemExit if one iteration does not run the expected functions as often."""
    # Functions made by one factory share a code object, so their counts add up.
    want: dict[CodeType, int] = {}
    for function, times in workload.expected:
        want[function.__code__] = want.get(function.__code__, 0) + times
    got = count_calls(lambda: run_once(workload), list(want))
    if got != list(want.values()):
        wanted = [f"{code.co_name}: {times}" for code, times in want.items()]
        raise SystemExit(f"{workload.name}: expected calls {wanted}, got {got}")


# Running and reporting ------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    workload: Workload
    ns: float  # per operation


def status(ratio: float, target: float | None) -> str:
    if target is None:
        return "report"
    return "PASS" if ratio <= target else "over"


def table(results: list[Result], floor_ns: float) -> list[str]:
    width = max(len(result.workload.name) for result in results)
    lines = [f"{'workload':<{width}}  {'ns/op':>9}  {'x floor':>8}  {'target':>7}  status"]
    lines.append("-" * len(lines[0]))
    for result in results:
        ratio = result.ns / floor_ns
        target = result.workload.target
        shown = "-" if target is None else f"<= {target:g}"
        lines.append(
            f"{result.workload.name:<{width}}  {result.ns:>9.1f}  {ratio:>8.2f}  {shown:>7}  "
            f"{status(ratio, target)}"
        )
    return lines


def header(settings: Settings) -> list[str]:
    return [
        f"Python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.machine()}, {platform.system()})",
        f"pybondi {pybondi.__version__} from {Path(pybondi.__file__).parent}",
        f"fast-depends {version('fast-depends')}",
        f"best of {settings.repeats} interleaved rounds of ~{settings.repeat_ns / 1e6:.0f} ms each",
    ]


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run, for a smoke test")
    parser.add_argument(
        "--pybondi-121",
        type=Path,
        default=VENV_121,
        metavar="PYTHON",
        help="the interpreter of pybondi 1.2.1's venv, for W5L's peer (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    return (QUICK if args.quick else FULL), args.pybondi_121


def main(argv: list[str] | None = None) -> int:
    settings, python_121 = parse_args(argv)
    print("\n".join(header(settings)), flush=True)
    peer = start_peer(python_121)
    floor = Workload("floor: echo(x)", echo, object())
    open_session()
    workloads = [*sync_workloads(), *async_workloads()]
    for workload in workloads:
        check(workload)
    peers = peer.workloads() if peer is not None else []
    try:
        floor_times, *times = asyncio.run(rounds([floor, *workloads, *peers], settings))
    finally:
        if peer is not None:
            peer.close()
    peer_times = times[len(workloads) :]
    times = times[: len(workloads)]
    floor_ns = min(floor_times)
    print(f"floor: bare call echo(x) = {floor_ns:.1f} ns (slowest round {max(floor_times):.1f})\n")
    results = [Result(w, min(t) / w.units) for w, t in zip(workloads, times, strict=True)]
    print("\n".join(table(results, floor_ns)))
    over = [
        r.workload.name for r in results if status(r.ns / floor_ns, r.workload.target) == "over"
    ]
    print(f"\nover target: {', '.join(over)}" if over else "\nall targets met")
    if peer_times:
        ours = times[[w.name for w in workloads].index(LIFECYCLE)]
        their_floor, theirs = peer_times
        print("\n" + "\n".join(peer_report(ours, floor_times, theirs, their_floor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
