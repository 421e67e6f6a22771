"""The outbox's tables and statements, and its reads and writes on a SQL transaction.

Three tables, named with the store's prefix:

- `outbox`: one row per message, numbered `seq` 1, 2, 3... within its topic;
- `outbox_topics`: each topic's last `seq` handed out. A session that writes to a topic
  moves it and holds the row's lock until COMMIT, so numbers are given in commit order
  and a rolled-back session gives its numbers back: a committed topic has no gaps, and
  every row up to its head is committed;
- `outbox_relay`: per topic, the last `seq` the broker confirmed, and the relay that
  holds the topic's lease. A relay sends a topic's rows only while it holds the lease,
  so that several relays share the topics without sending a row twice or out of order.

A topic's rows in the last two tables go once it is idle (see `forget_idle_topics`), so
that they do not grow with every topic ever used; a topic used again starts anew.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import OutboxRecords
from pybondi.persistence.sql.query import NAME, TEXT, TIMESTAMP, Query, insert_ignoring_duplicates

if TYPE_CHECKING:
    from pybondi.persistence.sql.executor import Executor

__all__ = ["OutboxStatements", "SQLOutbox"]


class OutboxStatements:
    """The outbox's tables and statements for one dialect."""

    def __init__(self, dialect: sa.Dialect, metadata: sa.MetaData, prefix: str) -> None:
        text, timestamp, name = TEXT, TIMESTAMP, NAME
        self.outbox = outbox = sa.Table(
            f"{prefix}outbox",
            metadata,
            sa.Column("topic", name, primary_key=True),
            sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
            sa.Column("message_id", name, nullable=False),
            sa.Column("headers", text, nullable=False),
            sa.Column("body", text, nullable=False),
            sa.Column("created_at", timestamp, nullable=False),
            sa.Column("sent_at", timestamp, index=True),
        )
        self.topics = topics = sa.Table(
            f"{prefix}outbox_topics",
            metadata,
            sa.Column("topic", name, primary_key=True),
            sa.Column("head", sa.BigInteger, nullable=False),
        )
        self.relay = relay = sa.Table(
            f"{prefix}outbox_relay",
            metadata,
            sa.Column("topic", name, primary_key=True),
            sa.Column("sent", sa.BigInteger, nullable=False),
            sa.Column("owner", sa.String(64)),
            sa.Column("lease_until", timestamp),
        )

        def compiled(statement: Any) -> Query:
            return Query(statement, dialect)

        param, topic_is = sa.bindparam, topics.c.topic == sa.bindparam("t")
        # PostgreSQL and SQLite move the head, or start a new topic, in one upsert, which
        # locks the row until COMMIT. On MariaDB, sessions that insert the same new row
        # deadlock when the one that inserted it first rolls back (each waiter holds a
        # shared lock and wants an exclusive one, with an upsert as with INSERT IGNORE):
        # there, new topics are added in a short transaction of their own, and sessions
        # only ever update an existing row.
        self.side_pool: sa.pool.Pool | None = None  # MariaDB's, for new topics
        if dialect.name in ("mysql", "mariadb"):
            self.advance = compiled(
                topics.update().where(topic_is).values(head=topics.c.head + param("n"))
            )
            self.read_head: Query | None = compiled(sa.select(topics.c.head).where(topic_is))
        else:
            self.advance, self.read_head = compiled(_advance_head(dialect, topics)), None
        self.new_topic = compiled(
            insert_ignoring_duplicates(dialect, topics).values(topic=param("t"), head=0)
        )
        self.new_cursor = compiled(
            insert_ignoring_duplicates(dialect, relay).values(topic=param("t"), sent=0)
        )
        self.insert = compiled(outbox.insert())
        relay_is = relay.c.topic == param("t")
        self.pending = compiled(
            sa.select(topics.c.topic)
            .join(relay, relay.c.topic == topics.c.topic)
            .where(topics.c.head > relay.c.sent)
        )
        self.claim = compiled(
            relay.update()
            .where(
                relay_is,
                sa.or_(
                    relay.c.owner.is_(None),
                    relay.c.owner == param("o"),
                    relay.c.lease_until < param("now"),
                ),
            )
            .values(owner=param("o"), lease_until=param("u"))
        )
        self.cursor = compiled(sa.select(relay.c.sent).where(relay_is))
        self.read = compiled(
            sa.select(outbox.c.seq, outbox.c.message_id, outbox.c.headers, outbox.c.body)
            .where(outbox.c.topic == param("t"), outbox.c.seq > param("a"))
            .order_by(outbox.c.seq)
            .limit(param("l"))
        )
        self.advance_cursor = compiled(
            relay.update()
            .where(relay_is, relay.c.owner == param("o"), relay.c.sent == param("a"))
            .values(sent=param("s"), lease_until=param("u"))
        )
        self.mark_sent = compiled(
            outbox.update()
            .where(
                outbox.c.topic == param("t"), outbox.c.seq > param("a"), outbox.c.seq <= param("s")
            )
            .values(sent_at=param("now"))
        )
        self.renew = compiled(
            relay.update()
            .where(relay_is, relay.c.owner == param("o"))
            .values(lease_until=param("u"))
        )
        self.release = compiled(
            relay.update().where(relay.c.owner == param("o")).values(owner=None, lease_until=None)
        )
        self.release_topic = compiled(
            relay.update()
            .where(relay_is, relay.c.owner == param("o"))
            .values(owner=None, lease_until=None)
        )
        self.purge = compiled(outbox.delete().where(outbox.c.sent_at < param("before")))
        # A topic is idle when the broker confirmed all of it, no relay holds a lease on
        # it, and its rows are gone (purged, `retention` after they were sent).
        self.idle = compiled(
            sa.select(topics.c.topic, topics.c.head)
            .join(relay, relay.c.topic == topics.c.topic)
            .where(
                topics.c.head == relay.c.sent,
                sa.or_(relay.c.owner.is_(None), relay.c.lease_until < param("now")),
                ~sa.exists().where(outbox.c.topic == topics.c.topic),
            )
            .limit(param("l"))
        )
        # Each with the head seen: a session that moved it since keeps the topic.
        self.forget_topic = compiled(topics.delete().where(topic_is, topics.c.head == param("h")))
        self.forget_cursor = compiled(relay.delete().where(relay_is, relay.c.sent == param("h")))


