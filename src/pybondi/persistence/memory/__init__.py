"""The in-memory store: the embedded default for tests and prototypes.

It keeps the same promises as the SQL stores (versions checked, positions without gaps,
all of a transaction or nothing), in a process's memory, for as long as the store lives.
A transaction sees what was committed plus its own writes; its writes become visible to
others at commit, all at once, under a lock. It keeps an outbox, an inbox and dead letters
too (`messaging`): a relay and a worker run on it as on a SQL store; and the projections'
checkpoints (`projections`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import TypeVar

from pybondi.exceptions import ConcurrencyError, SessionError
from pybondi.persistence.memory.messaging import (
    Change,
    MemoryDeadLetters,
    MemoryInbox,
    MemoryOutbox,
    MessagingState,
)
from pybondi.persistence.memory.projections import MemoryProjections, ProjectionState
from pybondi.persistence.records import MessagingRecords, Record, Snapshot, StoredEvent
from pybondi.persistence.store import MessagingStore, Transaction

__all__ = ["MemoryStore"]

T = TypeVar("T")


class MemoryStore(MessagingStore):
    """Keeps records, events, snapshots and messages in dictionaries; thread-safe.

    Sync and async code use it alike: nothing in it blocks (`is_async`).
    """

    is_async = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, Record] = {}
        self.streams: dict[str, list[StoredEvent]] = {}
        self.log: list[StoredEvent] = []
        self.snapshots: dict[str, Snapshot] = {}
        self.messaging = MessagingState()
        self.projections: dict[str, ProjectionState] = {}

    def begin(self) -> MemoryTransaction:
        """Open a transaction."""
        return MemoryTransaction(self)


class MemoryTransaction(Transaction["MemoryTransaction"], MessagingRecords):
    """Buffers writes and applies them at commit, after checking every version again."""

    def __init__(self, store: MemoryStore) -> None:
        self.store: MemoryStore = store
        self.closed = False
        self._clear()

    def _clear(self) -> None:
        self.writes: dict[str, tuple[Record, int]] = {}
        self.appended: list[StoredEvent] = []
        self.snapshots: dict[str, Snapshot] = {}
        self.changes: list[Change] = []
        # The parts are made anew, when next used.
        for part in ("outbox", "inbox", "dead_letters", "projections"):
            self.__dict__.pop(part, None)

    @cached_property
    def outbox(self) -> MemoryOutbox:
        """The outbox's reads and writes, in this transaction."""
        return MemoryOutbox(self)

    @cached_property
    def inbox(self) -> MemoryInbox:
        """The inbox's reads and writes, in this transaction."""
        return MemoryInbox(self)

    @cached_property
    def dead_letters(self) -> MemoryDeadLetters:
        """The dead letters' reads and writes, in this transaction."""
        return MemoryDeadLetters(self, self.inbox, self.outbox)

    @cached_property
    def projections(self) -> MemoryProjections:
        """The projections' checkpoints and leases, in this transaction."""
        return MemoryProjections(self)

    # Transaction ------------------------------------------------------------------------

    def run(self, work: Callable[[MemoryTransaction], T]) -> T:
        """Call `work` with this transaction."""
        if self.closed:
            raise SessionError("This transaction is closed; begin a new one.")
        return work(self)

    async def arun(self, work: Callable[[MemoryTransaction], T]) -> T:
        """`run`: memory needs no waiting."""
        return self.run(work)

    def commit(self) -> None:
        """Check every written version against what others committed, then apply all."""
        store = self.store
        with store.lock:
            for record, expected in self.writes.values():
                self._check(store.records.get(record.stream), record.stream, expected)
            for change in self.changes:
                change.check()
            store.records.update((stream, record) for stream, (record, _) in self.writes.items())
            for event in self.appended:
                stored = dataclasses.replace(event, position=len(store.log) + 1)
                store.log.append(stored)
                store.streams.setdefault(event.stream, []).append(stored)
            store.snapshots.update(self.snapshots)
            for change in self.changes:
                change.apply()
        self._clear()

    def rollback(self) -> None:
        """Drop the buffered writes."""
        self._clear()

    def close(self) -> None:
        """Drop what was not committed."""
        self._clear()
        self.closed = True

    # Records ----------------------------------------------------------------------------

    # Reads take the store's lock, so that they never see half of another's commit.

    def read(self, stream: str) -> Record | None:
        """The record as this transaction sees it."""
        if stream in self.writes:
            return self.writes[stream][0]
        with self.store.lock:
            return self.store.records.get(stream)

    def write(self, record: Record, expected: int) -> None:
        """Buffer a record write after checking its version."""
        self._check(self.read(record.stream), record.stream, expected)
        first_expected = self.writes.get(record.stream, (record, expected))[1]
        self.writes[record.stream] = (record, first_expected)

    @staticmethod
    def _check(current: Record | None, stream: str, expected: int) -> None:
        actual = current.version if current is not None else None
        if (actual or 0) != expected:
            raise ConcurrencyError(stream, expected, actual)

    def append(self, events: Sequence[StoredEvent]) -> None:
        """Buffer events; they get their positions at commit."""
        self.appended.extend(events)

    def read_stream(self, stream: str, after: int = 0) -> list[StoredEvent]:
        """Committed events of the stream, then this transaction's."""
        with self.store.lock:
            events = [*self.store.streams.get(stream, ()), *self.appended]
        return [e for e in events if e.stream == stream and e.version > after]

    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Committed events of the log (positions start at 1)."""
        after = max(after, 0)
        with self.store.lock:
            return self.store.log[after : after + limit]

    def read_snapshot(self, stream: str) -> Snapshot | None:
        """The latest snapshot, this transaction's first."""
        if stream in self.snapshots:
            return self.snapshots[stream]
        with self.store.lock:
            return self.store.snapshots.get(stream)

    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Buffer a snapshot."""
        self.snapshots[snapshot.stream] = snapshot
