"""The inbox's and dead letters' tables and statements, and their reads and writes.

Two tables, named with the store's prefix:

- `inbox`: one row per message a consumer group handled, keyed by (group, message id).
  The worker records it in the transaction of the message's own work: committed
  together, a message is handled once in effect, however often the broker delivers it;
  a rolled-back transaction leaves no row, and the message can be handled again;
- `dead_letters`: the messages a group gave up on (they failed too often, or could not
  be read), with the error, until they are replayed or discarded. A message that failed
  its attempts is in the inbox too, so that a redelivery of it is skipped, and a replay
  cannot double its effects: its letter `holds_inbox`. A message that could not be read
  is not: the group never handled it, so a corrected message with the same id is handled
  as new; a redelivery of the same bad message (same id, same body) finds its dead
  letter and makes no second one.

Message ids are at most `ID_LENGTH` characters of UTF-8 text without NUL: the inbox
keeps nothing else. A message whose id is not (`InboxStatements.id_problem`) cannot be
handled; its dead letter keeps a bounded form of the id (`bounded_id`), and the id in
full in its `message-id` header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from pybondi.deadletters import REPLAYED_FOR, DeadLetter
from pybondi.envelope import Envelope
from pybondi.stores._sqlstatements import (
    NAME,
    STREAM_LENGTH,
    TEXT,
    TIMESTAMP,
    Query,
    insert_ignoring_duplicates,
)

if TYPE_CHECKING:
    from pybondi.stores._sqlstatements import Statements

__all__ = ["ID_LENGTH", "InboxRecords", "InboxStatements", "bounded_id"]

ID_LENGTH = STREAM_LENGTH
"""The longest message id the inbox keeps."""
_KEPT_OF_LONG_IDS = 200  # characters of an unfit id a dead letter keeps, before a hash

# A dead letter's id: SQLite numbers rows (with AUTOINCREMENT, never reusing an id) only
# in a column of type INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class InboxStatements:
    """The inbox's and dead letters' tables and statements for one dialect."""

    def __init__(self, statements: Statements, metadata: sa.MetaData, prefix: str) -> None:
        dialect = statements.dialect
        text, timestamp, name = TEXT, TIMESTAMP, NAME
        self.inbox = inbox = sa.Table(
            f"{prefix}inbox",
            metadata,
            sa.Column("consumer_group", name, primary_key=True),
            sa.Column("message_id", name, primary_key=True),
            sa.Column("topic", name, nullable=False),
            sa.Column("handled_at", timestamp, nullable=False, index=True),
        )
        self.dead_letters = dead = sa.Table(
            f"{prefix}dead_letters",
            metadata,
            sa.Column("id", _ID, primary_key=True, autoincrement=True),
            sa.Column("consumer_group", name, nullable=False),
            sa.Column("topic", name, nullable=False),
            sa.Column("message_id", name, nullable=False),
            sa.Column("headers", text, nullable=False),
            sa.Column("body", text, nullable=False),
            sa.Column("error", text, nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("failed_at", timestamp, nullable=False),
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
        inbox_row = (inbox.c.consumer_group == param("g"), inbox.c.message_id == param("m"))
        self.is_handled = compiled(sa.select(sa.literal(1)).where(*inbox_row))
        # On MariaDB a plain INSERT, whose duplicate key error (1062) the caller catches.
        self.record = compiled(
            insert_ignoring_duplicates(dialect, inbox).values(
                consumer_group=param("g"),
                message_id=param("m"),
                topic=param("t"),
                handled_at=param("at"),
            )
        )
        self.forget = compiled(inbox.delete().where(*inbox_row))
        self.ping = compiled(sa.select(sa.literal(1)))
        self.purge = compiled(inbox.delete().where(inbox.c.handled_at < param("before")))

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
        self.insert_dead = compiled(insert.returning(dead.c.id) if self.returning else insert)
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
        self.dead_bodies = compiled(
            sa.select(dead.c.body).where(
                dead.c.consumer_group == param("g"), dead.c.message_id == param("m")
            )
        )
        self.dead_letter = compiled(sa.select(*columns).where(id_is))
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
        self.delete_dead = compiled(dead.delete().where(id_is))

    @staticmethod
    def id_problem(message_id: str, what: str = "message id") -> str | None:
        """Why the inbox cannot keep this message id (or group name), or None if it can."""
        if len(message_id) > ID_LENGTH:
            return (
                f"its {what} has {len(message_id)} characters, and the inbox keeps at most "
                f"{ID_LENGTH}"
            )
        if "\x00" in message_id:
            return f"its {what} has a NUL character, which databases do not keep in text"
        try:
            message_id.encode()
        except UnicodeEncodeError:
            return f"its {what} {message_id!r} is not UTF-8 text (it has a lone surrogate)"
        return None


class InboxRecords:
    """The inbox's and dead letters' reads and writes; `SQLRecords` has them."""

    statements: Statements

    if TYPE_CHECKING:  # SQLRecords' and OutboxRecords' own, which this class is mixed with

        def _execute(self, query: Query, values: dict[str, Any]) -> Any: ...
        def _written(self, query: Query, values: dict[str, Any]) -> bool: ...
        def _writing(self) -> None: ...
        def _timestamp(self, moment: datetime) -> Any: ...
        def enqueue(self, envelopes: Sequence[Envelope]) -> None: ...

    # The inbox ---------------------------------------------------------------------------

    def ping(self) -> None:
        """A trivial query: it returns once the database answers."""
        self._execute(self.statements.inbox.ping, {}).fetchone()

    def is_handled(self, group: str, message_id: str) -> bool:
        """Whether the group's inbox has the message (as committed, or by this transaction)."""
        query = self.statements.inbox.is_handled
        return self._execute(query, {"g": group, "m": message_id}).fetchone() is not None

    def record_handled(self, group: str, envelope: Envelope) -> bool:
        """Add the message to the group's inbox; False if it was there already.

        True means this transaction added the row: committed with the message's work, it
        makes any later delivery of the message a duplicate. While another transaction
        holds an uncommitted row for the same message, this waits for it to end (SQLite:
        for the database's one writer): False if it committed, True if it rolled back.
        """
        _check_names(group, envelope)
        if problem := self.statements.inbox.id_problem(envelope.id):
            raise ValueError(f"The inbox cannot keep message {envelope.id[:40]!r}...: {problem}.")
        return self._record(group, envelope.id, envelope.topic)

    def _record(self, group: str, message_id: str, topic: str) -> bool:
        self._writing()
        values = {"g": group, "m": message_id, "t": topic, "at": self._timestamp(datetime.now(UTC))}
        return self._written(self.statements.inbox.record, values)

    def purge_inbox(self, before: datetime) -> int:
        """Delete the inbox rows of messages handled before `before`; return how many.

        A message delivered again after its row is gone would be handled again: keep
        rows longer than the broker may redeliver or retry a message.
        """
        self._writing()
        purge = self.statements.inbox.purge
        return int(self._execute(purge, {"before": self._timestamp(before)}).rowcount)

    # Dead letters ------------------------------------------------------------------------

    def dead_letter(
        self, group: str, envelope: Envelope, error: str, attempts: int, *, claim: bool = True
    ) -> int | None:
        """Keep a message the group gave up on; return the new dead letter's id.

        With `claim` (a message that failed its attempts), the letter takes the group's
        inbox row of the message (`holds_inbox`): None, and nothing written, when the
        inbox has the message already: the group handled it (another worker did, while
        this one failed), or dead-lettered it. So the inbox row of such a letter is its
        own, and replaying may remove it.

        Without `claim` (a message that could not be read, or whose id the inbox cannot
        keep), the inbox is left as it was, so that a corrected message with the same
        id is handled. None, and nothing written, when the group's inbox has the message
        (a copy of it was handled) or a dead letter of the group has it already, with
        the same body. The message id kept is `bounded_id(envelope.id)`; when that is not
        the id itself, the headers keep the id in full as `message-id`.

        The body is kept as text: bytes that are not UTF-8 (and NUL characters, which
        PostgreSQL's text refuses) become U+FFFD.
        """
        inbox = self.statements.inbox
        _check_names(group, envelope)
        message_id, headers = bounded_id(envelope.id), envelope.headers
        if message_id != envelope.id:
            headers = {**headers, "message-id": headers.get("message-id", envelope.id)}
        body = _text(envelope.body.decode("utf-8", errors="replace"))
        if claim and not self.record_handled(group, envelope):
            return None
        if not claim:
            # The inbox row, taken for this transaction only, makes a concurrent
            # dead-lettering of the same message wait, then find this letter.
            if not self._record(group, message_id, envelope.topic):
                return None
            row = {"g": group, "m": message_id}
            bodies = self._execute(inbox.dead_bodies, row).fetchall()
            self._execute(inbox.forget, row)
            if any(kept == body for (kept,) in bodies):
                return None
        cursor = self._execute(
            inbox.insert_dead,
            {
                "g": group,
                "t": envelope.topic,
                "m": message_id,
                "h": json.dumps(headers),
                "b": body,
                "e": _text(error),
                "n": attempts,
                "at": self._timestamp(datetime.now(UTC)),
                "i": claim,
            },
        )
        return int(cursor.fetchone()[0] if inbox.returning else cursor.lastrowid)

    def dead_letters(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """The dead letters with ids above `after`, in id order, of a group or topic."""
        query = self.statements.inbox.page[group is not None, topic is not None]
        values: dict[str, Any] = {"a": after, "l": limit}
        if group is not None:
            values["g"] = group
        if topic is not None:
            values["t"] = topic
        return [self._dead_letter(row) for row in self._execute(query, values).fetchall()]

    def dead_letter_by_id(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        row = self._execute(self.statements.inbox.dead_letter, {"id": id}).fetchone()
        return None if row is None else self._dead_letter(row)

    def replay(self, ids: Sequence[int]) -> list[DeadLetter]:
        """Send the dead letters' messages again; return those replayed, in id order.

        Each goes to the outbox (its topic, message id and headers, plus `replayed-at`,
        the time now, as NATS would drop a message id it saw lately as a duplicate, and
        `replayed-for`, its group, for information), leaves the group's inbox if its
        letter held the inbox row (so that the worker handles it again; an unreadable
        message's letter holds none, and the row of a corrected message handled since
        stays), and is no longer a dead letter: all in this transaction. Ids with no dead
        letter (never, or not any more: replayed or discarded meanwhile) are left out.
        """
        self._writing()
        inbox = self.statements.inbox
        replayed: list[DeadLetter] = []
        # In id order, so that transactions replaying the same ones lock them in one order.
        for id in sorted(set(ids)):
            letter = self.dead_letter_by_id(id)
            # The DELETE, not the read, decides: of two transactions replaying a dead
            # letter, the second waits for the first, and then deletes nothing.
            if letter is None or self._execute(inbox.delete_dead, {"id": id}).rowcount != 1:
                continue
            if letter.holds_inbox:  # else the row, if any, is a handled message's
                self._execute(inbox.forget, {"g": letter.group, "m": letter.message_id})
            replayed.append(letter)
        if replayed:
            replayed_at = datetime.now(UTC).isoformat()
            self.enqueue(
                [
                    Envelope(
                        letter.topic,
                        letter.message_id,
                        {
                            **letter.headers,
                            "replayed-at": replayed_at,
                            REPLAYED_FOR: letter.group,
                        },
                        letter.body.encode(),
                    )
                    for letter in replayed
                ]
            )
        return replayed

    def discard(self, ids: Sequence[int]) -> int:
        """Delete dead letters; return how many there were.

        The inbox rows of those that held one stay: a redelivery of such a message is
        still skipped. An unreadable message delivered again once its letter is gone
        makes a new one.
        """
        self._writing()
        delete = self.statements.inbox.delete_dead
        return sum(int(self._execute(delete, {"id": id}).rowcount) for id in sorted(set(ids)))

    def _dead_letter(self, row: Sequence[Any]) -> DeadLetter:
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
            failed_at=self.statements.timestamp_out(failed_at),
            holds_inbox=bool(holds),
        )


def bounded_id(message_id: str) -> str:
    """The id itself if the inbox can keep it; else its start, made text, and a hash.

    The hash (of the id in full) keeps apart unfit ids that start alike.
    """
    if InboxStatements.id_problem(message_id) is None:
        return message_id
    start = message_id[:_KEPT_OF_LONG_IDS].encode(errors="replace").decode()
    digest = hashlib.sha256(message_id.encode(errors="surrogatepass")).hexdigest()[:16]
    return f"{_text(start)}...{digest}"


def _check_names(group: str, envelope: Envelope) -> None:
    """Refuse, clearly, names longer than the inbox's columns (the database would too)."""
    for what, value in (("group", group), ("topic", envelope.topic)):
        if len(value) > STREAM_LENGTH:
            raise ValueError(
                f"A {what} is at most {STREAM_LENGTH} characters in the inbox; "
                f"{value[:40]!r}... has {len(value)}."
            )


def _text(value: str) -> str:
    """Text any database keeps: PostgreSQL refuses NUL characters in text."""
    return value.replace("\x00", "\ufffd")