class SQLOutbox(OutboxRecords):
    """The outbox's reads and writes in one transaction; see `OutboxRecords`."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._sql = executor.statements.outbox

    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        """Write envelopes to the outbox, numbering each topic's rows in commit order."""
        if not envelopes:
            return
        self._executor.writing()
        by_topic: dict[str, list[Envelope]] = {}
        for envelope in envelopes:
            by_topic.setdefault(envelope.topic, []).append(envelope)
        outbox, now = self._sql, self._executor.timestamp(datetime.now(UTC))
        rows = []
        # Topics in one order, whatever order they were published in: two sessions lock
        # their heads in the same order, and cannot deadlock.
        for topic in sorted(by_topic):
            batch = by_topic[topic]
            first = self._advance_topic(topic, len(batch)) - len(batch) + 1
            rows += [
                {
                    "topic": topic,
                    "seq": first + offset,
                    "message_id": envelope.id,
                    "headers": json.dumps(envelope.headers),
                    "body": envelope.body.decode(),
                    "created_at": now,
                    "sent_at": None,
                }
                for offset, envelope in enumerate(batch)
            ]
        if len(rows) == 1:
            self._executor.execute(outbox.insert, rows[0])
        else:
            self._executor.execute_many(outbox.insert, rows)

    def _advance_topic(self, topic: str, count: int) -> int:
        """Move the topic's head by `count`, locking it until COMMIT; return the new head."""
        outbox = self._sql
        values = {"t": topic, "n": count}
        if outbox.read_head is None:  # PostgreSQL, SQLite: one upsert
            head = int(self._executor.execute(outbox.advance, values).fetchone()[0])
            if head == count:  # this transaction added the topic: its cursor too
                self._executor.written(outbox.new_cursor, {"t": topic})
            return head
        # MariaDB: the session only updates a head that exists; a topic seen for the
        # first time gets its rows apart first.
        if self._executor.execute(outbox.advance, values).rowcount != 1:
            self._add_topic_apart(topic)
            self._executor.execute(outbox.advance, values)
        return int(self._executor.execute(outbox.read_head, {"t": topic}).fetchone()[0])

    def _add_topic_apart(self, topic: str) -> None:
        """Add a topic's head and cursor rows, at 0, in a transaction of their own.

        The connection is made like the engine's, outside its pool: sessions that start
        new topics at once, each holding a connection of the engine's pool, would
        otherwise wait for one another's second connection.
        """
        outbox = self._sql
        if outbox.side_pool is None:
            outbox.side_pool = self._executor.connection.engine.pool.recreate()
        connection = outbox.side_pool.connect()
        try:
            cursor = connection.cursor()
            for query in (outbox.new_topic, outbox.new_cursor):
                try:
                    cursor.execute(query.sql, query.parameters({"t": topic}))
                except self._executor.statements.driver_error as error:
                    if getattr(error, "args", ())[:1] != (1062,):  # not a duplicate
                        raise
            connection.commit()
        finally:
            # Closed for real, not kept: a pool of async connections must be emptied
            # on its event loop, and nothing here would do it.
            connection.detach()
            connection.close()

    # The relay's side -------------------------------------------------------------------

    def pending_topics(self) -> list[str]:
        """The topics with committed rows that the broker has not confirmed yet."""
        return [row[0] for row in self._executor.execute(self._sql.pending, {}).fetchall()]

    def claim(
        self, topic: str, owner: str, *, now: datetime, until: datetime, limit: int
    ) -> tuple[int, list[Envelope]] | None:
        """Take or renew the topic's lease; return the last sent seq and the next rows.

        None when another relay holds a lease on the topic that has not expired.
        """
        self._executor.writing()
        outbox = self._sql
        values = {
            "t": topic,
            "o": owner,
            "now": self._executor.timestamp(now),
            "u": self._executor.timestamp(until),
        }
        if self._executor.execute(outbox.claim, values).rowcount != 1:
            return None
        sent = int(self._executor.execute(outbox.cursor, {"t": topic}).fetchone()[0])
        rows = self._executor.execute(outbox.read, {"t": topic, "a": sent, "l": limit}).fetchall()
        envelopes = [
            Envelope(topic, message_id, json.loads(headers), body.encode())
            for _, message_id, headers, body in rows
        ]
        return sent, envelopes

    def renew(self, topic: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds on the topic; False if it holds none."""
        self._executor.writing()
        values = {"t": topic, "o": owner, "u": self._executor.timestamp(until)}
        return bool(self._executor.execute(self._sql.renew, values).rowcount == 1)

    def confirm(
        self, topic: str, owner: str, *, after: int, last: int, now: datetime, until: datetime
    ) -> bool:
        """Record rows `after`+1..`last` as sent; False if this relay lost the lease."""
        self._executor.writing()
        outbox = self._sql
        moved = self._executor.execute(
            outbox.advance_cursor,
            {"t": topic, "o": owner, "a": after, "s": last, "u": self._executor.timestamp(until)},
        ).rowcount
        if moved != 1:
            return False
        values = {"t": topic, "a": after, "s": last, "now": self._executor.timestamp(now)}
        self._executor.execute(outbox.mark_sent, values)
        return True

    def release(self, owner: str, topic: str | None = None) -> None:
        """Give up the lease `owner` holds on `topic`, or on every topic."""
        self._executor.writing()
        outbox = self._sql
        if topic is None:
            self._executor.execute(outbox.release, {"o": owner})
        else:
            self._executor.execute(outbox.release_topic, {"o": owner, "t": topic})

    def purge(self, before: datetime) -> int:
        """Delete the rows sent before `before`; return how many."""
        self._executor.writing()
        purge = self._sql.purge
        return int(
            self._executor.execute(purge, {"before": self._executor.timestamp(before)}).rowcount
        )

    def forget_idle_topics(self, now: datetime, limit: int = 100) -> int:
        """Delete the head and cursor rows of up to `limit` idle topics; return how many.

        Idle: every row was sent and purged, and no relay holds a lease. A session that
        writes to the topic meanwhile keeps it: the head it moved no longer matches, or
        (having waited for this transaction) it starts the topic anew, from seq 1.
        """
        self._executor.writing()
        outbox = self._sql
        idle = self._executor.execute(
            outbox.idle, {"now": self._executor.timestamp(now), "l": limit}
        ).fetchall()
        forgotten = 0
        for topic, head in idle:
            # The head row first: while this transaction holds it, no session can write
            # to the topic, so the cursor never goes without its head.
            if self._executor.execute(outbox.forget_topic, {"t": topic, "h": head}).rowcount == 1:
                self._executor.execute(outbox.forget_cursor, {"t": topic, "h": head})
                forgotten += 1
        return forgotten


def _advance_head(dialect: sa.Dialect, topics: sa.Table) -> Any:
    """INSERT the topic at `n`, or add `n` to its head; RETURNING the head."""
    values: dict[str, Any] = {"topic": sa.bindparam("t"), "head": sa.bindparam("n")}
    module: Any = postgresql if dialect.name == "postgresql" else sqlite
    statement = module.insert(topics).values(values)
    return statement.on_conflict_do_update(
        index_elements=["topic"], set_={"head": topics.c.head + statement.excluded.head}
    ).returning(topics.c.head)
