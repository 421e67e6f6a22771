"""What every store repository shares: a transaction per unit of work, versions, events.

`StoreRepository` loads and saves through the records of the unit of work's store
transaction; its subclasses (`StateRepository`, `EventSourcedRepository`,
`TableRepository`) say how an aggregate is read and what is written for a changed one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.exceptions import NotFound, SessionError
from pybondi.messages import Event
from pybondi.persistence.records import Records, StoredEvent
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import Store, Transaction
from pybondi.repository import Repository

__all__ = ["StoreRepository", "next_version"]

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")


class StoreRepository(Repository[A]):
    """What every store repository shares: a transaction per unit of work, versions, events.

    Subclasses say how to load an aggregate from the records (`_load`) and what to write
    for a changed one (`_save_aggregate`); both are sync and run inside the transaction.
    """

    def __init__(
        self,
        store: Store[Records],
        aggregate_type: type[A],
        registry: Registry,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._store = store
        self.aggregate_type = aggregate_type
        self.registry = registry
        # The stored rows are named after the aggregate type's registered name (or `name`),
        # never its class name, so that renaming or moving the class loses nothing.
        self.name = name or registry.name_of(aggregate_type)
        self.transaction: Transaction[Records] | None = None
        self.versions: dict[Any, int] = {}  # the stored version each aggregate was read at
        self.states: dict[Any, object] = {}  # its stored form, to tell if it changed
        self.recorded: list[tuple[Any, Event]] = []  # in the order the session took them

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self.name} on {self._store!r}>"

    def stream(self, id: Any) -> str:
        """The name under which an aggregate's record and events are stored."""
        return f"{self.name}-{id}"

    # Loading ----------------------------------------------------------------------------

    @abstractmethod
    def _load(self, records: Records, id: Any) -> A | None:
        """Read an aggregate, noting its version and stored form; None if it is absent."""

    def get(self, id: Any) -> A:
        """The aggregate with this id, from the identity map or the store."""
        aggregate = self.aggregates.get(id)
        if aggregate is None:
            aggregate = self._found(id, self._open().run(lambda records: self._load(records, id)))
        return aggregate

    async def aget(self, id: Any) -> A:
        """`get` for async stores."""
        aggregate = self.aggregates.get(id)
        if aggregate is None:
            loaded = await self._open().arun(lambda records: self._load(records, id))
            aggregate = self._found(id, loaded)
        return aggregate

    def _found(self, id: Any, loaded: A | None) -> A:
        if loaded is None:
            raise NotFound(self, id, self.name)
        if loaded.root.id != id:
            raise ValueError(
                f"get({id!r}) loaded {self.stream(id)}, whose root id is {loaded.root.id!r}: "
                f"the identity map would hold it under another id than the one asked for. "
                f"Ask with the id as the aggregate holds it ({type(loaded.root.id).__name__}), "
                f"and check that {type(loaded).__name__} makes its root of the id it is "
                f"loaded with (the first parameter of its __init__, or of build=)."
            )
        self.add(loaded)
        return loaded

    def _open(self) -> Transaction[Records]:
        if self.transaction is None:
            raise SessionError(
                f"{type(self).__name__} reads and writes inside a unit of work: use it within "
                f"a Session (or call repository.begin() first)."
            )
        return self.transaction

    def _loading(self, id: Any, what: str, decode: Callable[[], T]) -> T:
        """Decode stored data, adding to any error which aggregate it belonged to."""
        try:
            return decode()
        except Exception as error:
            error.add_note(f"While loading {what} of {self.stream(id)}.")
            raise

    # Saving -----------------------------------------------------------------------------

    def record(self, aggregate: A, events: Iterable[Event]) -> None:
        """Keep the events the session takes from an aggregate, to append on commit."""
        id = aggregate.root.id
        self.recorded.extend((id, event) for event in events)

    def _pending(self) -> list[tuple[Any, Event]]:
        # Events still on a root were published outside a session, which never took
        # them: they come after the ones the session took.
        pending = list(self.recorded)
        for id, aggregate in self.aggregates.items():
            pending.extend((id, event) for event in aggregate.root.events)
        return pending

    @abstractmethod
    def _save_aggregate(
        self, records: Records, aggregate: A, events: list[StoredEvent], expected: int
    ) -> tuple[int, object] | None:
        """Write what changed of one aggregate.

        Return its new version and stored form, or None if nothing needed writing.
        """

    def _save(self, records: Records) -> dict[Any, tuple[int, object]]:
        # Each event takes the next version of its aggregate's stream, and its place in
        # the log in the order the session dispatched it, cause before effect.
        stored: list[StoredEvent] = []
        streams: dict[Any, list[StoredEvent]] = {}
        for id, event in self._pending():
            events = streams.setdefault(id, [])
            version = self.versions.get(id, 0) + len(events) + 1
            stored.append(self._stored(self.stream(id), version, event))
            events.append(stored[-1])
        saved: dict[Any, tuple[int, object]] = {}
        # Rows in one order, whatever order the aggregates were loaded in: two sessions
        # writing the same rows then lock them in the same order, and cannot deadlock.
        for id in sorted(self.aggregates, key=self.stream):
            aggregate, expected = self.aggregates[id], self.versions.get(id, 0)
            written = self._save_aggregate(records, aggregate, streams.get(id, []), expected)
            if written is not None:
                saved[id] = written
        # Events last, and for all aggregates at once: appending locks the log's head
        # until COMMIT, and it should be held for as short a time as possible.
        records.append(stored)
        return saved

    def _stored(self, stream: str, version: int, event: Event) -> StoredEvent:
        serialized = self.registry.dumps(event)
        return StoredEvent(stream, version, serialized.name, serialized.version, serialized.data)

    def _saved(self, saved: dict[Any, tuple[int, object]]) -> None:
        for id, (version, state) in saved.items():
            self.versions[id], self.states[id] = version, state
        self.recorded.clear()
        for aggregate in self.aggregates.values():
            aggregate.root.events.clear()

    # The unit of work -------------------------------------------------------------------

    def check_store(self, store: object) -> None:
        """Refuse a store other than this repository's: a transaction must be on it."""
        if store is not self._store:
            raise SessionError(
                f"{self!r} keeps its aggregates on {self._store!r}, not on {store!r}: a unit "
                f"of work writes in one transaction, on one store. Give every part of the "
                f"session (the repository, the outbox, the worker) the same store object."
            )

    def join(self, transaction: Transaction[Any]) -> None:
        """Read and write in `transaction` (on this repository's store) for the next unit.

        The repository then commits, rolls back and closes it as its own.
        """
        self.check_store(transaction.store)
        self.transaction = transaction

    def begin(self) -> None:
        """Open the unit of work's transaction, unless it joined one."""
        if self.transaction is None:
            self.transaction = self._store.begin()

    async def abegin(self) -> None:
        """`begin` for async stores."""
        if self.transaction is None:
            self.transaction = await self._store.abegin()

    def commit(self) -> None:
        """Write every changed aggregate and every new event, then commit; or nothing."""
        self._saved(self._open().commit_after(self._save))

    async def acommit(self) -> None:
        """`commit` for async stores."""
        self._saved(await self._open().acommit_after(self._save))

    def rollback(self) -> None:
        """Roll the transaction back and forget the aggregates, which may be stale now."""
        self._forget()
        if self.transaction is not None:
            self.transaction.rollback()

    async def arollback(self) -> None:
        """`rollback` for async stores."""
        self._forget()
        if self.transaction is not None:
            await self.transaction.arollback()

    def close(self) -> None:
        """Close the transaction, rolling back what was not committed."""
        self._forget()
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            transaction.close()

    async def aclose(self) -> None:
        """`close` for async stores."""
        self._forget()
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            await transaction.aclose()

    def _forget(self) -> None:
        self.aggregates.clear()
        self.versions.clear()
        self.states.clear()
        self.recorded.clear()


def next_version(expected: int, events: list[StoredEvent]) -> int:
    """The version after a write: one per event, and one for a change without events.

    A change without events still needs a new version, for the next writer's check.
    """
    return expected + max(1, len(events))
