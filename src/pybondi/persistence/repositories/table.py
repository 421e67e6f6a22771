"""`TableRepository`: each aggregate a row of a SQL table of yours, its events in the log."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.persistence.records import Records, StoredEvent, TableRecords
from pybondi.persistence.repositories.base import StoreRepository, next_version
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import Store

__all__ = ["TableRepository"]

A = TypeVar("A", bound=Aggregate)


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
        version = next_version(expected, events)
        self._rows(records).write_row(
            self.table,
            state,
            self.id_column,
            version_column=self.version_column,
            version=version,
            expected=expected,
        )
        return version, state
