"""What a store is: the interface every backend implements.

A unit of work opens one `Transaction` with `store.begin()` (or `await store.abegin()`),
does its reads and writes inside `transaction.run(work)` (or `await
transaction.arun(work)`), and commits or rolls back; `transaction.commit_after(work)` runs
the last writes and commits at once. `work` is a plain function that
receives the transaction's records (`pybondi.persistence.records`): the logic is written
once, and async stores run it on their connection without blocking the event loop.

A session's repository and its publisher (the outbox) join one transaction; a worker
adds the message's inbox row to it. `MessagingStore` is a store whose records also keep
an outbox, an inbox, dead letters and projections' checkpoints: `MemoryStore` and
`SQLStore` are both.

Stores and transactions are generic in their records, so that type checkers know what
`work` receives: `Store[Records]` takes any store, `MessagingStore` one with messaging.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Any, Generic

from typing_extensions import TypeVar  # its `default` (typing has it from 3.13)

from pybondi.persistence.records import MessagingRecords, Records, StoredEvent

__all__ = ["Connected", "MessagingStore", "Store", "Transaction"]

T = TypeVar("T")
# `Store` alone means `Store[Records]`: any store, as most code needs no more.
R_co = TypeVar("R_co", bound=Records, covariant=True, default=Records)


class Transaction(ABC, Generic[R_co]):
    """One unit of work on a store: run work in it, then commit or roll back, then close.

    Attributes:
        store: the store the transaction is on.
    """

    store: Store[Any]

    @abstractmethod
    def run(self, work: Callable[[R_co], T]) -> T:
        """Call `work` with this transaction's records and return what it returns."""

    @abstractmethod
    async def arun(self, work: Callable[[R_co], T]) -> T:
        """`run` for async stores: the work runs without blocking the event loop."""

    @abstractmethod
    def commit(self) -> None:
        """Make every write of the transaction visible at once."""

    @abstractmethod
    def rollback(self) -> None:
        """Drop every write of the transaction."""

    @abstractmethod
    def close(self) -> None:
        """Release the transaction's connection; an uncommitted transaction rolls back."""

    def commit_after(self, work: Callable[[R_co], T]) -> T:
        """Run `work`, the unit of work's last writes, then commit; return what it returned.

        `run` then `commit`, unless the store can send both at once: an SQL store on
        PostgreSQL (psycopg) sends the writes and COMMIT in one round trip.
        """
        result = self.run(work)
        self.commit()
        return result

    async def acommit_after(self, work: Callable[[R_co], T]) -> T:
        """`commit_after`, awaited."""
        result = await self.arun(work)
        await self.acommit()
        return result

    async def acommit(self) -> None:
        """`commit`, awaited."""
        self.commit()

    async def arollback(self) -> None:
        """`rollback`, awaited."""
        self.rollback()

    async def aclose(self) -> None:
        """`close`, awaited."""
        self.close()


class Store(ABC, Generic[R_co]):
    """Where aggregates and events are kept.

    Attributes:
        is_async: whether async code uses the store on the event loop, through its
            transactions' `a` methods (an async SQL store, which needs them; the memory
            store, which never blocks). Otherwise async code runs its work in a thread
            (`atransact`, a worker's sessions), as a sync SQL store would block the loop.
    """

    is_async: bool = False

    @property
    def connections(self) -> int | None:
        """How many connections the store keeps open for transactions; None: no such bound.

        A transaction beyond them opens a connection of its own and closes it after,
        which costs more than the transaction (a worker warns).
        """
        return None

    @abstractmethod
    def begin(self) -> Transaction[R_co]:
        """Open a transaction for a unit of work."""

    async def abegin(self) -> Transaction[R_co]:
        """`begin`, awaited."""
        return self.begin()

    def unreachable(self, error: BaseException) -> bool:
        """Whether `error` may mean the store is out of reach (a probe then decides).

        A store in memory is never out of reach; a SQL store looks for the driver's
        connection errors in the error's causes.
        """
        return False

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Read the log outside any unit of work: what projections and relays follow."""
        return self.transact(partial(_read_log, after, limit))

    async def aread_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """`read_log` for async stores."""
        return await self.atransact(partial(_read_log, after, limit))

    def transact(self, work: Callable[[R_co], T]) -> T:
        """Run `work` in a transaction of its own, commit, and return what it returned."""
        transaction = self.begin()
        try:
            result = transaction.run(work)
            transaction.commit()
            return result
        finally:
            transaction.close()

    async def atransact(self, work: Callable[[R_co], T]) -> T:
        """`transact` from async code.

        An async store runs on the event loop; a sync one in a thread, so that it does not
        block the loop either.
        """
        if not self.is_async:
            return await asyncio.to_thread(self.transact, work)
        transaction = await self.abegin()
        try:
            result = await transaction.arun(work)
            await transaction.acommit()
            return result
        finally:
            await transaction.aclose()


class Connected(ABC):
    """A transaction on a database connection the application may write through too.

    So that the application's own tables (read models, views) change in the unit of
    work's transaction: committed with its aggregates, or rolled back with them. A SQL
    store's transactions are `Connected`; see `pybondi.current_connection`.
    """

    @abstractmethod
    def writing_connection(self) -> Any:
        """The connection, in this transaction, its writes begun (a sync store's)."""

    @abstractmethod
    async def awriting_connection(self) -> Any:
        """The async connection, in this transaction, its writes begun (an async store's)."""


class MessagingStore(Store[MessagingRecords]):
    """A store that also keeps an outbox, an inbox, dead letters and checkpoints; see the module."""


def _read_log(after: int, limit: int, records: Records) -> list[StoredEvent]:
    return records.read_log(after, limit)
