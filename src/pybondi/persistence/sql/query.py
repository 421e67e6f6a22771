"""What every SQL module shares: the column types, and statements compiled per dialect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from pybondi.persistence.records import ID_LENGTH

__all__ = [
    "NAME",
    "POSITION",
    "STREAM_LENGTH",
    "TEXT",
    "TIMESTAMP",
    "Query",
    "insert_ignoring_duplicates",
    "is_duplicate",
    "unchanged",
    "upsert",
]

STREAM_LENGTH = ID_LENGTH

# The column types of pybondi's tables, the outbox's included.
TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# A place in the log. SQLite's INTEGER PRIMARY KEY is the table's own rowid: an event's
# INSERT writes no separate index of positions, and max(position) reads the last row.
# (Files made before 2.0.0 final have BIGINT there, which works the same, one index more.)
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Names compare byte for byte: MariaDB's default collation would make 'ada', 'ADA' and
# 'ada ' one aggregate (or one topic).
NAME = sa.String(STREAM_LENGTH).with_variant(
    mysql.VARCHAR(STREAM_LENGTH, collation="utf8mb4_nopad_bin"), "mysql", "mariadb"
)


class Query:
    """A statement compiled once for a dialect: its SQL, and how to pass its parameters."""

    __slots__ = ("fixed", "names", "sql")

    def __init__(self, statement: Any, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        # Drivers with positional placeholders (?, %s) take a tuple in this order.
        self.names = tuple(compiled.positiontup or ()) if compiled.positional else None
        # Values written into the statement itself, such as the 1 of `id == 1`.
        binds = compiled.binds.items()
        self.fixed = {name: bind.value for name, bind in binds if not bind.required}

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The values as the driver takes them."""
        if self.fixed:
            values = {**self.fixed, **values}
        if self.names is None:
            return values
        return tuple(values[name] for name in self.names)


def insert_ignoring_duplicates(dialect: sa.Dialect, table: sa.Table) -> Any:
    """An INSERT that, on a duplicate primary key, inserts nothing; the transaction goes on.

    Any other constraint it breaks is still an error. On MariaDB and MySQL it is a plain
    INSERT whose duplicate key error the caller catches.
    """
    key = [column.name for column in table.primary_key.columns]
    if dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=key)
    if dialect.name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=key)
    return table.insert()  # MariaDB/MySQL: see is_duplicate


def upsert(dialect: sa.Dialect, table: sa.Table, columns: list[str]) -> Any:
    """An INSERT that replaces `columns` of the row with the same primary key."""
    if dialect.name in ("postgresql", "sqlite"):
        module: Any = postgresql if dialect.name == "postgresql" else sqlite
        statement = module.insert(table)
        replaced = {name: statement.excluded[name] for name in columns}
        return statement.on_conflict_do_update(index_elements=["stream"], set_=replaced)
    statement = mysql.insert(table)
    return statement.on_duplicate_key_update({name: statement.inserted[name] for name in columns})


def unchanged(value: Any) -> Any:
    """The value as it is: a conversion that converts nothing."""
    return value


def is_duplicate(dialect: sa.Dialect, error: sa.exc.IntegrityError) -> bool:
    """Whether an INSERT failed only because its row exists (MariaDB/MySQL: 1062).

    PostgreSQL and SQLite INSERT with ON CONFLICT DO NOTHING instead. MariaDB's INSERT
    IGNORE would do that too, but it also turns truncated values, NULLs in NOT NULL
    columns and broken foreign keys into warnings; a duplicate key error there undoes
    the statement only, and the transaction goes on.
    """
    code = getattr(error.orig, "args", ())[:1]
    return dialect.name in ("mysql", "mariadb") and code == (1062,)
