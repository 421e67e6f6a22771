"""What the store contract suite needs of a store: a `StoreTarget`; and its helpers.

See `pybondi.testing.contracts.stores`, which runs the suite on a target. `Case` is one
test's view of the target through one driver, sync or async: it makes the test's store,
runs work in transactions through that driver, and disposes of the store at the end.
Test bodies are sync; on the async driver, `Case` awaits each step on one event loop of
the test's own, as `async with` and `await` would.
"""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import pytest

from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import MessagingRecords, StoredEvent
from pybondi.persistence.store import Store, Transaction

__all__ = [
    "WAITING",
    "Begun",
    "Case",
    "ContractPart",
    "Interleaved",
    "Pending",
    "StoreTarget",
    "contract",
    "envelope",
    "event",
    "later",
]

T = TypeVar("T")
# A function of a transaction's records; a store without messaging gets `Records` alone.
Work = Callable[[MessagingRecords], T]
Outcome = Any  # what a transaction's work returned, or the exception it raised

WAITING = 0.3
"""Seconds a transaction that must wait for another is given to show that it waits."""

# What each capability means, for the reason a skipped test gives.
CAPABILITIES = {
    "messaging": "the store keeps no outbox, inbox nor dead letters",
    "keeps_table_rows": "the store does not keep rows of the application's own tables",
    "runs_sync": "the store's transactions do not run work through run() and commit()",
    "runs_async": "the store's transactions do not run work through arun() and acommit()",
}


