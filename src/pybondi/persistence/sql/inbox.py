"""The inbox's table and statements, and its reads and writes on a SQL transaction.

One table, named with the store's prefix: `inbox`, one row per message a consumer group
handled, keyed by (group, message id). The worker claims it in the transaction of the
message's own work: committed together, a message is handled once in effect, however
often the broker delivers it; a rolled-back transaction leaves no row, and the message
can be handled again. A claim waits while another transaction holds an uncommitted row
for the same message (SQLite: for the database's one writer): it gets False if that one
commits, True if it rolls back.

Message ids are at most `ID_LENGTH` characters of UTF-8 text without NUL (see
`pybondi.persistence.records.id_problem`): the inbox keeps nothing else.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pybondi.persistence.records import InboxRecords, id_problem
from pybondi.persistence.sql.query import (
    NAME,
    STREAM_LENGTH,
    TIMESTAMP,
    Query,
    insert_ignoring_duplicates,
)

if TYPE_CHECKING:
    from pybondi.messaging.envelope import Envelope
    from pybondi.persistence.sql.executor import Executor

__all__ = ["InboxStatements", "SQLInbox"]


class InboxStatements:
    """The inbox's table and statements for one dialect."""

    def __init__(self, dialect: sa.Dialect, metadata: sa.MetaData, prefix: str) -> None:
        self.inbox = inbox = sa.Table(
            f"{prefix}inbox",
            metadata,
            sa.Column("consumer_group", NAME, primary_key=True),
            sa.Column("message_id", NAME, primary_key=True),
            sa.Column("topic", NAME, nullable=False),
            sa.Column("handled_at", TIMESTAMP, nullable=False, index=True),
        )

        def compiled(statement: Any) -> Query:
            return Query(statement, dialect)

        param = sa.bindparam
        row = (inbox.c.consumer_group == param("g"), inbox.c.message_id == param("m"))
        self.has = compiled(sa.select(sa.literal(1)).where(*row))
        # On MariaDB a plain INSERT, whose duplicate key error (1062) the caller catches.
        self.claim = compiled(
            insert_ignoring_duplicates(dialect, inbox).values(
                consumer_group=param("g"),
                message_id=param("m"),
                topic=param("t"),
                handled_at=param("at"),
            )
        )
        self.forget = compiled(inbox.delete().where(*row))
        self.purge = compiled(inbox.delete().where(inbox.c.handled_at < param("before")))


class SQLInbox(InboxRecords):
    """The inbox's reads and writes in one transaction; see `InboxRecords`."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._sql = executor.statements.inbox

    def has(self, group: str, message_id: str) -> bool:
        """Whether the group's inbox has the message (as committed, or by this transaction)."""
        found = self._executor.execute(self._sql.has, {"g": group, "m": message_id})
        return found.fetchone() is not None

    def claim(self, group: str, envelope: Envelope) -> bool:
        """Add the message to the group's inbox; False if it was there already.

        While another transaction holds an uncommitted row for the same message, this
        waits for it to end (SQLite: for the database's one writer): False if it
        committed, True if it rolled back.
        """
        check_names(group, envelope.topic)
        if problem := id_problem(envelope.id):
            raise ValueError(f"The inbox cannot keep message {envelope.id[:40]!r}...: {problem}.")
        return self.add(group, envelope.id, envelope.topic)

    def add(self, group: str, message_id: str, topic: str) -> bool:
        """`claim` with the id as given (a dead letter's bounded one); False if there."""
        self._executor.writing()
        now = self._executor.timestamp(datetime.now(UTC))
        values = {"g": group, "m": message_id, "t": topic, "at": now}
        return self._executor.written(self._sql.claim, values)

    def forget(self, group: str, message_id: str) -> None:
        """Remove the message from the group's inbox (a replay, a temporary claim)."""
        self._executor.writing()
        self._executor.execute(self._sql.forget, {"g": group, "m": message_id})

    def purge(self, before: datetime) -> int:
        """Delete the inbox rows of messages handled before `before`; return how many."""
        self._executor.writing()
        before_then = self._executor.timestamp(before)
        return int(self._executor.execute(self._sql.purge, {"before": before_then}).rowcount)


def check_names(group: str, topic: str) -> None:
    """Refuse, clearly, names longer than the inbox's columns (the database would too)."""
    for what, value in (("group", group), ("topic", topic)):
        if len(value) > STREAM_LENGTH:
            raise ValueError(
                f"A {what} is at most {STREAM_LENGTH} characters in the inbox; "
                f"{value[:40]!r}... has {len(value)}."
            )
