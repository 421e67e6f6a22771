"""`EventSourcedRepository`: each aggregate kept as its events, rebuilt by applying them."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar
from weakref import WeakSet

from pybondi.aggregate import Aggregate
from pybondi.exceptions import SerializationError
from pybondi.persistence.records import Record, Records, Snapshot, StoredEvent
from pybondi.persistence.repositories.base import StoreRepository
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import Store

__all__ = ["EventSourcedRepository"]

# The package's name, as before it was split: where users find the snapshot warnings.
logger = logging.getLogger("pybondi.persistence.repositories")

A = TypeVar("A", bound=Aggregate)


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
        if not records.checks_stream_versions:
            # The stream's version is checked on its record; where the store checks it
            # as the events are appended (SQLite), that row would be one write more.
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


# The aggregate types `_check_blank` passed. A repository is often built per unit of
# work, and `inspect.signature` cost more than the rest of its construction.
_blank_callable: WeakSet[type[Aggregate]] = WeakSet()


def _check_blank(aggregate_type: type[Aggregate]) -> None:
    """Refuse at once an aggregate type that cannot be called with the id alone."""
    if aggregate_type in _blank_callable:
        return
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
    _blank_callable.add(aggregate_type)
