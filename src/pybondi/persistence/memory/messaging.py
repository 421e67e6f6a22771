"""The memory store's outbox, inbox and dead letters: `MessagingRecords` in a process.

A memory transaction cannot wait for another one, as a SQL transaction waits on a row
lock: it runs on the event loop's thread as often as not. So every write is a `Change`:
checked against what others committed, and applied, at commit, all of the transaction's
at once under the store's lock, or none. Reads see what was committed, with this
transaction's own writes. Where a SQL store makes the second of two concurrent writers
wait and then answer (the inbox's `claim`, a replay, a relay's lease), the memory store
lets both answer and fails the second at commit with `ConcurrencyError`: the worker takes
that as a conflict and handles the message again, and the relay and dead letters as the
error it is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pybondi.exceptions import ConcurrencyError
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import (
    REPLAYED_AT,
    REPLAYED_FOR,
    DeadLetter,
    DeadLetterRecords,
    InboxRecords,
    OutboxRecords,
    bounded_id,
    id_problem,
)

if TYPE_CHECKING:
    from pybondi.persistence.memory import MemoryTransaction

__all__ = [
    "Change",
    "MemoryDeadLetters",
    "MemoryInbox",
    "MemoryOutbox",
    "MessagingState",
    "OutboxTopic",
]


@dataclass(slots=True)
class OutboxTopic:
    """A topic of the outbox: its messages by seq, its head, and the relay's cursor."""

    head: int = 0
    sent: int = 0
    owner: str | None = None
    lease_until: datetime | None = None
    rows: dict[int, tuple[Envelope, datetime | None]] = field(default_factory=dict)


@dataclass(slots=True)
class MessagingState:
    """What a memory store keeps for messaging, guarded by the store's lock."""

    topics: dict[str, OutboxTopic] = field(default_factory=dict)
    inbox: dict[tuple[str, str], tuple[str, datetime]] = field(default_factory=dict)
    dead: dict[int, DeadLetter] = field(default_factory=dict)
    dead_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


@dataclass(slots=True)
class Change:
    """A write, checked and applied at commit: `check` raises `ConcurrencyError`."""

    check: Callable[[], None]
    apply: Callable[[], None]


def _nothing() -> None:
    """A check that always passes."""


def _conflict(what: str) -> ConcurrencyError:
    return ConcurrencyError(what, 0, 1)


