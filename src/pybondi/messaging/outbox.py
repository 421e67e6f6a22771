"""The transactional outbox: messages that leave only if the unit of work commits.

    store = SQLStore("postgresql://localhost/bank")
    publisher = Outbox(store, registry)
    with Session(messagebus, StateRepository(store, Account, registry), publisher) as session:
        session.execute(Deposit("acc-1", 10))   # handlers publish to the outbox

On commit, the messages are written to the store's `outbox` table in the same database
transaction as the aggregates and their events: both commit, or neither does. A relay
(`pybondi.messaging.relay`, or `pybondi relay --store ... --broker ...`) then sends the committed
rows to the broker, in commit order per topic, and marks them sent once the broker
confirmed them. A crash anywhere loses nothing; at worst a message is sent twice, which
consumers recognise by its `message-id`.

Messages are serialized as they are published (a registered type, or plain JSON; see
`pybondi.messaging.envelope`), so a payload that cannot leave the process fails in the handler
that published it, not later in the relay.

Used with a repository that has no store (the in-memory one, say), the outbox writes its
rows in a transaction of its own when the publisher commits, after the repository: a
crash between the two loses the messages, as with any two separate stores. A repository
on another SQL store is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pybondi.exceptions import SessionError
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.serialization import Registry
from pybondi.persistence.store import MessagingStore, Transaction
from pybondi.publisher import BufferedPublisher, Message

__all__ = ["Outbox"]


class Outbox(BufferedPublisher):
    """A publisher that writes messages to the store's outbox; a relay sends them.

    Args:
        store: the store that keeps the outbox: a `SQLStore` (create its tables with
            `store.create_tables()`, which includes the outbox's) or a `MemoryStore`.
        registry: the registry of the payload types published (plain JSON payloads
            need none).
    """

    def __init__(self, store: MessagingStore, registry: Registry | None = None) -> None:
        super().__init__()
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"The outbox keeps its messages in a store that keeps an outbox; {store!r} "
                f"does not. Pass a SQLStore (SQLite, PostgreSQL or MariaDB) or a MemoryStore."
            )
        self.store = store
        self.registry = registry

    def __repr__(self) -> str:
        return f"<Outbox on {self.store!r}>"

    def _buffered(self, topic: str, message: Message[Any]) -> Envelope:
        return Envelope.seal(topic, message, self.registry)

    def join(self, transaction: Transaction[Any] | None) -> None:
        """Write in the session's store transaction, if it has one (on this store).

        A transaction on another store is an error: the messages would not commit with
        the aggregates. A session without one (an in-memory repository) leaves the outbox
        to write in a transaction of its own, when it commits.
        """
        if transaction is None:
            return
        if transaction.store is not self.store:
            raise SessionError(
                f"The session's transaction is on {transaction.store!r} and the outbox on "
                f"{self.store!r}: the messages would not commit with the aggregates. Give "
                f"both the same store object."
            )
        self._buffer().joined = transaction

    def prepare(self) -> None:
        """Write the buffered messages in the unit of work's transaction, if it has one."""
        buffer = self._buffer()
        if buffer and buffer.joined is not None:
            buffer.joined.run(_enqueue(buffer))
            buffer.clear()

    async def aprepare(self) -> None:
        """`prepare` for the async path."""
        buffer = self._buffer()
        if buffer and buffer.joined is not None:
            await buffer.joined.arun(_enqueue(buffer))
            buffer.clear()

    def commit(self) -> None:
        """Write what `prepare` did not (no unit of work on this store) in a transaction."""
        buffer = self._buffer()
        if buffer:
            self.store.transact(_enqueue(buffer))
            buffer.clear()

    async def acommit(self) -> None:
        """`commit` for the async path."""
        buffer = self._buffer()
        if buffer:
            await self.store.atransact(_enqueue(buffer))
            buffer.clear()


def _enqueue(buffer: Sequence[tuple[str, Envelope]]) -> Callable[[MessagingRecords], None]:
    envelopes = [envelope for _, envelope in buffer]
    return lambda records: records.outbox.enqueue(envelopes)
