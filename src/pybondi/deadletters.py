"""Dead letters: the messages a worker gave up on, to list, replay or discard.

    dead = DeadLetters(SQLStore("postgresql://localhost/bank", asynchronous=True))
    for letter in await dead.list(group="billing", topic="bank.deposits"):
        print(letter.id, letter.message_id, letter.attempts, letter.error)
    await dead.replay([12, 13])     # sent again through the outbox, handled again
    await dead.discard([14])        # gone; its inbox row, if it held one, stays

A worker dead-letters a message that failed too often, or that it could not read: the
message, the error and the number of attempts are kept in the store's `dead_letters`
table. A message that failed its attempts is also recorded in the group's inbox (its
letter `holds_inbox`), so that the broker delivering it again changes nothing. One that
could not be read (not JSON, an unknown type, a payload that fails validation, an id
the inbox cannot keep) is not: the group never handled it, so a corrected message sent
with the same id is handled, while the same bad message delivered again is acknowledged
without a second dead letter.

Replaying writes the message to the outbox again (same topic, id and headers, plus
`replayed-at` and `replayed-for`, the group, for information), removes the group's
inbox row when the letter holds it, so that the worker handles it again, and deletes
the dead letter, in one transaction: the relay then sends it. The topic's other groups
recognise it by their own inbox, which has its id since they handled the original: they
acknowledge it unhandled. Nothing else marks a message handled or replayed: a header
set by a producer does not. A replay later than the other groups' inbox retention (seven
days by default) reaches them as a new message, which they handle again.

Every method runs in a transaction of its own, on a sync store (in a thread) or an
async one.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:
    from pybondi.stores._sqlinbox import InboxRecords
    from pybondi.stores.base import Records, Store

__all__ = ["REPLAYED_FOR", "DeadLetter", "DeadLetters", "Replayed"]

REPLAYED_FOR = "replayed-for"
"""The header naming the group whose dead letter a replayed message was; information
only (any producer could set it): other groups skip a replay by their inbox."""

T = TypeVar("T")


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
    holds_inbox: bool


@dataclass(slots=True)
class Replayed:
    """What `DeadLetters.replay` did, per dead letter.

    Attributes:
        replayed: the dead letters sent again, in id order.
        missing: the ids with no dead letter (never, or replayed or discarded meanwhile).
        failed: why each of the others could not be replayed; they are still dead letters.
    """

    replayed: list[DeadLetter] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class DeadLetters:
    """The dead letters of a SQL store, sync or async; see the module docstring."""

    def __init__(self, store: Store) -> None:
        if getattr(getattr(store, "statements", None), "inbox", None) is None:
            raise TypeError(
                f"Dead letters are kept in a SQL database, with the inbox; {store!r} is not "
                f"a SQLStore."
            )
        self.store = store

    def __repr__(self) -> str:
        return f"<DeadLetters of {self.store!r}>"

    async def list(
        self,
        group: str | None = None,
        topic: str | None = None,
        after: int = 0,
        limit: int = 100,
    ) -> builtins.list[DeadLetter]:
        """Up to `limit` dead letters with ids above `after`, in id order.

        Only the group's and the topic's, when given. For the next page, pass the last
        id as `after`.
        """
        return await self._transact(
            lambda records: records.dead_letters(group=group, topic=topic, after=after, limit=limit)
        )

    async def get(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        return await self._transact(lambda records: records.dead_letter_by_id(id))

    async def replay(self, ids: Sequence[int]) -> Replayed:
        """Send these dead letters' messages again, each in a transaction of its own.

        One that fails (its message no longer fits the outbox, the database refuses it)
        keeps its dead letter and takes nothing else down: the result says, per id, what
        was replayed, what was not there, and what failed and why.
        """
        result = Replayed()
        for id in sorted(set(ids)):
            try:
                letters = await self._transact(partial(_replay, [id]))
            except Exception as error:  # this one only; the others stand alone
                result.failed[id] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            if letters:
                result.replayed += letters
            else:
                result.missing.append(id)
        return result

    async def discard(self, ids: Sequence[int]) -> int:
        """Delete these dead letters; return how many there were."""
        chosen = builtins.list(ids)
        return await self._transact(lambda records: records.discard(chosen))

    async def _transact(self, work: Callable[[InboxRecords], T]) -> T:
        """Run `work` in a transaction of its own and commit (a sync store in a thread)."""
        # A SQLStore's records are InboxRecords (checked in __init__).
        return await self.store.atransact(cast("Callable[[Records], T]", work))


def _replay(ids: builtins.list[int], records: InboxRecords) -> builtins.list[DeadLetter]:
    return records.replay(ids)
