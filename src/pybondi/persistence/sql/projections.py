"""The projections' table and statements, and its reads and writes on a SQL transaction.

One table, named with the store's prefix: `projections`, one row per projection name,
with its checkpoint (the position of the last event of the log it handled) and the lease
of the runner working on it. A runner moves the checkpoint in the transaction that
writes the projection's view, with an UPDATE that matches only while it holds the lease
and the checkpoint is where it read it: a second runner advancing from the same
checkpoint waits on the row (SQLite: for the database's one writer) and then matches
nothing, so that no event's effect is committed twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pybondi.persistence.records import Checkpoint, ProjectionRecords
from pybondi.persistence.sql.query import NAME, TIMESTAMP, Query, insert_ignoring_duplicates

if TYPE_CHECKING:
    from pybondi.persistence.sql.executor import Executor

__all__ = ["ProjectionStatements", "SQLProjections"]


class ProjectionStatements:
    """The projections' table and statements for one dialect."""

    def __init__(
        self, dialect: sa.Dialect, metadata: sa.MetaData, prefix: str, head: sa.Select[Any]
    ) -> None:
        self.projections = projections = sa.Table(
            f"{prefix}projections",
            metadata,
            sa.Column("name", NAME, primary_key=True),
            sa.Column("position", sa.BigInteger, nullable=False),
            sa.Column("owner", sa.String(64)),
            sa.Column("lease_until", TIMESTAMP),
        )

        def compiled(statement: Any) -> Query:
            return Query(statement, dialect)

        param = sa.bindparam
        name_is, owner_is = projections.c.name == param("n"), projections.c.owner == param("o")
        self.get = compiled(
            sa.select(projections.c.position, projections.c.owner, projections.c.lease_until).where(
                name_is
            )
        )
        self.head = compiled(head)  # the log's (see `Statements`)
        self.new = compiled(
            insert_ignoring_duplicates(dialect, projections).values(name=param("n"), position=0)
        )
        self.claim = compiled(
            projections.update()
            .where(
                name_is,
                sa.or_(
                    projections.c.owner.is_(None),
                    owner_is,
                    projections.c.lease_until < param("now"),
                ),
            )
            .values(owner=param("o"), lease_until=param("u"))
        )
        self.position = compiled(sa.select(projections.c.position).where(name_is))
        self.advance = compiled(
            projections.update()
            .where(name_is, owner_is, projections.c.position == param("a"))
            .values(position=param("p"), lease_until=param("u"))
        )
        self.renew = compiled(
            projections.update().where(name_is, owner_is).values(lease_until=param("u"))
        )
        self.reset = compiled(projections.update().where(name_is, owner_is).values(position=0))
        self.release = compiled(
            projections.update().where(name_is, owner_is).values(owner=None, lease_until=None)
        )


class SQLProjections(ProjectionRecords):
    """The checkpoints' reads and writes in one transaction; see `ProjectionRecords`."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._sql = executor.statements.projections

    def get(self, name: str) -> Checkpoint | None:
        """SELECT the projection's row."""
        row = self._executor.execute(self._sql.get, {"n": name}).fetchone()
        if row is None:
            return None
        position, owner, until = row
        if until is not None:
            until = self._executor.statements.timestamp_out(until)
        return Checkpoint(name, int(position), owner, until)

    def head(self) -> int:
        """SELECT the log's head: the last position handed out by a committed append."""
        return int(self._executor.execute(self._sql.head, {}).fetchone()[0])

    def claim(self, name: str, owner: str, *, now: datetime, until: datetime) -> int | None:
        """Take or renew the lease (adding the projection's row at 0 the first time)."""
        self._executor.writing()
        values = {
            "n": name,
            "o": owner,
            "now": self._executor.timestamp(now),
            "u": self._executor.timestamp(until),
        }
        if self._executor.execute(self._sql.claim, values).rowcount != 1:
            # The row only once per projection, and not on every claim: on MariaDB, two
            # transactions inserting one new row can deadlock if the first rolls back.
            if self._executor.execute(self._sql.position, {"n": name}).fetchone() is not None:
                return None  # another runner holds it
            self._executor.written(self._sql.new, {"n": name})
            if self._executor.execute(self._sql.claim, values).rowcount != 1:
                return None
        return int(self._executor.execute(self._sql.position, {"n": name}).fetchone()[0])

    def advance(self, name: str, owner: str, *, after: int, to: int, until: datetime) -> bool:
        """UPDATE the checkpoint where `owner` holds the lease and it is still at `after`."""
        self._executor.writing()
        values = {"n": name, "o": owner, "a": after, "p": to, "u": self._executor.timestamp(until)}
        return bool(self._executor.execute(self._sql.advance, values).rowcount == 1)

    def renew(self, name: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds; False if it holds none."""
        self._executor.writing()
        values = {"n": name, "o": owner, "u": self._executor.timestamp(until)}
        return bool(self._executor.execute(self._sql.renew, values).rowcount == 1)

    def reset(self, name: str, owner: str) -> bool:
        """Set the checkpoint back to 0; False unless `owner` holds the lease."""
        self._executor.writing()
        return bool(self._executor.execute(self._sql.reset, {"n": name, "o": owner}).rowcount == 1)

    def release(self, name: str, owner: str) -> None:
        """Give up the lease `owner` holds, if it holds it."""
        self._executor.writing()
        self._executor.execute(self._sql.release, {"n": name, "o": owner})
