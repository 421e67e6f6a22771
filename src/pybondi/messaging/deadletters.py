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
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from pybondi.persistence.records import REPLAYED_FOR, DeadLetter, MessagingRecords
from pybondi.persistence.store import MessagingStore

__all__ = ["REPLAYED_FOR", "DeadLetter", "DeadLetters", "Replayed"]


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
    """The dead letters of a store, sync or async; see the module docstring."""

    def __init__(self, store: MessagingStore) -> None:
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"Dead letters are kept in a store that keeps them, with the inbox; {store!r} "
                f"does not. Pass a SQLStore or a MemoryStore."
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
        return await self.store.atransact(
            lambda records: records.dead_letters.page(
                group=group, topic=topic, after=after, limit=limit
            )
        )

    async def get(self, id: int) -> DeadLetter | None:
        """The dead letter with this id, or None."""
        return await self.store.atransact(lambda records: records.dead_letters.get(id))

    async def replay(self, ids: Sequence[int]) -> Replayed:
        """Send these dead letters' messages again, each in a transaction of its own.

        One that fails (its message no longer fits the outbox, the database refuses it)
        keeps its dead letter and takes nothing else down: the result says, per id, what
        was replayed, what was not there, and what failed and why.
        """
        result = Replayed()
        for id in sorted(set(ids)):
            try:
                letters = await self.store.atransact(partial(_replay, [id]))
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
        return await self.store.atransact(lambda records: records.dead_letters.discard(chosen))


def _replay(ids: builtins.list[int], records: MessagingRecords) -> builtins.list[DeadLetter]:
    return records.dead_letters.replay(ids)
