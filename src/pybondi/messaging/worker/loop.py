"""The worker's loop: it receives deliveries and starts them, in key order, in bounds.

`Worker.run` takes deliveries from the broker as one consumer of the group, up to
`consumer.in_flight` under way at once, and starts a task for each: after the task of the
previous message of its key, if the consumer has a `key`. Each task reads the delivery
(`reading`), then settles it (`settling`): handled in a session of its own (`sessions`),
acknowledged, retried or dead-lettered. While the store is out of reach (`storehealth`),
no new delivery is taken. `stop()` ends `run` within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta
from typing import Any

from pybondi.exceptions import AsyncRequired, SessionError, short_repr
from pybondi.messaging.backoff import backoff
from pybondi.messaging.brokers.base import Broker, Delivery, Subscription
from pybondi.messaging.consumer import Consumer
from pybondi.messaging.worker.batching import Batches
from pybondi.messaging.worker.reading import Unreadable, describe, key_of, read
from pybondi.messaging.worker.sessions import Sessions, ThreadSessions
from pybondi.messaging.worker.settling import Heartbeat, Settler
from pybondi.messaging.worker.storehealth import StoreHealth
from pybondi.persistence.records import id_problem
from pybondi.persistence.repositories import StoreRepository
from pybondi.persistence.store import MessagingStore
from pybondi.publisher import Message

__all__ = ["Worker"]

logger = logging.getLogger("pybondi.messaging.worker")

_PURGE_EVERY = timedelta(minutes=10)
_MISTAKES = (TypeError, ValueError, AttributeError, NotImplementedError)
_ASYNC_STORE = (
    "give the worker an async store (SQLStore(url, asynchronous=True); pybondi worker "
    "without --sync), on which handlers may be sync or async."
)
_RECEIVE_WAIT = 1.0  # seconds a receive waits for messages
# Batches under way at once (Worker(batch=N)): while one commits, the next runs its
# handlers, and the messages that come ready meanwhile gather into the one after. One
# leaves the database idle while the worker acknowledges; more make small batches (each
# takes what little is ready). Two measured best (benchmarks/README.md, Consumers).
_BATCHES_UNDER_WAY = 2
_CLOSE_WITHIN = 1.0  # seconds to close the connections at least, after the grace


class Worker:
    """Handles the consumer's messages from a broker until `stop()`; see the module doc.

    Args:
        consumer: the topics, group, handlers, repository and retry policy.
        broker: the broker adapter (`pybondi.messaging.brokers.connect(url)`).
        store: the `SQLStore` of the sessions, the inbox, the outbox and the dead
            letters (its tables: `store.create_tables()`). Each message under way holds
            one of its connections: give it a pool that large (`pool_size=` on
            PostgreSQL and MariaDB; `pybondi worker` does), or the pool opens and closes
            connections all the time, which costs a third of the throughput.
        name: this worker's name among the group's consumers; unique per process.
        redeliver_after: seconds after which a message held by a worker that went silent
            goes to another worker (Redis, NATS; RabbitMQ notices a closed connection).
            While a message is being handled, the worker tells the broker so every
            third of it.
        grace: seconds `stop()` waits for the messages under way.
        inbox_retention: how long the inbox remembers a message id.
        batch: how many messages (of different keys) one transaction may commit
            together; 1 (the default): each its own. See `pybondi.messaging.worker.batching`:
            a failed batch falls back to a transaction per message.

    Attributes:
        received, handled, skipped, retried, dead_lettered: how many deliveries the
            worker took from the broker, and how many of them it handled, skipped (the
            group had them already), retried later and dead-lettered, since it started.
    """

    def __init__(
        self,
        consumer: Consumer,
        broker: Broker,
        store: MessagingStore,
        *,
        name: str | None = None,
        redeliver_after: float = 60.0,
        grace: float = 30.0,
        inbox_retention: timedelta = timedelta(days=7),
        batch: int = 1,
    ) -> None:
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"A worker keeps its inbox and dead letters in the store; {store!r} keeps "
                f"none. Pass a SQLStore (SQLite, PostgreSQL or MariaDB) or a MemoryStore."
            )
        if not consumer.topics:
            raise ValueError(
                f"{consumer!r} has no topic: give it subscribers (consumer.subscribe) or "
                f"topics to dispatch (consumer.dispatch) before starting a worker."
            )
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(
                f"batch is how many messages one transaction may commit, at least 1; got {batch!r}."
            )
        if problem := id_problem(consumer.group, "name"):
            raise ValueError(
                f"Consumer group {short_repr(consumer.group, 60)} cannot be kept in the "
                f"inbox: {problem}. Give the consumer a shorter group name."
            )
        self.consumer = consumer
        self.broker = broker
        self.store = store
        self.name = name or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.redeliver_after = redeliver_after
        self.grace = grace
        self.inbox_retention = inbox_retention
        self.batch = batch
        self.received = 0
        self._stopping = asyncio.Event()
        self._stop_by: float | None = None  # time.monotonic() by which run() returns
        self._health = StoreHealth(self.name, store, self._stopping, lambda: len(self._tasks))
        self._sessions = (
            Sessions(consumer, store)
            if store.is_async
            else ThreadSessions(consumer, store, self.name)
        )
        self._settler = Settler(self.name, consumer, store, self._sessions, self._health)
        self._settle = (
            Batches(self._settler, batch, _BATCHES_UNDER_WAY).settle
            if batch > 1
            else self._settler.settle
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_of_key: dict[Hashable, asyncio.Task[None]] = {}
        self._purged_at: datetime | None = None
        self._check_repository()
        self._check_bindings()
        if not store.is_async:
            self._check_sync_handlers()

    @property
    def handled(self) -> int:
        """How many deliveries were handled since the worker started."""
        return self._settler.handled

    @property
    def skipped(self) -> int:
        """How many deliveries were skipped: the group had them already."""
        return self._settler.skipped

    @property
    def retried(self) -> int:
        """How many deliveries were handed back to the broker, to come again later."""
        return self._settler.retried

    @property
    def dead_lettered(self) -> int:
        """How many deliveries went to the dead letters."""
        return self._settler.dead_lettered

    def __repr__(self) -> str:
        return (
            f"<Worker {self.name} of {self.consumer.group!r} on "
            f"{', '.join(self.consumer.topics)}: {self.broker!r} -> {self.store!r}>"
        )

    def stop(self) -> None:
        """Stop taking messages; `run` returns once those under way are done.

        That is within `grace` seconds (see the module docstring).
        """
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self.grace
        self._stopping.set()

    async def run(self) -> None:
        """Take and handle messages until `stop()`."""
        consumer = self.consumer
        subscription = self.broker.subscribe(
            consumer.topics,
            consumer.group,
            consumer=self.name,
            in_flight=consumer.in_flight,
            redeliver_after=self.redeliver_after,
        )
        self._check_pool()
        stopped = asyncio.ensure_future(self._stopping.wait())
        failures = 0
        try:
            while not self._stopping.is_set():
                if not self._health.reachable:  # no new messages until the store answers
                    await self._health.wait()
                    continue
                free = consumer.in_flight - len(self._tasks)
                if free <= 0:  # full: wait for a slot, or stop()
                    await asyncio.wait({*self._tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    deliveries = await self._receive(subscription, free, stopped)
                except _MISTAKES:
                    raise  # a wrong option or name: it would fail every time
                except Exception as error:  # the broker, unreachable: the adapter reconnects
                    failures += 1
                    delay = backoff(failures, first=0.4, longest=30.0, jitter=True)
                    logger.warning(
                        "Worker %s cannot receive from %r (%s); retrying in %.1f s",
                        self.name, self.broker, describe(error), delay,
                    )  # fmt: skip
                    await self._pause(delay)
                    continue
                failures = 0
                self.received += len(deliveries)
                for delivery in deliveries:
                    self._start(delivery)
                await self._purge_inbox()
        finally:
            self.stop()  # if an error ended the loop: messages waiting for the store end too
            stopped.cancel()
            await self._finish()
            await self._health.close()
            await self._close(subscription)
            await self._sessions.close()

    async def _receive(
        self, subscription: Subscription, limit: int, stopped: asyncio.Future[Any]
    ) -> list[Delivery]:
        """What the subscription receives; nothing once `stop()` comes first.

        A broker that does not answer (or a connection being made) can hold a receive
        for long: a stop gives it up, so that `run` returns within the grace. Whatever
        it had taken, unacknowledged, comes back to the group.
        """
        receiving = asyncio.ensure_future(subscription.receive(limit, _RECEIVE_WAIT))
        try:
            await asyncio.wait((receiving, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            given_up = not receiving.done()
            if given_up:
                receiving.cancel()
                # A moment to tidy up, within the grace.
                await asyncio.wait([receiving], timeout=min(_CLOSE_WITHIN, self._left()))
        if given_up:
            if receiving.done() and not receiving.cancelled():
                receiving.exception()  # retrieved: an error of a receive given up is moot
            return []
        return receiving.result()

    async def _close(self, subscription: Subscription) -> None:
        """Close the subscription and the broker, in what is left of the grace."""
        try:
            async with asyncio.timeout(max(self._left(), _CLOSE_WITHIN)):
                with contextlib.suppress(Exception):
                    await subscription.close()
                with contextlib.suppress(Exception):
                    await self.broker.aclose()
        except TimeoutError:
            logger.warning("Worker %s could not close %r in time", self.name, self.broker)

    def _left(self) -> float:
        """Seconds left of the grace since `stop()` (all of it, if not stopped)."""
        if self._stop_by is None:
            return self.grace
        return max(0.0, self._stop_by - time.monotonic())

    # Taking a message -----------------------------------------------------------------

    def _start(self, delivery: Delivery) -> None:
        """Open the message and start handling it, after the last one of its key."""
        opened: Message[Any] | Unreadable
        try:
            opened = read(self.consumer, delivery)
            key = key_of(self.consumer, opened)
        except Unreadable as unreadable:
            opened, key = unreadable, None
        before = self._last_of_key.get(key) if key is not None else None
        task = asyncio.create_task(self._take(delivery, opened, before))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if key is not None:
            self._last_of_key[key] = task
            task.add_done_callback(lambda done: self._forget_key(key, done))

    def _forget_key(self, key: Hashable, task: asyncio.Task[None]) -> None:
        if self._last_of_key.get(key) is task:
            del self._last_of_key[key]

    async def _take(
        self,
        delivery: Delivery,
        opened: Message[Any] | Unreadable,
        before: asyncio.Task[None] | None,
    ) -> None:
        # The heartbeat beats while it waits for its key's turn too.
        heartbeat = Heartbeat(self._settler.extend, delivery, self.redeliver_after / 3)
        try:
            if before is not None:
                await asyncio.wait([before])
            await self._settle(delivery, opened)
        finally:
            heartbeat.cancel()

    def _check_pool(self) -> None:
        kept, in_flight = self.store.connections, self.consumer.in_flight
        if kept is not None and kept < in_flight:
            logger.warning(
                "Worker %s: the store's pool keeps %d connection(s), for %d messages in "
                "flight: the others open and close one each, which costs about a third "
                "of the throughput. Make the store with SQLStore(url, pool_size=%d) "
                "(pybondi worker does).",
                self.name, kept, in_flight, in_flight + 2,
            )  # fmt: skip

    def _check_bindings(self) -> None:
        """Refuse, before any message, a topic bound to a type the registry lacks."""
        registry = self.consumer.registry
        for topic, binding in self.consumer.bindings.items():
            payload = binding.payload
            if isinstance(payload, type) and (registry is None or payload not in registry):
                raise TypeError(
                    f"Topic {topic!r} is bound to {payload.__name__}, which the consumer's "
                    f"registry does not register: register it (registry.register("
                    f"{payload.__name__})) and give the consumer the registry."
                )

    def _check_repository(self) -> None:
        """Refuse, before any message, a repository whose transaction is not the store's."""
        if self.consumer.repository is None:
            return
        repository = self.consumer.repository(self.store)
        if not isinstance(repository, StoreRepository):
            raise TypeError(
                f"The consumer's repository(store) gave {repository!r}: the inbox must commit "
                f"in the repository's transaction, so it must be a store repository on the "
                f"store it is given, as in `repository=lambda store: StateRepository(store, "
                f"Account, registry)`."
            )
        try:
            repository.check_store(self.store)
        except SessionError as error:
            raise TypeError(
                f"The consumer's repository(store) gave {repository!r}: {error}"
            ) from None

    def _check_sync_handlers(self) -> None:
        """Refuse, before any message, async handlers for sessions run in threads."""
        consumer, bus = self.consumer, self.consumer.messagebus
        try:
            for topic in consumer.topics:
                if topic not in consumer.dispatched:
                    consumer.routes(topic)  # compiles them sync, or raises AsyncRequired
        except AsyncRequired as error:
            raise ValueError(f"{error} A sync store runs sync sessions: {_ASYNC_STORE}") from None
        handlers = [*bus.command_handlers.values()]
        handlers += [entry.handler for entries in bus.event_handlers.values() for entry in entries]
        awaited = [handler.name for handler in handlers if handler.callee.kind.is_async]
        if consumer.dispatched and awaited:
            raise ValueError(
                f"The messagebus has async handlers ({', '.join(sorted(set(awaited)))}), and a "
                f"sync store runs sync sessions: {_ASYNC_STORE}"
            )

    # Bookkeeping ------------------------------------------------------------------------

    async def _finish(self) -> None:
        """Let the messages under way finish, for up to `grace` seconds; cancel the rest."""
        if not self._tasks:
            return
        logger.info("Worker %s: %d message(s) under way", self.name, len(self._tasks))
        _, late = await asyncio.wait(set(self._tasks), timeout=self._left())
        if late and isinstance(self._sessions, ThreadSessions):
            logger.warning(
                "Worker %s: %d message(s) still under way after %.1f s; sync handlers "
                "cannot be interrupted, so the worker waits for them",
                self.name, len(late), self.grace,
            )  # fmt: skip
            await asyncio.wait(late)
            return
        for task in late:
            task.cancel()
        if late:
            logger.warning(
                "Worker %s: %d message(s) still under way after %.1f s were rolled back; "
                "they come back to the group",
                self.name, len(late), self.grace,
            )  # fmt: skip
            await asyncio.wait(late)

    async def _purge_inbox(self) -> None:
        """Forget inbox ids older than the retention, every ten minutes."""
        now = datetime.now(UTC)
        if self._purged_at is not None and now - self._purged_at < _PURGE_EVERY:
            return
        if not self._health.reachable:
            return
        self._purged_at = now
        cutoff = now - self.inbox_retention
        try:
            purged = await self.store.atransact(lambda records: records.inbox.purge(cutoff))
        except Exception as error:
            logger.warning("Worker %s could not purge the inbox: %r", self.name, error)
            return
        if purged:
            logger.info("Worker %s forgot %d inbox id(s) past retention", self.name, purged)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
