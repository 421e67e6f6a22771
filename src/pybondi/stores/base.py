"""What a store is: the interface every backend implements, and the rows it keeps.

A store keeps three kinds of rows:

- a `Record` per aggregate: its version, and (for state-stored aggregates) its state;
- `StoredEvent`s, each in its aggregate's stream and at a global position in the log;
- `Snapshot`s of event-sourced aggregates.

A repository opens one `Transaction` per unit of work with `store.begin()` (or
`await store.abegin()`), does its reads and writes inside `transaction.run(work)` (or
`await transaction.arun(work)`), and commits or rolls back. `work` is a plain function
that receives the transaction's `Records`: the logic is written once, and async stores
run it on their connection without blocking the event loop.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

__all__ = [
    "Record",
    "Records",
    "Snapshot",
    "Store",
    "StoredEvent",
    "TableRecords",
    "Transaction",
]

T = TypeVar("T")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """An aggregate's row: its stream, its version, and its state if it is state-stored.

    `schema` is the version of the state's registered type when it was written.
    """

    stream: str
    version: int
    schema: int = 1
    data: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: where it sits in its stream and in the log, and its JSON.

    `position` is the event's place in the global log, starting at 1 and without gaps
    between committed events; it is 0 for an event not yet appended.
    """

    stream: str
    version: int
    type: str
    schema: int
    data: str
    position: int = 0
    recorded_at: datetime = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of an event-sourced aggregate after the event at `version`."""

    stream: str
    version: int
    schema: int
    data: str


class Records(ABC):
    """Reads and writes inside one transaction. Every method is sync; see `Transaction`."""

    @abstractmethod
    def read(self, stream: str) -> Record | None:
        """The aggregate's record, or None if there is none."""

    @abstractmethod
    def write(self, record: Record, expected: int) -> None:
        """Write a record whose stored version must still be `expected` (0: a new one).

        Raises `ConcurrencyError`, naming both versions, when it is not.
        """

    @abstractmethod
    def append(self, events: Sequence[StoredEvent]) -> None:
        """Append events to their streams and give them the next positions of the log."""

    @abstractmethod
    def read_stream(self, stream: str, after: int = 0) -> list[StoredEvent]:
        """The stream's events with a version above `after`, in order."""

    @abstractmethod
    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events of the log with a position above `after`, in order."""

    @abstractmethod
    def read_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's latest snapshot, or None."""

    @abstractmethod
    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep a snapshot, replacing the stream's previous one."""


class TableRecords(Records):
    """Records that can also read and write rows of the application's own SQL tables."""

    @abstractmethod
    def read_row(self, table: Any, key: str, id: Any) -> Mapping[str, Any] | None:
        """The row whose primary key column `key` holds `id`, as a mapping, or None."""

    @abstractmethod
    def write_row(
        self,
        table: Any,
        values: Mapping[str, Any],
        key: str,
        *,
        version_column: str,
        version: int,
        expected: int,
    ) -> None:
        """INSERT a new row (`expected` 0), or UPDATE the row still at `expected`.

        `values` holds every column but the version, the primary key `key` included.
        A row at another version raises `ConcurrencyError`, naming both versions.
        """


class Transaction(ABC):
    """One unit of work on a store: run work in it, then commit or roll back, then close."""

    @abstractmethod
    def run(self, work: Callable[[Records], T]) -> T:
        """Call `work` with this transaction's records and return what it returns."""

    @abstractmethod
    async def arun(self, work: Callable[[Records], T]) -> T:
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

    async def acommit(self) -> None:
        """`commit`, awaited."""
        self.commit()

    async def arollback(self) -> None:
        """`rollback`, awaited."""
        self.rollback()

    async def aclose(self) -> None:
        """`close`, awaited."""
        self.close()


class Store(ABC):
    """Where aggregates and events are kept. `is_async` stores need the async path."""

    is_async: bool = False

    @abstractmethod
    def begin(self) -> Transaction:
        """Open a transaction for a unit of work."""

    async def abegin(self) -> Transaction:
        """`begin`, awaited."""
        return self.begin()

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Read the log outside any unit of work: what projections and relays follow."""
        transaction = self.begin()
        try:
            return transaction.run(lambda records: records.read_log(after, limit))
        finally:
            transaction.close()

    async def aread_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """`read_log` for async stores."""
        transaction = await self.abegin()
        try:
            return await transaction.arun(lambda records: records.read_log(after, limit))
        finally:
            await transaction.aclose()

    def transact(self, work: Callable[[Records], T]) -> T:
        """Run `work` in a transaction of its own, commit, and return what it returned."""
        transaction = self.begin()
        try:
            result = transaction.run(work)
            transaction.commit()
            return result
        finally:
            transaction.close()

    async def atransact(self, work: Callable[[Records], T]) -> T:
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
