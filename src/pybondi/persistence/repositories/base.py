"""Repositories on a store: state-stored, in your own table, or event-sourced; sync and async.

    registry = Registry()
    registry.register(Account, name="accounts.Account")
    registry.register(Deposited, name="accounts.Deposited")

    store = SQLStore("sqlite:///bank.db")
    store.create_tables()
    with Session(messagebus, StateRepository(store, Account, registry), publisher) as session:
        account = session.repository.get("acc-1")     # NotFound if there is none
        session.execute(Deposit(account.id, 10))      # committed as one transaction

`StateRepository` keeps each aggregate's state as a JSON document beside its version,
and its events in the log. `TableRepository` keeps it as a row of a SQL table of yours.
`EventSourcedRepository` keeps only events, rebuilds each aggregate from its stream (from
a snapshot, if it has one), and calls its `apply(event)`.

All three open one store transaction per unit of work: `commit()` writes every changed
aggregate, with its version checked, and every event its aggregates published, then
commits; a stale version raises `ConcurrencyError` and nothing is written. Each step is
a sync function of the transaction's records, which async stores run without blocking:
the logic is written once. On `rollback()` the identity map is emptied, so that the next
`get` reads the stored state again.
"""

from __future__ import annotations

import inspect
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.exceptions import NotFound, SerializationError, SessionError
from pybondi.messages import Event
from pybondi.persistence.records import Record, Records, Snapshot, StoredEvent, TableRecords
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import Store, Transaction
from pybondi.repository import Repository

__all__ = ["EventSourcedRepository", "StateRepository", "StoreRepository", "TableRepository"]

logger = logging.getLogger("pybondi.persistence.repositories")

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
        transaction = self._open()
        saved = transaction.run(self._save)
        transaction.commit()
        self._saved(saved)

    async def acommit(self) -> None:
        """`commit` for async stores."""
        transaction = self._open()
        saved = await transaction.arun(self._save)
        await transaction.acommit()
        self._saved(saved)

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