class StoreTarget(ABC):
    """The store under test, and what the suite should expect of it.

    Override `store()`; the other methods have defaults. The flags say what the store
    can do; each defaults to what the memory store does.

    Attributes:
        messaging: the store is a `MessagingStore`: its records have an `outbox`, an
            `inbox` and `dead_letters` (memory, SQL). Else their tests are skipped.
        keeps_table_rows: its records are `TableRecords`, which read and write rows of
            the application's own tables (SQL); `table()` then gives one.
        concurrent_claims_wait: of two transactions claiming one message in the inbox
            at once, the second waits for the first to end, then answers False if it
            committed and True if it rolled back (SQL: on the row's key, or SQLite's
            one writer). Else (memory) the second answers True at once, and the one of
            the two that commits last fails at commit with `ConcurrencyError`.
        runs_sync: the store's transactions run work through `run` and `commit`.
        runs_async: they do through `arun` and `acommit` (the store `store(True)`
            gives). A driver the store does not serve skips its tests, saying so.
    """

    messaging = True
    keeps_table_rows = False
    concurrent_claims_wait = False
    runs_sync = True
    runs_async = True

    @abstractmethod
    async def store(self, asynchronous: bool) -> Store:
        """A new store with empty tables, for this test alone.

        `asynchronous`: for async code, whose transactions the suite uses through `arun`
        and `acommit`. It is awaited on the event loop the test runs on, which async
        stores should use (the memory store serves both; a SQL store is made one or the
        other, with its tables created).
        """

    async def dispose(self, store: Store) -> None:
        """Release what `store()` made, at the test's end, on its event loop."""

    async def table(self, store: Store) -> Any:
        """For `keeps_table_rows`: a new table of the store's own kind, created, empty.

        Its columns: `id`, text, its primary key; `name`, text; `version`, an integer.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.keeps_table_rows is True: override table() to give "
            f"a table with the columns id (the key), name and version."
        )


class ContractPart:
    """The fixtures of every part of the suite: the target, and the driver."""

    @pytest.fixture
    def store_target(self) -> StoreTarget:
        """Your target: override this fixture in your subclass of the suite."""
        raise NotImplementedError(
            f"{type(self).__name__} needs a fixture store_target that gives a StoreTarget "
            f"for your store; see pybondi.testing.contracts.stores."
        )

    @pytest.fixture(params=["sync", "async"])
    def store_driver(self, request: pytest.FixtureRequest) -> str:
        """The driver each test runs through: `run`/`commit`, or `arun`/`acommit`."""
        return str(request.param)


class Case:
    """One test's store, used through one driver, sync or async; disposed of at its end."""

    def __init__(self, target: StoreTarget, driver: Literal["sync", "async"]) -> None:
        self.target = target
        self.asynchronous = driver == "async"
        self.runner = asyncio.Runner()
        self.threads = ThreadPoolExecutor(1, thread_name_prefix="store-contract")
        try:
            self.store: Store[Any] = self.wait(target.store(self.asynchronous))
        except BaseException:  # a skip too: what was made for the store goes
            self.threads.shutdown()
            self.runner.close()
            raise

    def wait(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` on the test's event loop."""
        return self.runner.run(work)

    def close(self) -> None:
        """Dispose of the store, then end the event loop and the thread."""
        try:
            self.wait(self.target.dispose(self.store))
        finally:
            self.threads.shutdown()
            self.runner.close()

    # Transactions -----------------------------------------------------------------------

    def begin(self) -> Begun:
        """A new transaction on the store, through the driver."""
        if self.asynchronous:
            return Begun(self, self.wait(self.store.abegin()))
        return Begun(self, self.store.begin())

    def run(self, work: Work[T], *, commit: bool = True) -> T:
        """Run `work` in a transaction of its own, then commit it (or roll it back)."""
        transaction = self.begin()
        try:
            result = transaction.run(work)
            transaction.commit() if commit else transaction.rollback()
            return result
        finally:
            transaction.close()

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """`store.read_log`, or `aread_log` awaited: the log outside any unit of work."""
        if self.asynchronous:
            return self.wait(self.store.aread_log(after, limit))
        return self.store.read_log(after, limit)

    def concurrently(self, work: Work[Any]) -> Pending:
        """Start `work` in a committed transaction of its own, beside this test's code.

        On a thread (sync), or in a task on the test's event loop (async), which runs
        whenever the test waits on the loop: in `Pending.settle`, and in later steps.
        """
        if self.asynchronous:
            return Pending(self, self.runner.get_loop().create_task(self._alone(work)))
        return Pending(self, self.threads.submit(self.run, work))

    async def _alone(self, work: Work[T]) -> T:
        transaction = await self.store.abegin()
        try:
            result = await transaction.arun(work)
            await transaction.acommit()
            return result
        finally:
            await transaction.aclose()

    def interleave(
        self, first: Work[Any], second: Work[Any], *, end: Literal["commit", "rollback"] = "commit"
    ) -> Interleaved:
        """Run `first` in a transaction left open, and `second` in one of its own meanwhile.

        Once the second is done, or `WAITING` seconds passed, the first ends (`end`).
        Returns what each gave, or raised (the first's end included), and whether the
        second was done before the first ended.
        """
        transaction = self.begin()
        try:
            first_outcome: Outcome = transaction.run(first)
            pending = self.concurrently(second)
            second_first = pending.settle(WAITING)
            try:
                transaction.commit() if end == "commit" else transaction.rollback()
            except Exception as error:
                first_outcome = error
        finally:
            transaction.close()  # lets a second that waits go on, whatever happened
        return Interleaved(first_outcome, pending.outcome(), second_first)


class Begun:
    """A transaction begun through the case's driver: each step called, or awaited."""

    def __init__(self, case: Case, transaction: Transaction[Any]) -> None:
        self.case = case
        self.transaction = transaction

    def _step(self, sync: Callable[[], T], asynchronous: Callable[[], Awaitable[T]]) -> T:
        if not self.case.asynchronous:
            return sync()

        async def awaited() -> T:
            return await asynchronous()

        return self.case.wait(awaited())

    def run(self, work: Work[T]) -> T:
        """`run(work)`, or `arun(work)` awaited."""
        return self._step(lambda: self.transaction.run(work), lambda: self.transaction.arun(work))

    def commit(self) -> None:
        """`commit()`, or `acommit()` awaited."""
        self._step(self.transaction.commit, self.transaction.acommit)

    def rollback(self) -> None:
        """`rollback()`, or `arollback()` awaited."""
        self._step(self.transaction.rollback, self.transaction.arollback)

    def close(self) -> None:
        """`close()`, or `aclose()` awaited."""
        self._step(self.transaction.close, self.transaction.aclose)


class Pending:
    """Work started with `Case.concurrently`: a thread's future (sync), or a task (async)."""

    def __init__(self, case: Case, running: Future[Any] | asyncio.Task[Any]) -> None:
        self.case = case
        self.running = running

    def settle(self, seconds: float) -> bool:
        """Wait up to `seconds` for the work to end; whether it has (committed, or failed)."""
        if isinstance(self.running, asyncio.Task):
            self.case.wait(asyncio.wait([self.running], timeout=seconds))
        else:
            wait_for_futures([self.running], timeout=seconds)
        return self.running.done()

    def outcome(self, timeout: float = 30.0) -> Outcome:
        """What the work returned, or the exception it raised, once it ends."""
        try:
            if isinstance(self.running, asyncio.Task):
                return self.case.wait(asyncio.wait_for(self.running, timeout))
            return self.running.result(timeout)
        except Exception as error:
            return error


@dataclass(frozen=True)
class Interleaved:
    """What two interleaved transactions gave (see `Case.interleave`)."""

    first: Outcome
    second: Outcome
    second_first: bool  # the second was done while the first was still open


def contract(*needs: str) -> Callable[[Callable[[Any, Case], None]], Any]:
    """Make a test of the suite: its body runs on a new `Case`, closed at its end.

    `needs`: capabilities of the target (see `StoreTarget`) without which the test is
    skipped, saying which and why.
    """

    def make(body: Callable[[Any, Case], None]) -> Callable[[Any, StoreTarget, str], None]:
        def test(self: Any, store_target: StoreTarget, store_driver: str) -> None:
            runs = "runs_async" if store_driver == "async" else "runs_sync"
            for capability in (*needs, runs):
                if not getattr(store_target, capability):
                    pytest.skip(
                        f"{type(store_target).__name__}.{capability} is False: "
                        f"{CAPABILITIES[capability]}"
                    )
            case = Case(store_target, "async" if store_driver == "async" else "sync")
            try:
                body(self, case)
            finally:
                case.close()

        test.__name__, test.__qualname__ = body.__name__, body.__qualname__
        test.__doc__ = body.__doc__
        return test

    return make


def envelope(topic: str = "orders", number: int = 1, body: bytes | None = None) -> Envelope:
    """A message for `topic`, with an id of its own, its `number` in a header and body."""
    return Envelope(
        topic,
        f"{topic}-{number}-{uuid.uuid4().hex[:8]}",
        {"message-type": "json", "x-number": str(number), "x-city": "Zürich"},
        body if body is not None else f'{{"number":{number},"note":"café"}}'.encode(),
    )


def event(stream: str, version: int, data: str = "{}") -> StoredEvent:
    """An event to append: position 0, recorded at a moment with microseconds."""
    recorded_at = datetime(2026, 12, 6, 12, 30, 15, 123456, tzinfo=UTC)
    return StoredEvent(stream, version, "bank.Deposited", 1, data, 0, recorded_at)


def later() -> datetime:
    """Now, once the clock has moved past every moment read before this call."""
    mark = datetime.now(UTC)
    while (now := datetime.now(UTC)) <= mark:
        pass
    return now