class MemoryOutbox(OutboxRecords):
    """The outbox's reads and writes in a memory transaction; see `OutboxRecords`."""

    def __init__(self, transaction: MemoryTransaction) -> None:
        self._transaction = transaction
        self._state = transaction.store.messaging

    def _change(self, check: Callable[[], None], apply: Callable[[], None]) -> None:
        self._transaction.changes.append(Change(check, apply))

    def _topic(self, topic: str) -> OutboxTopic:
        return self._state.topics.setdefault(topic, OutboxTopic())

    def enqueue(self, envelopes: Sequence[Envelope]) -> None:
        """Buffer envelopes; each topic's are numbered at commit, after its head."""
        batch = list(envelopes)
        if not batch:
            return

        def apply() -> None:
            for envelope in batch:
                topic = self._topic(envelope.topic)
                topic.head += 1
                topic.rows[topic.head] = (envelope, None)  # sent at: not yet

        self._change(_nothing, apply)

    def pending_topics(self) -> list[str]:
        """The topics with committed messages not confirmed yet."""
        with self._transaction.store.lock:
            return [name for name, topic in self._state.topics.items() if topic.head > topic.sent]

    def claim(
        self, topic: str, owner: str, *, now: datetime, until: datetime, limit: int
    ) -> tuple[int, list[Envelope]] | None:
        """Take or renew the topic's lease; the last sent seq and the next messages."""
        with self._transaction.store.lock:
            state = self._state.topics.get(topic)
            if state is None or not _free(state, owner, now):
                return None
            sent = state.sent
            rows = [
                state.rows[seq][0] for seq in range(sent + 1, min(state.head, sent + limit) + 1)
            ]

        def check() -> None:
            if not _free(self._topic(topic), owner, now):
                raise _conflict(f"outbox lease of {topic}")

        def apply() -> None:
            self._topic(topic).owner, self._topic(topic).lease_until = owner, until

        self._change(check, apply)
        return sent, rows

    def renew(self, topic: str, owner: str, *, until: datetime) -> bool:
        """Extend the lease `owner` holds on the topic; False if it holds none."""
        with self._transaction.store.lock:
            state = self._state.topics.get(topic)
            if state is None or state.owner != owner:
                return False

        def apply() -> None:
            state = self._topic(topic)
            if state.owner == owner:
                state.lease_until = until

        self._change(_nothing, apply)
        return True

    def confirm(
        self, topic: str, owner: str, *, after: int, last: int, now: datetime, until: datetime
    ) -> bool:
        """Record seq `after`+1..`last` as sent; False if this relay lost the lease."""

        def holds() -> bool:
            state = self._state.topics.get(topic)
            return state is not None and state.owner == owner and state.sent == after

        with self._transaction.store.lock:
            if not holds():
                return False

        def check() -> None:
            if not holds():
                raise _conflict(f"outbox cursor of {topic}")

        def apply() -> None:
            state = self._topic(topic)
            state.sent, state.lease_until = last, until
            for seq in range(after + 1, last + 1):
                if seq in state.rows:
                    state.rows[seq] = (state.rows[seq][0], now)

        self._change(check, apply)
        return True

    def release(self, owner: str, topic: str | None = None) -> None:
        """Give up the lease `owner` holds on `topic`, or on every topic."""

        def apply() -> None:
            for name, state in self._state.topics.items():
                if state.owner == owner and topic in (None, name):
                    state.owner = state.lease_until = None

        self._change(_nothing, apply)

    def purge(self, before: datetime) -> int:
        """Delete the messages sent before `before`; return how many."""
        with self._transaction.store.lock:
            doomed = [
                (name, seq)
                for name, state in self._state.topics.items()
                for seq, (_, sent_at) in state.rows.items()
                if sent_at is not None and sent_at < before
            ]

        def apply() -> None:
            for name, seq in doomed:
                self._state.topics[name].rows.pop(seq, None)

        self._change(_nothing, apply)
        return len(doomed)

    def forget_idle_topics(self, now: datetime, limit: int = 100) -> int:
        """Forget up to `limit` topics all sent and purged, with no lease; return how many."""
        with self._transaction.store.lock:
            idle = [
                (name, state.head)
                for name, state in self._state.topics.items()
                if state.head == state.sent and not state.rows and _free(state, None, now)
            ][:limit]

        def apply() -> None:
            for name, head in idle:
                state = self._state.topics.get(name)
                if state is not None and state.head == head and not state.rows:
                    del self._state.topics[name]  # written to since: kept

        self._change(_nothing, apply)
        return len(idle)


def _free(state: OutboxTopic, owner: str | None, now: datetime) -> bool:
    """Whether `owner` may take the topic's lease now."""
    return (
        state.owner is None
        or state.owner == owner
        or (state.lease_until is not None and state.lease_until < now)
    )


class MemoryInbox(InboxRecords):
    """The inbox's reads and writes in a memory transaction; see `InboxRecords`."""

    def __init__(self, transaction: MemoryTransaction) -> None:
        self._transaction = transaction
        self._state = transaction.store.messaging
        self.claimed: set[tuple[str, str]] = set()  # by this transaction
        self.forgotten: set[tuple[str, str]] = set()

    def has(self, group: str, message_id: str) -> bool:
        """Whether the group's inbox has the message (committed, or by this transaction)."""
        key = (group, message_id)
        if key in self.claimed:
            return True
        if key in self.forgotten:
            return False
        with self._transaction.store.lock:
            return key in self._state.inbox

    def claim(self, group: str, envelope: Envelope) -> bool:
        """Add the message to the group's inbox; False if it was there already.

        Another transaction claiming it too is found at commit: the second to commit
        fails with `ConcurrencyError`.
        """
        if problem := id_problem(envelope.id):
            raise ValueError(f"The inbox cannot keep message {envelope.id[:40]!r}...: {problem}.")
        return self.add(group, envelope.id, envelope.topic)

    def add(self, group: str, message_id: str, topic: str) -> bool:
        """`claim` with the id as given (a dead letter's bounded one); False if there."""
        if self.has(group, message_id):
            return False
        key = (group, message_id)
        self.claimed.add(key)
        self.forgotten.discard(key)

        def check() -> None:
            if key in self._state.inbox:
                raise _conflict(f"inbox of {group}: message {message_id}")

        def apply() -> None:
            self._state.inbox[key] = (topic, datetime.now(UTC))

        self._transaction.changes.append(Change(check, apply))
        return True

    def forget(self, group: str, message_id: str) -> None:
        """Remove the message from the group's inbox (a replay)."""
        key = (group, message_id)
        self.claimed.discard(key)
        self.forgotten.add(key)

        def apply() -> None:
            self._state.inbox.pop(key, None)

        self._transaction.changes.append(Change(_nothing, apply))

    def purge(self, before: datetime) -> int:
        """Forget the messages handled before `before`; return how many."""
        with self._transaction.store.lock:
            doomed = [key for key, (_, at) in self._state.inbox.items() if at < before]

        def apply() -> None:
            for key in doomed:
                self._state.inbox.pop(key, None)

        self._transaction.changes.append(Change(_nothing, apply))
        return len(doomed)


