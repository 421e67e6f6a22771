"""The dead letters' table and statements, and their reads and writes on a SQL transaction.

One table, named with the store's prefix: `dead_letters`, the messages a group gave up
on (they failed too often, or could not be read), with the error, until they are
replayed or discarded. A message that failed its attempts is in the inbox too, so that a
redelivery of it is skipped and a replay cannot double its effects: its letter
`holds_inbox`. A message that could not be read is not: the group never handled it, so a
corrected message with the same id is handled as new; a redelivery of the same bad
message (same id, same body) finds its dead letter and makes no second one. A dead letter
keeps a bounded form of an id the inbox cannot keep (`bounded_id`), and the id in full in
its `message-id` header.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import (
    REPLAYED_AT,
    REPLAYED_FOR,
    DeadLetter,
    DeadLetterRecords,
    bounded_id,
)
from pybondi.persistence.sql.inbox import check_names
from pybondi.persistence.sql.query import NAME, TEXT, TIMESTAMP, Query

if TYPE_CHECKING:
    from pybondi.persistence.sql.executor import Executor
    from pybondi.persistence.sql.inbox import SQLInbox
    from pybondi.persistence.sql.outbox import SQLOutbox

__all__ = ["DeadLetterStatements", "SQLDeadLetters"]

# A dead letter's id: SQLite numbers rows (with AUTOINCREMENT, never reusing an id) only
# in a column of type INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class DeadLetterStatements:
    """The dead letters' table and statements for one dialect."""

    def __init__(self, dialect: sa.Dialect, metadata: sa.MetaData, prefix: str) -> None:
        self.dead_letters = dead = sa.Table(
            f"{prefix}dead_letters",
            metadata,
            sa.Column("id", _ID, primary_key=True, autoincrement=True),
            sa.Column("consumer_group", NAME, nullable=False),
            sa.Column("topic", NAME, nullable=False),
            sa.Column("message_id", NAME, nullable=False),
            sa.Column("headers", TEXT, nullable=False),
            sa.Column("body", TEXT, nullable=False),
            sa.Column("error", TEXT, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("failed_at", TIMESTAMP, nullable=False),
            # Whether the group's inbox row of the message is this letter's (it failed
            # its attempts), so that a replay removes it; not for an unreadable message.
            sa.Column("holds_inbox", sa.Boolean, nullable=False),
            sa.Index(f"{prefix}dead_letters_group_topic", "consumer_group", "topic"),
            sa.Index(f"{prefix}dead_letters_group_message", "consumer_group", "message_id"),
            sqlite_autoincrement=True,
        )

        def compiled(statement: Any) -> Query:
            return Query(statement, dialect)

        param = sa.bindparam
        insert = dead.insert().values(
            consumer_group=param("g"),
            topic=param("t"),
            message_id=param("m"),
            headers=param("h"),
            body=param("b"),
            error=param("e"),
            attempts=param("n"),
            failed_at=param("at"),
            holds_inbox=param("i"),
        )
        # The new row's id: RETURNING on PostgreSQL, the cursor's lastrowid elsewhere
        # (whether MariaDB has INSERT..RETURNING is known only once connected).
        self.returning = dialect.name == "postgresql"
        self.insert = compiled(insert.returning(dead.c.id) if self.returning else insert)
        columns = (
            dead.c.id,
            dead.c.consumer_group,
            dead.c.topic,
            dead.c.message_id,
            dead.c.headers,
            dead.c.body,
            dead.c.error,
            dead.c.attempts,
            dead.c.failed_at,
            dead.c.holds_inbox,
        )
        id_is = dead.c.id == param("id")
        # The bodies compare in Python: MariaDB's text compares ignoring case.
        self.bodies = compiled(
            sa.select(dead.c.body).where(
                dead.c.consumer_group == param("g"), dead.c.message_id == param("m")
            )
        )
        self.get = compiled(sa.select(*columns).where(id_is))
        # One statement per combination of filters: `:g IS NULL OR ...` would leave
        # PostgreSQL unable to tell the parameter's type, and the planner the index.
        self.page: dict[tuple[bool, bool], Query] = {}
        for by_group in (False, True):
            for by_topic in (False, True):
                where = [dead.c.id > param("a")]
                if by_group:
                    where.append(dead.c.consumer_group == param("g"))
                if by_topic:
                    where.append(dead.c.topic == param("t"))
                self.page[by_group, by_topic] = compiled(
                    sa.select(*columns).where(*where).order_by(dead.c.id).limit(param("l"))
                )
        self.delete = compiled(dead.delete().where(id_is))


class SQLDeadLetters(DeadLetterRecords):
    """The dead letters' reads and writes in one transaction; see `DeadLetterRecords`."""

    def __init__(self, executor: Executor, inbox: SQLInbox, outbox: SQLOutbox) -> None:
        self._executor = executor
        self._sql = executor.statements.dead_letters
        self._inbox = inbox
        self._outbox = outbox

    def add(
        self, group: str, envelope: Envelope, error: str, attempts: int, *, claim: bool = True
    ) -> int | None:
        """Keep a message the group gave up on; see `DeadLetterRecords.add`."""
        check_names(group, envelope.topic)
        message_id, headers = bounded_id(envelope.id), envelope.headers
        if message_id != envelope.id:
            headers = {**headers, "message-id": headers.get("message-id", envelope.id)}
        body = _text(envelope.body.decode("utf-8", errors="replace"))
        if claim and not self._inbox.claim(group, envelope):
            return None
        if not claim and not self._first_of(group, message_id, envelope.topic, body):
            return None
        executor = self._executor
        cursor = executor.execute(
            self._sql.insert,
            {
                "g": group,
                "t": envelope.topic,
                "m": message_id,
                "h": json.dumps(headers),
                "b": body,
                "e": _text(error),
                "n": attempts,
                "at": executor.timestamp(datetime.now(UTC)),
                "i": claim,
            },
        )
        return int(cursor.fetchone()[0] if self._sql.returning else cursor.lastrowid)

    def _first_of(self, group: str, message_id: str, topic: str, body: str) -> bool:
        """Whether neither the inbox nor a dead letter of the group has this message.

        The inbox row, taken for this transaction only, makes a concurrent dead-lettering
        of the same message wait, then find this letter.
        """
        if not self._inbox.add(group, message_id, topic):
            return False
        row = {"g": group, "m": message_id}
        bodies = self._executor.execute(self._sql.bodies, row).fetchall()
        self._inbox.forget(group, message_id)
        return all(kept != body for (kept,) in bodies)

    def page(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """The dead letters with ids above `after`, in id order, of a group or topic."""
        query = self._sql.page[group is not None, topic is not None]
        values: dict[str, Any] = {"a": after, "l": limit}
        if group is not None:
            values["g"] = group
        if topic is not None:
            values["t"] = topic
        return [self._letter(row) for row in self._executor.execute(query, values).fetchall()]

    def get(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        row = self._executor.execute(self._sql.get, {"id": id}).fetchone()
        return None if row is None else self._letter(row)

    def replay(self, ids: Sequence[int]) -> list[DeadLetter]:
        """Send the dead letters' messages again; see `DeadLetterRecords.replay`.

        `replayed-at` makes a replay a new message to NATS's duplicate window, which would
        drop an id it saw lately; `replayed-for` names the group, for information.
        """
        self._executor.writing()
        replayed: list[DeadLetter] = []
        # In id order, so that transactions replaying the same ones lock them in one order.
        for id in sorted(set(ids)):
            letter = self.get(id)
            # The DELETE, not the read, decides: of two transactions replaying a dead
            # letter, the second waits for the first, and then deletes nothing.
            if letter is None or self._executor.execute(self._sql.delete, {"id": id}).rowcount != 1:
                continue
            if letter.holds_inbox:  # else the row, if any, is a handled message's
                self._inbox.forget(letter.group, letter.message_id)
            replayed.append(letter)
        if replayed:
            replayed_at = datetime.now(UTC).isoformat()
            self._outbox.enqueue([_envelope(letter, replayed_at) for letter in replayed])
        return replayed

    def discard(self, ids: Sequence[int]) -> int:
        """Delete dead letters; return how many there were.

        The inbox rows of those that held one stay: a redelivery of such a message is
        still skipped. An unreadable message delivered again once its letter is gone
        makes a new one.
        """
        self._executor.writing()
        delete = self._sql.delete
        return sum(
            int(self._executor.execute(delete, {"id": id}).rowcount) for id in sorted(set(ids))
        )

    def _letter(self, row: Sequence[Any]) -> DeadLetter:
        id, group, topic, message_id, headers, body, error, attempts, failed_at, holds = row
        return DeadLetter(
            id=int(id),
            group=group,
            topic=topic,
            message_id=message_id,
            headers=json.loads(headers),
            body=body,
            error=error,
            attempts=int(attempts),
            failed_at=self._executor.statements.timestamp_out(failed_at),
            holds_inbox=bool(holds),
        )


def _envelope(letter: DeadLetter, replayed_at: str) -> Envelope:
    headers = {**letter.headers, REPLAYED_AT: replayed_at, REPLAYED_FOR: letter.group}
    return Envelope(letter.topic, letter.message_id, headers, letter.body.encode())


def _text(value: str) -> str:
    """Text any database keeps: PostgreSQL refuses NUL characters in text."""
    return value.replace("\x00", "\ufffd")