class StateRepository(StoreRepository[A]):
    """Stores each aggregate's state as a JSON document, with a version, and its events.

    The aggregate type must be registered in `registry` (a dataclass, a pydantic model
    or a plain class); its registered name names the stored rows. Renaming the class is
    safe; changing its fields is, with a new registered version and an upcaster.
    """

    def __init__(
        self,
        store: Store[Records],
        aggregate_type: type[A],
        registry: Registry,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(store, aggregate_type, registry, name=name)
        self.type_name = registry.name_of(aggregate_type)

    def _load(self, records: Records, id: Any) -> A | None:
        record = records.read(self.stream(id))
        if record is None or record.data is None:
            return None
        data = record.data
        aggregate = self._loading(
            id, "its state", lambda: self.registry.loads(self.type_name, record.schema, data, id=id)
        )
        self.versions[id], self.states[id] = record.version, data
        return aggregate  # type: ignore[no-any-return]

    def _save_aggregate(
        self, records: Records, aggregate: A, events: list[StoredEvent], expected: int
    ) -> tuple[int, object] | None:
        id = aggregate.root.id
        state = self.registry.dumps(aggregate)
        if not events and state.data == self.states.get(id):
            return None
        version = _next_version(expected, events)
        records.write(Record(self.stream(id), version, state.version, state.data), expected)
        return version, state.data


class EventSourcedRepository(StoreRepository[A]):
    """Keeps each aggregate as the stream of its events, and rebuilds it from them.

    The aggregate type needs an `apply(event)` method that changes its state as the event
    says; the repository builds a blank one with `create(id)` (default: the aggregate
    type called with the id) and applies each stored event in order. Publish each event
    from the aggregate's methods as they apply it, and the session records it.

    With `snapshot_every=N`, a snapshot of the state (the aggregate type must then be
    registered, not only named) is kept every N events, and loading starts from it. A
    snapshot written under another registered version of the aggregate type is ignored,
    not trusted; one that does not load, or cannot be made, is skipped with a warning.
    """

    def __init__(
        self,
        store: Store[Records],
        aggregate_type: type[A],
        registry: Registry,
        *,
        name: str | None = None,
        create: Callable[[Any], A] | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        super().__init__(store, aggregate_type, registry, name=name)
        if not callable(getattr(aggregate_type, "apply", None)):
            raise TypeError(
                f"{aggregate_type.__name__} has no apply(event) method: an event-sourced "
                f"aggregate is rebuilt by applying its stored events to a blank one."
            )
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every must be at least 1, got {snapshot_every}.")
        # Snapshots store the state: its type must be registered (the error says how).
        self.type_name = registry.name_of(aggregate_type) if snapshot_every else ""
        if create is None:
            _check_blank(aggregate_type)
        self.create: Callable[[Any], A] = create or aggregate_type
        self.snapshot_every = snapshot_every

    def _load(self, records: Records, id: Any) -> A | None:
        stream = self.stream(id)
        aggregate, version = self._from_snapshot(records, id), 0
        if aggregate is not None:
            version = self.versions[id]
        events = records.read_stream(stream, after=version)
        if aggregate is None:
            if not events:
                return None
            aggregate = self.create(id)
        apply = aggregate.apply  # type: ignore[attr-defined]
        for stored in events:
            event = self._loading(
                id,
                f"event {stored.version}",
                partial(self.registry.loads, stored.type, stored.schema, stored.data),
            )
            apply(event)
        if events:
            self.versions[id] = events[-1].version
        return aggregate

    def _from_snapshot(self, records: Records, id: Any) -> A | None:
        if self.snapshot_every is None:
            return None
        snapshot = records.read_snapshot(self.stream(id))
        if snapshot is None or snapshot.schema != self.registry.version_of(self.aggregate_type):
            return None
        try:
            aggregate: A = self.registry.loads(
                self.type_name, snapshot.schema, snapshot.data, id=id
            )
        except SerializationError:
            # A snapshot only saves time: one that does not load is skipped, not trusted,
            # and the aggregate is rebuilt from its events.
            logger.warning(
                "Ignoring the snapshot of %s at version %d, which does not load",
                self.stream(id),
                snapshot.version,
                exc_info=True,
            )
            return None
        self.versions[id] = snapshot.version
        return aggregate

    def _save_aggregate(
        self, records: Records, aggregate: A, events: list[StoredEvent], expected: int
    ) -> tuple[int, object] | None:
        if not events:
            return None
        version = events[-1].version
        stream = self.stream(aggregate.root.id)
        records.write(Record(stream, version, 1, None), expected)
        every = self.snapshot_every
        if every is not None and version // every > expected // every:
            self._snapshot(records, aggregate, stream, version)
        return version, None

    def _snapshot(self, records: Records, aggregate: A, stream: str, version: int) -> None:
        try:
            state = self.registry.dumps(aggregate)
        except SerializationError:
            # The events are what is stored; a snapshot only saves time. One that cannot
            # be made is skipped, loudly, rather than failing the commit.
            logger.warning(
                "Skipping the snapshot of %s at version %d", stream, version, exc_info=True
            )
            return
        records.write_snapshot(Snapshot(stream, version, state.version, state.data))


class TableRepository(StoreRepository[A]):
    """Keeps each aggregate as a row of a SQL table of your own, and its events in the log.

    The table (a SQLAlchemy `Table`, which you create) has the aggregate's id as primary
    key and an integer version column that pybondi keeps. `to_row(aggregate)` returns the
    other columns' values; `from_row(row)` builds the aggregate from a row, given as a
    mapping of column names to values (the id and the version included). Writes check
    the version as `StateRepository` does, and only changed rows are written.

        accounts = TableRepository(store, Account, registry, table,
                                   to_row=lambda a: {"owner": a.owner, "balance": a.balance},
                                   from_row=lambda row: Account(row["id"], row["owner"], ...))
    """

    def __init__(
        self,
        store: Store[Records],
        aggregate_type: type[A],
        registry: Registry,
        table: Any,
        *,
        to_row: Callable[[A], dict[str, Any]],
        from_row: Callable[[Mapping[str, Any]], A],
        id_column: str = "id",
        version_column: str = "version",
        name: str | None = None,
    ) -> None:
        super().__init__(store, aggregate_type, registry, name=name)
        for column in (id_column, version_column):
            if column not in table.c:
                raise ValueError(
                    f"Table {table.name!r} has no column {column!r}; pass the names of its "
                    f"id and version columns as id_column= and version_column=."
                )
        self.table = table
        self.to_row, self.from_row = to_row, from_row
        self.id_column, self.version_column = id_column, version_column

    def _rows(self, records: Records) -> TableRecords:
        if not isinstance(records, TableRecords):
            raise TypeError(
                f"TableRepository needs a SQL store (pybondi.persistence.SQLStore), got "
                f"{self._store!r}. Use StateRepository for other stores."
            )
        return records

    def _load(self, records: Records, id: Any) -> A | None:
        row = self._rows(records).read_row(self.table, self.id_column, id)
        if row is None:
            return None
        version = row[self.version_column]
        if not isinstance(version, int) or version < 1:
            raise ValueError(
                f"{self.table.name} row {id!r} has version {version!r}: versions start at 1 "
                f"(0 means a row not written yet). Give existing rows version 1, as in "
                f"UPDATE {self.table.name} SET {self.version_column} = 1."
            )
        aggregate = self._loading(id, "its row", lambda: self.from_row(row))
        # What to_row gives now, not the raw row: from_row may convert values (to aware
        # datetimes, say) that would never compare equal to the row again.
        self.versions[id], self.states[id] = version, self._state(aggregate)
        return aggregate

    def _state(self, aggregate: A) -> dict[str, Any]:
        return {**self.to_row(aggregate), self.id_column: aggregate.root.id}

    def _save_aggregate(
        self, records: Records, aggregate: A, events: list[StoredEvent], expected: int
    ) -> tuple[int, object] | None:
        id = aggregate.root.id
        state = self._state(aggregate)
        if not events and state == self.states.get(id):
            return None
        version = _next_version(expected, events)
        self._rows(records).write_row(
            self.table,
            state,
            self.id_column,
            version_column=self.version_column,
            version=version,
            expected=expected,
        )
        return version, state


def _check_blank(aggregate_type: type[Aggregate]) -> None:
    """Refuse at once an aggregate type that cannot be called with the id alone."""
    try:
        inspect.signature(aggregate_type).bind("id")
    except ValueError:  # a signature Python cannot read: let the call decide
        return
    except TypeError as error:
        name = aggregate_type.__name__
        raise TypeError(
            f"An event-sourced {name} is rebuilt by applying its events to a blank one, made "
            f"with {name}(id) unless create= says otherwise; {name}(id) cannot be called "
            f"({error}). Pass create=, a function of the id that returns a blank {name}: "
            f"EventSourcedRepository(store, {name}, registry, create=lambda id: {name}(id, ...))."
        ) from None


def _next_version(expected: int, events: list[StoredEvent]) -> int:
    """The version after a write: one per event, and one for a change without events.

    A change without events still needs a new version, for the next writer's check.
    """
    return expected + max(1, len(events))
