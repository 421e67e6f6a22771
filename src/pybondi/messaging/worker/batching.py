"""Batches: messages taken at once, of different keys, committed in one transaction.

With `Worker(batch=N)`, the messages that are ready together (received in one go, their
key's previous message settled) are handled up to N at a time in one store transaction:
each in a session of its own, inbox claim included, as without batches, but the sessions
share the transaction and none commits it: the batch does, once, after the last one.
The messages are acknowledged after that commit.

Should anything fail (a handler raises, a `ConcurrencyError`, a deadlock, the commit),
the whole batch rolls back and each of its messages is settled as without batches, in
a transaction of its own (`settling`): its attempt, retry, dead letter and inbox skip are
exactly what they would have been, and a batch that committed is never handled again,
as the inbox has its messages. A message goes alone, never in a batch, when it was
delivered before (a retry, or its worker died: it may be the reason), when it cannot be
read, or while the store is out of reach.

Order: a message waits for its key's previous message to be settled (`loop`) before it
may join a batch, so two messages of one key are never in one batch, and keep their
order. The handlers of a batch run one after the other, on its one connection; a few
batches are under way at once, and the messages that come ready meanwhile wait for the
next one, which makes it fuller.

`session.on_commit` actions wait for the batch's commit (they would otherwise run before
it, and again after a fallback). One that fails is logged and the message acknowledged:
without batches its failure would fail the message, whose retry the inbox then skips,
the same outcome but for the count of retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pybondi._awaiting import maybe_await
from pybondi.messaging.brokers.base import Delivery
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.worker.reading import Unreadable, describe
from pybondi.messaging.worker.sessions import Sessions, ThreadSessions
from pybondi.messaging.worker.settling import Settler
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.store import Connected, Transaction
from pybondi.publisher import Message
from pybondi.session import Session
from pybondi.tracing import handling

__all__ = ["Batches"]

logger = logging.getLogger("pybondi.messaging.worker")

T = TypeVar("T")


@dataclass(eq=False)
class _Entry:
    """A message waiting to be settled, in a batch or alone."""

    delivery: Delivery
    message: Message[Any]
    batched: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batches:
    """Settles deliveries in batches of up to `size`; see the module docstring."""

    def __init__(self, settler: Settler, size: int, under_way: int) -> None:
        self.settler = settler
        self.size = size
        self._pending: list[_Entry] = []  # ready, in no batch yet
        # Batches under way at once: while they commit, the messages that come ready
        # wait, and make the next batch a full one.
        self._slots = asyncio.Semaphore(under_way)

    async def settle(self, delivery: Delivery, opened: Message[Any] | Unreadable) -> None:
        """Settle the delivery in a batch, or alone if it may not join one."""
        settler = self.settler
        if isinstance(opened, Unreadable) or delivery.attempt > 1 or not settler.health.reachable:
            await settler.settle(delivery, opened)
            return
        entry = _Entry(delivery, opened)
        self._pending.append(entry)
        led: bool | None = None
        try:
            await asyncio.sleep(0)  # the messages received with this one join it
            if entry in self._pending:
                async with self._slots:
                    if entry in self._pending:  # no batch took it meanwhile: it leads one
                        led = await self._lead(self._take(entry))
        except BaseException:  # cancelled (a stop) before a batch took it
            with contextlib.suppress(ValueError):
                self._pending.remove(entry)
            raise
        batched = led if led is not None else await entry.batched
        if not batched:
            await settler.settle(delivery, opened)

    def _take(self, leader: _Entry) -> list[_Entry]:
        self._pending.remove(leader)
        taken, self._pending = self._pending[: self.size - 1], self._pending[self.size - 1 :]
        return [leader, *taken]

    async def _lead(self, batch: list[_Entry]) -> bool:
        """Commit the batch and acknowledge it; False (for all) if it failed."""
        if len(batch) == 1:
            return False  # alone: settled as without batches
        committed = False
        try:
            try:
                claimed = await handle_batch(self.settler.sessions, batch)
            except Exception as error:
                logger.info(
                    "A batch of %d message(s) failed (%s): each goes on in a transaction of "
                    "its own", len(batch), describe(error),
                )  # fmt: skip
                return False
            committed = True
            settled = map(self._acknowledge, batch, claimed)
            await asyncio.gather(*settled)
            return True
        finally:
            for entry in batch[1:]:
                if not entry.batched.done():
                    entry.batched.set_result(committed)

    async def _acknowledge(self, entry: _Entry, handled: bool) -> None:
        with handling(entry.message):  # its log lines name the message
            await self.settler.committed(entry.delivery, handled)


async def handle_batch(sessions: Sessions, batch: list[_Entry]) -> list[bool]:
    """Handle the messages in one transaction; for each, False if the inbox had it.

    The inbox claims go first, all in one call (each is one statement still); then each
    claimed message's session runs, one after the other.
    """
    items = [(entry.delivery.envelope, entry.message) for entry in batch]
    if isinstance(sessions, ThreadSessions):
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # not the pool thread's, left from before
        return await loop.run_in_executor(
            sessions._threads, context.run, _handle_in_thread, sessions, items
        )
    deferred: list[Callable[[], Any]] = []
    transaction = await sessions.store.abegin()
    try:
        joined = _joined(transaction)
        claimed = await joined.arun(_claims(sessions, items))
        for (envelope, message), claim in zip(items, claimed, strict=True):
            if claim:
                with handling(message):
                    session = _session(sessions, joined, deferred)
                    await sessions._run(session, envelope, message)
        await transaction.acommit()
    finally:
        await transaction.aclose()
    for action in deferred:
        try:
            await maybe_await(action())
        except Exception:
            logger.exception("An on_commit action failed after its batch committed")
    return claimed


def _handle_in_thread(
    sessions: ThreadSessions, items: list[tuple[Envelope, Message[Any]]]
) -> list[bool]:
    deferred: list[Callable[[], Any]] = []
    transaction = sessions.store.begin()
    try:
        joined = _joined(transaction)
        claimed = joined.run(_claims(sessions, items))
        for (envelope, message), claim in zip(items, claimed, strict=True):
            if claim:
                with handling(message), _session(sessions, joined, deferred) as session:
                    sessions._deliver_sync(envelope.topic, message, session)
        transaction.commit()
    finally:
        transaction.close()
    for action in deferred:
        try:
            action()
        except Exception:
            logger.exception("An on_commit action failed after its batch committed")
    return claimed


def _claims(
    sessions: Sessions, items: list[tuple[Envelope, Message[Any]]]
) -> Callable[[MessagingRecords], list[bool]]:
    group = sessions.consumer.group

    def claim(records: MessagingRecords) -> list[bool]:
        return [records.inbox.claim(group, envelope) for envelope, _ in items]

    return claim


def _session(
    sessions: Sessions, joined: Transaction[Any], deferred: list[Callable[[], Any]]
) -> BatchedSession:
    session = sessions._session(joined, BatchedSession)
    assert isinstance(session, BatchedSession)
    session.deferred = deferred  # the batch's
    return session


class BatchedSession(Session):
    """A session of a batch: its `on_commit` actions wait for the batch's commit."""

    __slots__ = ("deferred",)

    deferred: list[Callable[[], Any]]

    def on_commit(self, action: Callable[[], Any]) -> None:
        """Call `action()` once the batch has committed, and only then."""
        super().on_commit(action)  # refuses what cannot be called
        self.deferred.append(self._on_commit.pop())


