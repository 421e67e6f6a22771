"""`StateRepository`: each aggregate's state as a JSON document, beside its version."""

from __future__ import annotations

from typing import Any, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.persistence.records import Record, Records, StoredEvent
from pybondi.persistence.repositories.base import StoreRepository, next_version
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import Store

__all__ = ["StateRepository"]

A = TypeVar("A", bound=Aggregate)


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
        version = next_version(expected, events)
        records.write(Record(self.stream(id), version, state.version, state.data), expected)
        return version, state.data
