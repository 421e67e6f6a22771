"""Persistence: aggregates, events and messages kept in a store.

    registry = Registry()                                  # your types, by stable names
    store = SQLStore("sqlite:///bank.db")                  # or MemoryStore(), PostgreSQL...
    repository = StateRepository(store, Account, registry)

- `serialization`: the `Registry` that turns messages and aggregates into JSON and back.
- `store`: what a store is (`Store`, `Transaction`) and the records a transaction reads
  and writes (`Records`, and the messaging records of the outbox, inbox and dead letters).
- `repositories`: `StateRepository`, `EventSourcedRepository`, `TableRepository`.
- `memory`: `MemoryStore`, in-process; `sql`: `SQLStore`, on SQLite, PostgreSQL and
  MariaDB through SQLAlchemy 2 (`pip install 'pybondi[sqlite]'`, `[postgres]`, `[mariadb]`).

Every name is imported on first use: `SQLStore` needs its extra, nothing else does.
"""

from typing import TYPE_CHECKING

from pybondi import _lazy

if TYPE_CHECKING:  # what __getattr__ imports on first use, for type checkers
    from pybondi.persistence.memory import MemoryStore as MemoryStore
    from pybondi.persistence.records import DeadLetter as DeadLetter
    from pybondi.persistence.records import MessagingRecords as MessagingRecords
    from pybondi.persistence.records import Record as Record
    from pybondi.persistence.records import Records as Records
    from pybondi.persistence.records import Snapshot as Snapshot
    from pybondi.persistence.records import StoredEvent as StoredEvent
    from pybondi.persistence.records import TableRecords as TableRecords
    from pybondi.persistence.repositories import EventSourcedRepository as EventSourcedRepository
    from pybondi.persistence.repositories import StateRepository as StateRepository
    from pybondi.persistence.repositories import StoreRepository as StoreRepository
    from pybondi.persistence.repositories import TableRepository as TableRepository
    from pybondi.persistence.serialization import Registry as Registry
    from pybondi.persistence.serialization import Serialized as Serialized
    from pybondi.persistence.sql import SQLStore as SQLStore
    from pybondi.persistence.store import MessagingStore as MessagingStore
    from pybondi.persistence.store import Store as Store
    from pybondi.persistence.store import Transaction as Transaction

__all__ = [
    "DeadLetter",
    "EventSourcedRepository",
    "MemoryStore",
    "MessagingRecords",
    "MessagingStore",
    "Record",
    "Records",
    "Registry",
    "SQLStore",
    "Serialized",
    "Snapshot",
    "StateRepository",
    "Store",
    "StoreRepository",
    "StoredEvent",
    "TableRecords",
    "TableRepository",
    "Transaction",
]

_MODULES = {
    "pybondi.persistence.memory": ["MemoryStore"],
    "pybondi.persistence.repositories": [
        "EventSourcedRepository",
        "StateRepository",
        "StoreRepository",
        "TableRepository",
    ],
    "pybondi.persistence.serialization": ["Registry", "Serialized"],
    "pybondi.persistence.records": [
        "DeadLetter",
        "MessagingRecords",
        "Record",
        "Records",
        "Snapshot",
        "StoredEvent",
        "TableRecords",
    ],
    "pybondi.persistence.store": ["MessagingStore", "Store", "Transaction"],
}
_LAZY: _lazy.Lazy = {
    "SQLStore": ("pybondi.persistence.sql", "sqlalchemy"),
    **{name: (module, None) for module, names in _MODULES.items() for name in names},
}

if not TYPE_CHECKING:
    __getattr__, __dir__ = _lazy.exports(__name__, globals(), _LAZY)

del TYPE_CHECKING