class _Joined(Transaction[Any]):
    """The batch's transaction as each of its sessions sees it.

    The session's work runs in it; its commit, rollback and close are the batch's to
    do, once, so here they do nothing: a session that fails raises, and the batch then
    rolls everything back.
    """

    def __init__(self, transaction: Transaction[Any]) -> None:
        self.batch = transaction
        self.store = transaction.store

    def run(self, work: Callable[[Any], T]) -> T:
        """Run `work` in the batch's transaction."""
        return self.batch.run(work)

    async def arun(self, work: Callable[[Any], T]) -> T:
        """`run`, awaited."""
        return await self.batch.arun(work)

    def commit(self) -> None:
        """Nothing: the batch commits."""

    def rollback(self) -> None:
        """Nothing: the session raises, and the batch rolls back."""

    def close(self) -> None:
        """Nothing: the batch closes its transaction."""


class _JoinedConnection(_Joined, Connected):
    """A batch's SQL transaction: handlers may write through its connection."""

    batch: Any

    def writing_connection(self) -> Any:
        """The batch's connection, its writes begun."""
        return self.batch.writing_connection()

    async def awriting_connection(self) -> Any:
        """The batch's async connection, its writes begun."""
        return await self.batch.awriting_connection()


def _joined(transaction: Transaction[Any]) -> _Joined:
    if isinstance(transaction, Connected):
        return _JoinedConnection(transaction)
    return _Joined(transaction)
