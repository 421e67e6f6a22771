"""The transactional outbox: messages that leave only if the unit of work commits.

    store = SQLStore("postgresql://localhost/bank")
    publisher = Outbox(store, registry)
    with Session(messagebus, StateRepository(store, Account, registry), publisher) as session:
        session.execute(Deposit("acc-1", 10))   # handlers publish to the outbox

On commit, the messages are written to the store's `outbox` table in the same database
transaction as the aggregates and their events: both commit, or neither does. A relay
(`pybondi.relay`, or `pybondi relay --store ... --broker ...`) then sends the committed
rows to the broker, in commit order per topic, and marks them sent once the broker
confirmed them. A crash anywhere loses nothing; at worst a message is sent twice, which
consumers recognise by its `message-id`.

Messages are serialized as they are published (a registered type, or plain JSON; see
`pybondi.envelope`), so a payload that cannot leave the process fails in the handler
that published it, not later in the relay.

Used with a repository that has no store (the in-memory one, say), the outbox writes its
rows in a transaction of its own when the publisher commits, after the repository: a
crash between the two loses the messages, as with any two separate stores. A repository
on another SQL store is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pybondi.envelope import Envelope
from pybondi.exceptions import SessionError
from pybondi.publisher import BufferedPublisher, Message
from pybondi.repositories import StoreRepository
from pybondi.serialization import Registry
from pybondi.stores.base import Records, Store, Transaction

if TYPE_CHECKING:
    from pybondi.stores._sqloutbox import OutboxRecords

__all__ = ["Outbox"]


class Outbox(BufferedPublisher):
    """A publisher that writes messages to the store's outbox table; a relay sends them.

    Args:
        store: the `SQLStore` that keeps the outbox (create its tables with
            `store.create_tables()`, which includes the outbox's).
        registry: the registry of the payload types published (plain JSON payloads
            need none).
    """

    def __init__(self, store: Store, registry: Registry | None = None) -> None:
        super().__init__()
        if not hasattr(store, "statements") or not hasattr(store.statements, "outbox"):
            raise TypeError(
                f"The outbox keeps its rows in a SQL database; {store!r} is not one. Pass a "
                f"SQLStore (SQLite, PostgreSQL or MariaDB)."
            )
        self.store = store
        self.registry = registry

    def __repr__(self) -> str:
        return f"<Outbox on {self.store!r}>"

    def _buffered(self, topic: str, message: Message[Any]) -> Envelope:
        return Envelope.seal(topic, message, self.registry)

    def join(self, repository: object) -> None:
        """Write in the database transaction of the session's repository, on this store.

        A repository on another SQL store is an error: the messages would not commit
        with the aggregates. A repository without a store (the in-memory one) leaves
        the outbox to write in a transaction of its own, when it commits.
        """
        if not isinstance(repository, StoreRepository):
            return
        if repository.storage is not self.store:
            raise SessionError(
                f"The session's repository is on {repository.storage!r} and the outbox "
                f"on {self.store!r}: the messages would not commit with the aggregates. "
                f"Give both the same store object."
            )
        self._buffer().joined = repository.transaction

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
            transaction = self.store.begin()
            try:
                transaction.run(_enqueue(buffer))
                transaction.commit()
            finally:
                transaction.close()
            buffer.clear()

    async def acommit(self) -> None:
        """`commit` for the async path."""
        buffer = self._buffer()
        if buffer:
            transaction: Transaction = await self.store.abegin()
            try:
                await transaction.arun(_enqueue(buffer))
                await transaction.acommit()
            finally:
                await transaction.aclose()
            buffer.clear()


def _enqueue(buffer: Sequence[tuple[str, Envelope]]) -> Callable[[Records], None]:
    envelopes = [envelope for _, envelope in buffer]

    def enqueue(records: Records) -> None:
        # The store is a SQLStore (checked in Outbox()), whose records are OutboxRecords.
        cast("OutboxRecords", records).enqueue(envelopes)

    return enqueue
