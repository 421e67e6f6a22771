"""The memory store's projection checkpoints and leases: `ProjectionRecords` in a process.

As with the memory store's outbox and inbox (see `memory.messaging`), every write is a
`Change`, checked against what others committed and applied at commit, all of a
transaction's at once under the store's lock. Where a SQL store makes the second of two
runners advancing from one checkpoint (or claiming one lease) wait and answer False, the
memory store lets both answer and fails the second at commit with `ConcurrencyError`:
its batch rolls back, and its effects with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from pybondi.exceptions import ConcurrencyError
from pybondi.persistence.memory.messaging import Change
from pybondi.persistence.records import Checkpoint, ProjectionRecords

if TYPE_CHECKING:
    from pybondi.persistence.memory import MemoryTransaction

__all__ = ["MemoryProjections", "ProjectionState"]


@dataclass(slots=True)
class ProjectionState:
    """A projection's committed checkpoint and lease, guarded by the store's lock."""

    position: int = 0
    owner: str | None = None
    lease_until: datetime | None = None

    def free_for(self, owner: str, now: datetime) -> bool:
        """Whether `owner` may take the lease at `now`."""
        return self.owner in (None, owner) or self.lease_until is None or self.lease_until < now


class MemoryProjections(ProjectionRecords):
    """The checkpoints' reads and writes in a memory transaction; see `ProjectionRecords`.

    A row this transaction writes is copied when first touched; reads see the copy, and
    the commit writes it back, unless another transaction committed a change to the row
    in between: then the commit fails with `ConcurrencyError` (optimistic locking).
    """

    def __init__(self, transaction: MemoryTransaction) -> None:
        self._transaction = transaction
        self._states: dict[str, ProjectionState] = transaction.store.projections
        self._touched: dict[str, ProjectionState] = {}  # this transaction's rows

    def _seen(self, name: str) -> ProjectionState | None:
        """The row as this transaction sees it: its own copy, or the committed one."""
        if name in self._touched:
            return self._touched[name]
        with self._transaction.store.lock:
            state = self._states.get(name)
            return None if state is None else replace(state)

    def _touch(self, name: str) -> ProjectionState:
        """The copy of the row this transaction writes; checked and applied at commit."""
        if name in self._touched:
            return self._touched[name]
        with self._transaction.store.lock:
            committed = self._states.get(name)
            base = None if committed is None else replace(committed)
        mine = self._touched[name] = ProjectionState() if base is None else replace(base)

        def check() -> None:
            if self._states.get(name) != base:
                raise ConcurrencyError(f"projection {name}'s checkpoint or lease", 0, 1)

        def apply() -> None:
            self._states[name] = replace(mine)

        self._transaction.changes.append(Change(check, apply))
        return mine

    def get(self, name: str) -> Checkpoint | None:
        """The projection's checkpoint and lease, or None if it never ran."""
        state = self._seen(name)
        if state is None:
            return None
        return Checkpoint(name, state.position, state.owner, state.lease_until)

    def head(self) -> int:
        """The position of the log's last committed event."""
        with self._transaction.store.lock:
            return len(self._transaction.store.log)

    def claim(self, name: str, owner: str, *, now: datetime, until: datetime) -> int | None:
        """Take or renew the lease; the checkpoint, or None if another runner holds it."""
        state = self._seen(name)
        if state is not None and not state.free_for(owner, now):
            return None
        state = self._touch(name)
        state.owner, state.lease_until = owner, until
        return state.position

    def advance(self, name: str, owner: str, *, after: int, to: int, until: datetime) -> bool:
        """Move the checkpoint from `after` to `to`; False unless `owner` holds it there."""
        state = self._seen(name)
        if state is None or state.owner != owner or state.position != after:
            return False
        state = self._touch(name)
        state.position, state.lease_until = to, until
        return True

    def renew(self, name: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds; False if it holds none."""
        state = self._seen(name)
        if state is None or state.owner != owner:
            return False
        self._touch(name).lease_until = until
        return True

    def reset(self, name: str, owner: str) -> bool:
        """Set the checkpoint back to 0; False unless `owner` holds the lease."""
        state = self._seen(name)
        if state is None or state.owner != owner:
            return False
        self._touch(name).position = 0
        return True

    def release(self, name: str, owner: str) -> None:
        """Give up the lease `owner` holds, if it holds it."""
        state = self._seen(name)
        if state is not None and state.owner == owner:
            state = self._touch(name)
            state.owner = state.lease_until = None
