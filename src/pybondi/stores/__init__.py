"""Stores: where repositories keep aggregates and events.

`MemoryStore` is the embedded in-process default; `SQLStore` (SQLite, PostgreSQL,
MariaDB through SQLAlchemy 2) needs an extra, `pip install 'pybondi[sqlite]'` or
`[postgres]` or `[mariadb]`, and is imported only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pybondi.stores.base import Record, Records, Snapshot, Store, StoredEvent, Transaction
from pybondi.stores.memory import MemoryStore

if TYPE_CHECKING:
    from pybondi.stores.sql import SQLStore

__all__ = [
    "MemoryStore",
    "Record",
    "Records",
    "SQLStore",
    "Snapshot",
    "Store",
    "StoredEvent",
    "Transaction",
]


def __getattr__(name: str) -> Any:
    # SQLAlchemy is an optional dependency: import it only for the user who asks for SQL.
    if name == "SQLStore":
        from pybondi.stores.sql import SQLStore  # noqa: PLC0415

        return SQLStore
    raise AttributeError(f"module 'pybondi.stores' has no attribute {name!r}")
