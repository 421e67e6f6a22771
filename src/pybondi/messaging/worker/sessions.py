"""Each message in a unit of work of its own: the inbox claim, the session, the commit.

A message's transaction begins with its claim in the group's inbox: when the inbox has
its id already, the group handled it, and nothing runs. Otherwise the session runs the
consumer's handlers over a repository from `consumer.repository(store)` (an in-memory
one without it) and an outbox on the store, in that same transaction: what the handlers
change, what they publish and the inbox row commit together, or none of them does.

Two drivers: `Sessions` runs them on the event loop, for an async store (handlers sync
or async); `ThreadSessions` runs each in a thread of a pool, for a sync store and sync
handlers. Both retry a message at once, in a new session, when another session changed
the same aggregate meanwhile (`ConcurrencyError`), up to ten times.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pybondi.exceptions import ConcurrencyError
from pybondi.messaging.consumer import Consumer
from pybondi.messaging.envelope import Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.store import MessagingStore, Transaction
from pybondi.publisher import Message
from pybondi.repository import Repository
from pybondi.session import Session

__all__ = ["Sessions", "ThreadSessions"]

_CONFLICTS = 10  # version conflicts a message may meet before they count as a failure


class Sessions:
    """Handles messages in sessions on the event loop; see the module docstring."""

    def __init__(self, consumer: Consumer, store: MessagingStore) -> None:
        self.consumer = consumer
        self.store = store

    async def handle(self, envelope: Envelope, message: Message[Any]) -> bool:
        """Handle the message in a session of its own; False if the inbox had it already.

        Two messages about one aggregate, handled at once, conflict: one commits, the
        other gets a `ConcurrencyError`. That is no fault of the message, so it does not
        count as an attempt; it is handled again at once, after a short random pause.
        """
        for conflicts in itertools.count():
            try:
                return await self._handle_once(envelope, message)
            except ConcurrencyError:
                if conflicts >= _CONFLICTS:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * 2**conflicts))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _handle_once(self, envelope: Envelope, message: Message[Any]) -> bool:
        transaction = await self.store.abegin()
        try:
            claimed = await transaction.arun(self._claim(envelope))
        except BaseException:
            await transaction.aclose()
            raise
        if not claimed:  # handled already: nothing was written
            await transaction.aclose()
            return False
        await self._run(self._session(transaction), envelope, message)
        return True

    async def _run(self, session: Session, envelope: Envelope, message: Message[Any]) -> None:
        """Run the handlers in the session, then commit it; within the consumer's timeout."""
        timeout = self.consumer.timeout
        try:
            async with asyncio.timeout(timeout), session:
                await self._deliver(envelope.topic, message, session)
        except TimeoutError as error:
            if timeout is None or str(error):
                raise
            raise TimeoutError(
                f"Handling took more than the consumer's timeout, {timeout:g} s: the session "
                f"was cancelled and rolled back."
            ) from None

    async def _deliver(self, topic: str, message: Message[Any], session: Session) -> None:
        if topic in self.consumer.dispatched:
            await session.adispatch(message.payload)
            return
        invokers, _ = self.consumer.aroutes(topic)
        for invoke, awaited in invokers:
            result = invoke(message)
            if awaited:
                await result

    def _claim(self, envelope: Envelope) -> Callable[[MessagingRecords], bool]:
        return partial(_claim, self.consumer.group, envelope)

    def _session(self, transaction: Transaction[Any], kind: type[Session] = Session) -> Session:
        consumer, store = self.consumer, self.store
        repository = consumer.repository(store) if consumer.repository else Repository()
        publisher = Outbox(store, consumer.registry)
        return kind(consumer.messagebus, repository, publisher, transaction=transaction)

    async def close(self) -> None:
        """Release what the driver holds."""


class ThreadSessions(Sessions):
    """Handles messages in sessions on a sync store, each in a thread of a pool.

    Sync handlers that use the sync API (`repository.get`) run there; a stop waits for
    them, since a thread cannot be interrupted.
    """

    def __init__(self, consumer: Consumer, store: MessagingStore, name: str) -> None:
        super().__init__(consumer, store)
        self._threads = ThreadPoolExecutor(consumer.in_flight, f"pybondi-{name}")

    async def _handle_once(self, envelope: Envelope, message: Message[Any]) -> bool:
        context = contextvars.copy_context()  # the message's tracing ids, for its logs
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._threads, context.run, self._handle_in_thread, envelope, message
        )

    def _handle_in_thread(self, envelope: Envelope, message: Message[Any]) -> bool:
        transaction = self.store.begin()
        try:
            claimed = transaction.run(self._claim(envelope))
        except BaseException:
            transaction.close()
            raise
        if not claimed:
            transaction.close()
            return False
        with self._session(transaction) as session:
            self._deliver_sync(envelope.topic, message, session)
        return True

    def _deliver_sync(self, topic: str, message: Message[Any], session: Session) -> None:
        if topic in self.consumer.dispatched:
            session.dispatch(message.payload)
            return
        invokers, _ = self.consumer.routes(topic)
        for invoke in invokers:
            invoke(message)

    async def close(self) -> None:
        """Let the pool's threads go once they are done."""
        self._threads.shutdown(wait=False)


def _claim(group: str, envelope: Envelope, records: MessagingRecords) -> bool:
    return records.inbox.claim(group, envelope)
