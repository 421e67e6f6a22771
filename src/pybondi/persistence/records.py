"""The rows a store keeps, and the reads and writes of a transaction on them.

A store keeps, for aggregates:

- a `Record` per aggregate: its version, and (for state-stored aggregates) its state;
- `StoredEvent`s, each in its aggregate's stream and at a global position in the log;
- `Snapshot`s of event-sourced aggregates;

and, for messaging, a store that is a `MessagingStore` keeps:

- the outbox: messages written in a unit of work, which a relay sends (`OutboxRecords`);
- the inbox: the ids of the messages each consumer group handled (`InboxRecords`);
- the dead letters: the messages a group gave up on (`DeadLetterRecords`);
- the projections' checkpoints and leases (`ProjectionRecords`).

`Records` is what `work` receives inside `transaction.run(work)`: every method is sync,
and an async store runs the work on its connection without blocking the event loop, so
that the logic is written once. `MessagingRecords` adds the messaging parts as
attributes (`records.outbox`, `records.inbox`, `records.dead_letters`,
`records.projections`). Each interface states the guarantees a backend keeps;
`pybondi.testing.contracts` checks them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pybondi.messaging.envelope import Envelope

__all__ = [
    "ID_LENGTH",
    "REPLAYED_AT",
    "REPLAYED_FOR",
    "Checkpoint",
    "DeadLetter",
    "DeadLetterRecords",
    "InboxRecords",
    "MessagingRecords",
    "OutboxRecords",
    "ProjectionRecords",
    "Record",
    "Records",
    "Snapshot",
    "StoredEvent",
    "TableRecords",
    "bounded_id",
    "id_problem",
]

ID_LENGTH = 255
"""The longest stream name, message id, topic or group name a store keeps."""

_KEPT_OF_LONG_IDS = 200  # characters of an unfit id kept before its hash

REPLAYED_AT = "replayed-at"
"""The header of a replayed dead letter saying when: a new message to a duplicate window."""
REPLAYED_FOR = "replayed-for"
"""The header of a replayed dead letter naming the group that gave up on it; information
only (any producer could set it): other groups skip a replay by their own inbox."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """An aggregate's row: its stream, its version, and its state if it is state-stored.

    `schema` is the version of the state's registered type when it was written.
    """

    stream: str
    version: int
    schema: int = 1
    data: str | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as stored: where it sits in its stream and in the log, and its JSON.

    `position` is the event's place in the global log, starting at 1 and without gaps
    between committed events; it is 0 for an event not yet appended.
    """

    stream: str
    version: int
    type: str
    schema: int
    data: str
    position: int = 0
    recorded_at: datetime = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of an event-sourced aggregate after the event at `version`."""

    stream: str
    version: int
    schema: int
    data: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message a consumer group gave up on.

    Attributes:
        id: the dead letter's number, growing as letters are added.
        group: the consumer group that gave up.
        topic, message_id, headers: the message's, as delivered; an id the inbox could
            not keep (too long, or not text) is shortened, and kept whole in the
            `message-id` header.
        body: the message's body as text; bytes that were not UTF-8 became U+FFFD.
        error: why it failed (the last error), or why it could not be read.
        attempts: how many times the group tried to handle it.
        failed_at: when it was dead-lettered, in UTC.
        holds_inbox: whether the group's inbox holds the message for this letter: true
            for a message that failed its attempts (a replay removes the row, so that
            the group handles it again), false for one that could not be read (the
            group never handled it, and its inbox is left alone).
    """

    id: int
    group: str
    topic: str
    message_id: str
    headers: dict[str, str]
    body: str
    error: str
    attempts: int
    failed_at: datetime
    holds_inbox: bool = True


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a projection is in the log, and which runner holds it.

    Attributes:
        name: the projection's name.
        position: the position of the last event of the log the projection handled
            (0: none yet).
        owner: the runner holding the projection's lease, if any.
        lease_until: when that lease expires, in UTC.
    """

    name: str
    position: int
    owner: str | None = None
    lease_until: datetime | None = None


def bounded_id(message_id: str) -> str:
    """The id itself if a store can keep it; else its start, made text, and a hash.

    The hash (of the id in full) keeps apart unfit ids that start alike.
    """
    if id_problem(message_id) is None:
        return message_id
    start = message_id[:_KEPT_OF_LONG_IDS].encode(errors="replace").decode()
    digest = hashlib.sha256(message_id.encode(errors="surrogatepass")).hexdigest()[:16]
    return f"{start.replace(chr(0), chr(0xFFFD))}...{digest}"


def id_problem(text: str, what: str = "message id") -> str | None:
    """Why a store cannot keep this message id (or group name), or None if it can."""
    if len(text) > ID_LENGTH:
        return f"its {what} has {len(text)} characters, and the inbox keeps at most {ID_LENGTH}"
    if "\x00" in text:
        return f"its {what} has a NUL character, which databases do not keep in text"
    try:
        text.encode()
    except UnicodeEncodeError:
        return f"its {what} {text!r} is not UTF-8 text (it has a lone surrogate)"
    return None


class Records(ABC):
    """Reads and writes of aggregates inside one transaction; see the module docstring.

    Attributes:
        checks_stream_versions: whether `append` itself refuses an event at a version
            its stream has already, with `ConcurrencyError` (expected: the version
            before it; actual: the stream's last). That is the version check of an
            event-sourced stream, which then needs no record (SQLite, whose one writer
            at a time makes the check safe). Else (memory, PostgreSQL, MariaDB) an
            event-sourced stream's version is checked on its record, with `write`.
    """

    checks_stream_versions = False

    @abstractmethod
    def read(self, stream: str) -> Record | None:
        """The aggregate's record, or None if there is none."""

    @abstractmethod
    def write(self, record: Record, expected: int) -> None:
        """Write a record whose stored version must still be `expected` (0: a new one).

        Raises `ConcurrencyError`, naming both versions, when it is not.
        """

    @abstractmethod
    def append(self, events: Sequence[StoredEvent]) -> None:
        """Append events to their streams and give them the next positions of the log.

        Positions follow commit order, without gaps between committed events; see
        `checks_stream_versions` for what an event at a version its stream has does.
        """

    @abstractmethod
    def read_stream(self, stream: str, after: int = 0) -> list[StoredEvent]:
        """The stream's events with a version above `after`, in order."""

    @abstractmethod
    def read_log(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to `limit` events of the log with a position above `after`, in order."""

    @abstractmethod
    def read_snapshot(self, stream: str) -> Snapshot | None:
        """The stream's latest snapshot, or None."""

    @abstractmethod
    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Keep a snapshot, replacing the stream's previous one."""

    def ping(self) -> None:
        """Return once the store answers (a trivial query); a store in memory always does."""


class TableRecords(Records):
    """Records that can also read and write rows of the application's own SQL tables."""

    @abstractmethod
    def read_row(self, table: Any, key: str, id: Any) -> Mapping[str, Any] | None:
        """The row whose primary key column `key` holds `id`, as a mapping, or None."""

    @abstractmethod
    def write_row(
        self,
        table: Any,
        values: Mapping[str, Any],
        key: str,
        *,
        version_column: str,
        version: int,
        expected: int,
    ) -> None:
        """INSERT a new row (`expected` 0), or UPDATE the row still at `expected`.

        `values` holds every column but the version, the primary key `key` included.
        A row at another version raises `ConcurrencyError`, naming both versions.
        """


class OutboxRecords(ABC):
    """The outbox: messages written in a unit of work, numbered per topic, and leases.

    Each topic's messages are numbered `seq` 1, 2, 3... in commit order, without gaps
    between committed ones: a transaction that writes to a topic holds its head until it
    ends, and a rolled-back one gives its numbers back. A relay sends a topic's messages
    only while it holds the topic's lease, from the last one the broker confirmed.
    """

    @abstractmethod
    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        """Write envelopes to the outbox, numbering each topic's in commit order."""

    @abstractmethod
    def pending_topics(self) -> list[str]:
        """The topics with committed messages the broker has not confirmed yet."""

    @abstractmethod
    def claim(
        self, topic: str, owner: str, *, now: datetime, until: datetime, limit: int
    ) -> tuple[int, list[Envelope]] | None:
        """Take or renew the topic's lease; return the last sent seq and the next ones.

        None when another relay holds a lease on the topic that has not expired.
        """

    @abstractmethod
    def renew(self, topic: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds on the topic; False if it holds none."""

    @abstractmethod
    def confirm(
        self, topic: str, owner: str, *, after: int, last: int, now: datetime, until: datetime
    ) -> bool:
        """Record seq `after`+1..`last` as sent; False if this relay lost the lease."""

    @abstractmethod
    def release(self, owner: str, topic: str | None = None) -> None:
        """Give up the lease `owner` holds on `topic`, or on every topic."""

    @abstractmethod
    def purge(self, before: datetime) -> int:
        """Delete the messages sent before `before`; return how many."""

    @abstractmethod
    def forget_idle_topics(self, now: datetime, limit: int = 100) -> int:
        """Forget up to `limit` idle topics (all sent and purged, no lease); return how many.

        A topic written to again starts anew, from seq 1.
        """


class InboxRecords(ABC):
    """The inbox: per consumer group, the ids of the messages it handled.

    A message's id goes in, in the transaction of the message's own work: committed
    together, the message is handled once in effect, however often it is delivered.
    """

    @abstractmethod
    def claim(self, group: str, envelope: Envelope) -> bool:
        """Add the message to the group's inbox; False if it was there already.

        True means this transaction added it. Of two transactions claiming one message
        at once, one gets False, or the other fails at commit with `ConcurrencyError`
        (an SQL store makes the second wait for the first; the memory store checks at
        commit). Raises ValueError for an id `id_problem` refuses.
        """

    @abstractmethod
    def has(self, group: str, message_id: str) -> bool:
        """Whether the group's inbox has the message (committed, or by this transaction)."""

    @abstractmethod
    def purge(self, before: datetime) -> int:
        """Forget the messages handled before `before`; return how many.

        One delivered again after that is handled again: keep them longer than the
        broker may redeliver or retry a message.
        """


class DeadLetterRecords(ABC):
    """The dead letters: messages a consumer group gave up on, to replay or discard."""

    @abstractmethod
    def add(
        self, group: str, envelope: Envelope, error: str, attempts: int, *, claim: bool = True
    ) -> int | None:
        """Keep a message the group gave up on; return the new dead letter's id.

        With `claim` (a message that failed its attempts), the letter takes the group's
        inbox row of the message (`holds_inbox`): None, and nothing written, when the
        inbox has the message already (the group handled it, or dead-lettered it).

        Without `claim` (a message that could not be read, or whose id the inbox cannot
        keep), the inbox is left as it was, so that a corrected message with the same id
        is handled. None, and nothing written, when the group's inbox has the message or
        one of its dead letters has it already, with the same body. The id kept is
        `bounded_id(envelope.id)`; where it is not the id itself, the headers keep the
        id in full as `message-id`. The body is kept as text (U+FFFD for what is not
        UTF-8, and for NUL).
        """

    @abstractmethod
    def page(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """The dead letters with ids above `after`, in id order, of a group or topic."""

    @abstractmethod
    def get(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""

    @abstractmethod
    def replay(self, ids: Sequence[int]) -> list[DeadLetter]:
        """Send the dead letters' messages again; return those replayed, in id order.

        Each goes to the outbox (its topic, id and headers, plus `replayed-at`, now, and
        `replayed-for`, its group), leaves the group's inbox if its letter holds the row,
        and is no longer a dead letter: all in this transaction. Ids with no dead letter
        (never, or replayed or discarded meanwhile) are left out.
        """

    @abstractmethod
    def discard(self, ids: Sequence[int]) -> int:
        """Delete dead letters; return how many there were. Their inbox rows stay."""


class ProjectionRecords(ABC):
    """Per projection name: a checkpoint in the log, and a lease on it.

    The checkpoint is the position of the last event the projection handled. A runner
    moves it in the transaction that writes what the events did to the projection's
    view: committed together, each event's effect happens once, however often a runner
    dies and another starts over from the checkpoint. The lease lets one runner at a time
    work on a projection: `advance` moves the checkpoint only for the runner holding the
    lease, and only from where that runner read it, so that even two runners that both
    believe they hold it never commit the same events twice. Leases compare the runners'
    clocks, which must agree to well within a lease.
    """

    @abstractmethod
    def get(self, name: str) -> Checkpoint | None:
        """The projection's checkpoint and lease as committed, or None if it never ran."""

    @abstractmethod
    def head(self) -> int:
        """The position of the log's last committed event (0 for an empty log).

        Its difference with a checkpoint is the projection's lag.
        """

    @abstractmethod
    def claim(self, name: str, owner: str, *, now: datetime, until: datetime) -> int | None:
        """Take or renew the projection's lease until `until`; return its checkpoint.

        A projection never seen before starts at 0. None when another runner holds a
        lease that has not expired at `now`.
        """

    @abstractmethod
    def advance(self, name: str, owner: str, *, after: int, to: int, until: datetime) -> bool:
        """Move the checkpoint from `after` to `to`, and extend the lease until `until`.

        False, and nothing changed, unless `owner` holds the lease and the checkpoint is
        still at `after`. Two transactions advancing from the same checkpoint never both
        commit: an SQL store makes the second wait for the first and answer False; the
        memory store fails the second at commit with `ConcurrencyError`.
        """

    @abstractmethod
    def renew(self, name: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds until `until`; False if it holds none."""

    @abstractmethod
    def reset(self, name: str, owner: str) -> bool:
        """Set the checkpoint back to 0 (a rebuild); False unless `owner` holds the lease."""

    @abstractmethod
    def release(self, name: str, owner: str) -> None:
        """Give up the lease `owner` holds on the projection, if it holds it."""


class MessagingRecords(Records):
    """Records of a store that also keeps an outbox, an inbox, dead letters, checkpoints."""

    @property
    @abstractmethod
    def outbox(self) -> OutboxRecords:
        """The outbox's reads and writes, in this transaction."""

    @property
    @abstractmethod
    def inbox(self) -> InboxRecords:
        """The inbox's reads and writes, in this transaction."""

    @property
    @abstractmethod
    def dead_letters(self) -> DeadLetterRecords:
        """The dead letters' reads and writes, in this transaction."""

    @property
    @abstractmethod
    def projections(self) -> ProjectionRecords:
        """The projections' checkpoints and leases, in this transaction."""