class MemoryDeadLetters(DeadLetterRecords):
    """The dead letters' reads and writes in a memory transaction; see `DeadLetterRecords`."""

    def __init__(
        self, transaction: MemoryTransaction, inbox: MemoryInbox, outbox: MemoryOutbox
    ) -> None:
        self._transaction = transaction
        self._state = transaction.store.messaging
        self._inbox = inbox
        self._outbox = outbox
        self._added: dict[int, DeadLetter] = {}
        self._deleted: set[int] = set()

    def add(
        self, group: str, envelope: Envelope, error: str, attempts: int, *, claim: bool = True
    ) -> int | None:
        """Keep a message the group gave up on; see `DeadLetterRecords.add`."""
        message_id, headers = bounded_id(envelope.id), envelope.headers
        if message_id != envelope.id:
            headers = {**headers, "message-id": headers.get("message-id", envelope.id)}
        body = envelope.body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        if claim and not self._inbox.claim(group, envelope):
            return None
        if not claim and (
            self._inbox.has(group, message_id)
            or any(
                letter.group == group and letter.message_id == message_id and letter.body == body
                for letter in self._letters()
            )
        ):
            return None
        with self._transaction.store.lock:
            id = next(self._state.dead_ids)
        letter = DeadLetter(
            id=id,
            group=group,
            topic=envelope.topic,
            message_id=message_id,
            headers=dict(headers),
            body=body,
            error=error.replace("\x00", "\ufffd"),
            attempts=attempts,
            failed_at=datetime.now(UTC),
            holds_inbox=claim,
        )
        self._added[id] = letter
        self._transaction.changes.append(
            Change(_nothing, lambda: self._state.dead.__setitem__(id, letter))
        )
        return id

    def _letters(self) -> list[DeadLetter]:
        """The dead letters as this transaction sees them, in id order."""
        with self._transaction.store.lock:
            committed = dict(self._state.dead)
        committed.update(self._added)
        return [committed[id] for id in sorted(committed) if id not in self._deleted]

    def page(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> list[DeadLetter]:
        """The dead letters with ids above `after`, in id order, of a group or topic."""
        letters = [
            letter
            for letter in self._letters()
            if letter.id > after and group in (None, letter.group) and topic in (None, letter.topic)
        ]
        return letters[:limit]

    def get(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        return next((letter for letter in self._letters() if letter.id == id), None)

    def replay(self, ids: Sequence[int]) -> list[DeadLetter]:
        """Send the dead letters' messages again; see `DeadLetterRecords.replay`."""
        replayed = [letter for id in sorted(set(ids)) if (letter := self.get(id)) is not None]
        if not replayed:
            return []
        self._delete([letter.id for letter in replayed], "replayed")
        for letter in replayed:
            if letter.holds_inbox:  # else the row, if any, is a handled message's
                self._inbox.forget(letter.group, letter.message_id)
        replayed_at = datetime.now(UTC).isoformat()
        self._outbox.enqueue(
            [
                Envelope(
                    letter.topic,
                    letter.message_id,
                    {**letter.headers, REPLAYED_AT: replayed_at, REPLAYED_FOR: letter.group},
                    letter.body.encode(),
                )
                for letter in replayed
            ]
        )
        return replayed

    def discard(self, ids: Sequence[int]) -> int:
        """Delete dead letters; return how many there were. Their inbox rows stay."""
        found = [id for id in sorted(set(ids)) if self.get(id) is not None]
        self._delete(found, "discarded")
        return len(found)

    def _delete(self, ids: list[int], how: str) -> None:
        """Delete letters at commit; one another transaction deleted first is a conflict."""
        self._deleted.update(ids)
        added = {id for id in ids if id in self._added}

        def check() -> None:
            for id in ids:
                if id not in added and id not in self._state.dead:
                    raise _conflict(f"dead letter {id}, {how} meanwhile")

        def apply() -> None:
            for id in ids:
                self._state.dead.pop(id, None)

        self._transaction.changes.append(Change(check, apply))
