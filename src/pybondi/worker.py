"""The worker: handles a broker's messages in sessions, exactly once in effect.

    worker = Worker(consumer, connect("amqp://guest:guest@localhost/"),
                    SQLStore("postgresql://localhost/bank", asynchronous=True))
    await worker.run()          # until worker.stop(), or SIGTERM under `pybondi worker`

The worker takes the messages of the consumer's topics (`pybondi.consumer`) from the
broker, as one consumer of the consumer's group, up to `consumer.in_flight` at a time.
Each message gets a `Session` of its own. In its database transaction, the message's id
goes into the store's inbox table, next to what the handlers changed and the messages
they published through the session's outbox. The message is acknowledged only after
that transaction committed.

**The guarantee.** Brokers deliver at least once: a message comes again when its worker
dies before acknowledging it, or when the acknowledgement is lost. A message whose id
the inbox already holds for the group is acknowledged and skipped, without running its
handlers. So what the handlers do *in the session's transaction* (aggregates, events,
outbox messages) happens exactly once. What they do *outside it* (an e-mail, an HTTP
call) happens at least once: after a crash between the side effect and the commit, the
message is handled again. Make such calls idempotent, or publish a message and do them
in a subscriber of their own. The inbox keeps ids for `inbox_retention` (seven days):
a duplicate arriving later than that is handled again. Only the worker writes the
inbox; no header a producer sets makes a group skip a message. A replayed dead letter
(`pybondi.deadletters`) is skipped by the topic's other groups because their inbox has
its id, from the original: one replayed after their retention is new to them.

**Failures.** A handler that raises rolls its session back; the message comes back
after a delay (`consumer.retry`: exponential backoff, through the broker, so nothing
waits in memory), up to `consumer.retry.attempts` attempts; then it goes to the dead
letters, a table of the store, with the error, the attempt count and the original
headers and body (`pybondi dead-letters list|show|replay|discard`), and into the
group's inbox, so that a redelivery changes nothing. A handler that takes longer than
`consumer.timeout` (async stores) is cancelled: a failed attempt. A message delivered
more times than its attempts without ever failing (its worker died each time: a crash,
an exhausted memory) is dead-lettered without running a handler (on RabbitMQ, quorum
queues count redeliveries; a classic queue you declared does not, and there the message
comes back until it stops killing its worker). A message the group's inbox already has
is never dead-lettered. Either way the worker goes on with the next message.

**Unreadable messages** (not JSON, an unregistered type, a payload that fails
validation, a command for a `dispatch`ed topic that is not one, an id the inbox cannot
keep: over 255 characters, or not text) are dead-lettered at once, without running a
handler: retrying would not help. They do not go into the inbox, as the group never
handled them: a corrected message sent with the same id is handled, and the same bad
message delivered again is acknowledged without a second dead letter. A flood of them
costs one transaction each and holds nothing up. Should dead-lettering itself fail for
another reason than the store being out of reach (a bug), the worker logs the message
and the error once, with the traceback, and acknowledges it: the message is then lost
but for that log line, rather than coming back forever.

**The store out of reach.** A session that fails because the database does not answer
is no failed attempt (`pybondi._storehealth`): once a trivial transaction fails too, the
worker takes no new messages, and those under way wait, without counting an attempt
and with their heartbeats going on, to be handled again as soon as the store answers
(it is probed every second). The log says so once when it starts and once when it
ends, and once a minute in between.

**Stopping.** `stop()` (SIGTERM under the CLI) stops taking messages, lets those under
way finish and acknowledges them, for up to `grace` seconds; a message still under way
after that is rolled back and comes back to another worker, as does one waiting for the
store, at once. `run` returns within `grace` (and a second more to close the
connections, if the messages took all of it), whatever the broker is doing: a receive
waiting for a broker that does not answer, or a connection being made, is given up.

A `ConcurrencyError` (another session changed the same aggregate meanwhile) is not a
failure of the message: it is handled again at once, in a new session, up to ten times.

**Order.** Messages are handled concurrently. With `consumer.key`, messages with one key
are handled one after the other, in the order this worker received them. Across
workers, and for a retried message, order is not kept: a retry comes after messages
received in the meantime.

Stores: with an async store, sessions run on the event loop (`async with Session`) and
handlers may be sync or async; with a sync store, each session runs in a thread of its
own (`with Session`), for sync handlers that use the sync API (`repository.get`): async
handlers are refused at start, and a stop waits for the threads, which cannot be
interrupted, beyond the grace if need be.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import random
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pybondi._storehealth import StoreHealth
from pybondi.brokers.base import Broker, Delivery, Subscription
from pybondi.consumer import Binding, Consumer, _session
from pybondi.envelope import Envelope
from pybondi.exceptions import (
    AsyncRequired,
    ConcurrencyError,
    PybondiError,
    SerializationError,
    short_repr,
)
from pybondi.messages import Command, Event
from pybondi.outbox import Outbox, _enqueue
from pybondi.publisher import Message
from pybondi.repositories import StoreRepository
from pybondi.session import Session
from pybondi.stores.base import Records, Store, StoredEvent
from pybondi.tracing import handling

if TYPE_CHECKING:
    from pybondi.stores._sqlinbox import InboxStatements
    from pybondi.stores._sqlrecords import SQLRecords

__all__ = ["Worker"]

logger = logging.getLogger("pybondi.worker")

T = TypeVar("T")

_PURGE_EVERY = timedelta(minutes=10)
_GAVE_UP = (
    "Gave up after {} deliveries that ended neither in a commit nor in an error: the "
    "worker handling it stopped or died each time (a crash, a kill, an exhausted memory)"
)
_MISTAKES = (TypeError, ValueError, AttributeError, NotImplementedError)
_ASYNC_STORE = (
    "give the worker an async store (SQLStore(url, asynchronous=True); pybondi worker "
    "without --sync), on which handlers may be sync or async."
)
_CONFLICTS = 10  # version conflicts a message may meet before they count as a failure
_RECEIVE_WAIT = 1.0  # seconds a receive waits for messages
_CLOSE_WITHIN = 1.0  # seconds to close the connections at least, after the grace
_LOGGED_BODY = 2000  # characters of a message's body a log line shows, at most


class Worker:
    """Handles the consumer's messages from a broker until `stop()`; see the module doc.

    Args:
        consumer: the topics, group, handlers, repository and retry policy.
        broker: the broker adapter (`pybondi.brokers.connect(url)`).
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

    Attributes:
        received, handled, skipped, retried, dead_lettered: how many deliveries the
            worker took from the broker, and how many of them it handled, skipped (the
            group had them already), retried later and dead-lettered, since it started.
    """

    def __init__(
        self,
        consumer: Consumer,
        broker: Broker,
        store: Store,
        *,
        name: str | None = None,
        redeliver_after: float = 60.0,
        grace: float = 30.0,
        inbox_retention: timedelta = timedelta(days=7),
    ) -> None:
        if not hasattr(store, "statements") or not hasattr(store.statements, "inbox"):
            raise TypeError(
                f"A worker keeps its inbox and dead letters in a SQL database; {store!r} is "
                f"not one. Pass a SQLStore (SQLite, PostgreSQL or MariaDB)."
            )
        if not consumer.topics:
            raise ValueError(
                f"{consumer!r} has no topic: give it subscribers (consumer.subscribe) or "
                f"topics to dispatch (consumer.dispatch) before starting a worker."
            )
        inbox = cast("InboxStatements", store.statements.inbox)
        if problem := inbox.id_problem(consumer.group, "name"):
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
        self.received = self.handled = self.skipped = self.retried = self.dead_lettered = 0
        self._inbox = inbox
        self._stopping = asyncio.Event()
        self._stop_by: float | None = None  # time.monotonic() by which run() returns
        self._health = StoreHealth(self.name, store, self._stopping, lambda: len(self._tasks))
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_of_key: dict[Hashable, asyncio.Task[None]] = {}
        self._threads: ThreadPoolExecutor | None = None
        self._purged_at: datetime | None = None
        self._check_repository()
        self._check_bindings()
        if not store.is_async:
            self._check_sync_handlers()

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
        if not self.store.is_async:
            self._threads = ThreadPoolExecutor(consumer.in_flight, f"pybondi-{self.name}")
        subscription = self.broker.subscribe(
            consumer.topics,
            consumer.group,
            consumer=self.name,
            in_flight=consumer.in_flight,
            redeliver_after=self.redeliver_after,
        )
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
                    delay = random.uniform(0, min(30.0, 0.2 * 2 ** min(failures, 20)))
                    logger.warning(
                        "Worker %s cannot receive from %r (%s); retrying in %.1f s",
                        self.name, self.broker, _describe(error), delay,
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
            if self._threads is not None:
                self._threads.shutdown(wait=False)

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
        opened: Message[Any] | _Unreadable
        try:
            opened = self._open(delivery)
            key = self._key(opened)
        except _Unreadable as unreadable:
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

    def _open(self, delivery: Delivery) -> Message[Any]:
        """The delivery's message; `_Unreadable` says why it cannot be handled."""
        if delivery.problem is not None:
            raise _Unreadable(delivery.problem)
        binding = self.consumer.bindings.get(delivery.envelope.topic, _UNBOUND)
        envelope = delivery.envelope = _identified(delivery.envelope, binding.id_header)
        if problem := self._inbox.id_problem(envelope.id):
            raise _Unreadable(problem)
        try:
            message = envelope.open(
                self.consumer.registry, payload=binding.payload, timestamp=delivery.timestamp
            )
        except SerializationError as error:
            raise _Unreadable(_describe(error)) from None
        if envelope.topic in self.consumer.dispatched and not isinstance(
            message.payload, Command | Event
        ):
            raise _Unreadable(_not_dispatchable(envelope, message.payload))
        return message

    def _key(self, message: Message[Any]) -> Hashable:
        """The message's key, or None; `_Unreadable` if the key function fails on it."""
        if self.consumer.key is None:
            return None
        try:
            key = self.consumer.key(message)
            hash(key)
        except Exception as error:
            raise _Unreadable(
                f"the consumer's key function failed on it: {_describe(error)}"
            ) from None
        return key

    async def _take(
        self,
        delivery: Delivery,
        opened: Message[Any] | _Unreadable,
        before: asyncio.Task[None] | None,
    ) -> None:
        heartbeat = self._keep(delivery)  # while it waits for its key's turn too
        try:
            if before is not None:
                await asyncio.wait([before])
            await self._settle(delivery, opened)
        finally:
            heartbeat.cancel()

    async def _settle(self, delivery: Delivery, opened: Message[Any] | _Unreadable) -> None:
        """Handle the message and acknowledge it, or retry or dead-letter it."""
        if isinstance(opened, _Unreadable):
            # Not claimed in the inbox: the group never handled it.
            await self._dead_letter(delivery, f"Unreadable message: {opened}", claim=False)
            return
        if delivery.attempt > self.consumer.retry.attempts:
            # Delivered again and again, never failing: the worker handling it dies.
            await self._dead_letter(delivery, _GAVE_UP.format(delivery.attempt - 1))
            return
        with handling(opened):
            try:
                handled = await self._despite_outages(
                    lambda: self._handle_retrying_conflicts(delivery.envelope, opened)
                )
            except _Stopped:
                return  # unacknowledged, it comes back to the group
            except Exception as error:
                await self._failed(delivery, error)
                return
            if not handled:
                await self._skip(delivery, "the group handled it already")
                return
            await self._ack(delivery)
            self.handled += 1
            logger.debug("Handled %r", delivery)

    async def _skip(self, delivery: Delivery, reason: str) -> None:
        self.skipped += 1
        logger.info("Skipped %r: %s", delivery, reason)
        await self._ack(delivery)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as error:  # it comes again, and the inbox skips it
            logger.warning("Worker %s could not acknowledge %r: %r", self.name, delivery, error)

    def _keep(self, delivery: Delivery) -> _Heartbeat:
        """Extend the delivery every third of `redeliver_after`, until cancelled."""
        return _Heartbeat(self._extend, delivery, self.redeliver_after / 3)

    async def _extend(self, delivery: Delivery) -> None:
        try:
            await delivery.extend()
        except Exception as error:  # at worst, another worker gets it: the inbox copes
            logger.warning("Worker %s could not extend %r: %r", self.name, delivery, error)

    async def _handle_retrying_conflicts(self, envelope: Envelope, message: Message[Any]) -> bool:
        """`_handle`, again in a new session when another one changed the same aggregate.

        Two messages about one aggregate, handled at once, conflict: one commits, the
        other gets a `ConcurrencyError`. That is no fault of the message, so it does not
        count as an attempt; it is handled again at once, after a short random pause.
        """
        for conflicts in itertools.count():
            try:
                return await self._handle(envelope, message)
            except ConcurrencyError:
                if conflicts >= _CONFLICTS:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * 2**conflicts))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _failed(self, delivery: Delivery, error: Exception) -> None:
        """Retry the message later, or dead-letter it after its last attempt."""
        retry = self.consumer.retry
        if delivery.attempt >= retry.attempts:
            await self._dead_letter(delivery, _report(error))
            return
        delay = retry.backoff(delivery.attempt)
        logger.warning(
            "Attempt %d of %d failed for %r: %s; retrying in %.1f s",
            delivery.attempt, retry.attempts, delivery, _describe(error), delay,
            exc_info=not isinstance(error, PybondiError),
        )  # fmt: skip
        try:
            await delivery.retry(delay)
            self.retried += 1
        except Exception as failure:  # unacknowledged, it comes back anyway
            logger.error("Worker %s could not retry %r later: %r", self.name, delivery, failure)

    async def _dead_letter(self, delivery: Delivery, error: str, *, claim: bool = True) -> None:
        """Keep the message in the dead letters with why, then acknowledge it.

        With `claim` (a readable message that failed), its inbox row goes with it; see
        `InboxRecords.dead_letter`.
        """
        group, envelope, attempts = self.consumer.group, delivery.envelope, delivery.attempt

        def dead_letter(records: SQLRecords) -> int | None:
            return records.dead_letter(group, envelope, error, attempts, claim=claim)

        try:
            letter = await self._despite_outages(lambda: self._transact(dead_letter))
        except _Stopped:
            return  # unacknowledged, it comes back to the group
        except Exception as failure:  # a bug, not an outage: it would fail every time
            logger.error(
                "Worker %s could not dead-letter %r, and acknowledges it: the message is "
                "lost but for this line. Why it was given up: %s. Its headers: %s; its "
                "body: %s. Dead-lettering failed with:",
                self.name, delivery, error.splitlines()[0], envelope.headers,
                short_repr(envelope.body, _LOGGED_BODY),
                exc_info=failure,
            )  # fmt: skip
            await self._ack(delivery)
            return
        if letter is None:  # a copy was handled, or dead-lettered, meanwhile
            await self._skip(delivery, "the group handled it, or dead-lettered it, already")
            return
        self.dead_lettered += 1
        logger.error(
            "Dead letter %d: %r after %d attempt(s): %s",
            letter, delivery, attempts, error.splitlines()[0],
        )  # fmt: skip
        await self._ack(delivery)

    async def _despite_outages(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work()`, done again once the store answers if it failed for want of it.

        A failure because the store is out of reach counts for nothing: the message
        waits (`pybondi._storehealth`). Any other error is raised; `_Stopped` if the
        worker stops while waiting.
        """
        while True:
            try:
                return await work()
            except Exception as error:
                if not await self._health.confirm(error):
                    raise
                if not await self._health.wait():
                    raise _Stopped from error

    # The session ------------------------------------------------------------------------

    async def _handle(self, envelope: Envelope, message: Message[Any]) -> bool:
        """Handle the message in a session; False if the inbox had it already."""
        if self._threads is not None:
            context = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._threads, context.run, self._handle_sync, envelope, message
            )
        session = self._session(envelope)
        token = _session.set(session)
        timeout = self.consumer.timeout
        try:
            async with asyncio.timeout(timeout), session:
                transaction = cast(StoreRepository[Any], session.repository).transaction
                assert transaction is not None
                if await transaction.arun(self._is_handled(envelope)):
                    raise _Duplicate
                await self._adeliver(envelope.topic, message, session)
        except _Duplicate:
            return False
        except TimeoutError as error:
            if timeout is None or str(error):
                raise
            raise TimeoutError(
                f"Handling took more than the consumer's timeout, {timeout:g} s: the session "
                f"was cancelled and rolled back."
            ) from None
        finally:
            _session.reset(token)
        return True

    def _handle_sync(self, envelope: Envelope, message: Message[Any]) -> bool:
        """`_handle` for a sync store, in a thread of the worker's pool."""
        session = self._session(envelope)
        token = _session.set(session)
        try:
            with session:
                transaction = cast(StoreRepository[Any], session.repository).transaction
                assert transaction is not None
                if transaction.run(self._is_handled(envelope)):
                    raise _Duplicate
                self._deliver(envelope.topic, message, session)
        except _Duplicate:
            return False
        finally:
            _session.reset(token)
        return True

    def _is_handled(self, envelope: Envelope) -> Callable[[Records], bool]:
        group, message_id = self.consumer.group, envelope.id
        return lambda records: cast("SQLRecords", records).is_handled(group, message_id)

    async def _adeliver(self, topic: str, message: Message[Any], session: Session) -> None:
        if topic in self.consumer.dispatched:
            await session.adispatch(message.payload)
            return
        invokers, _ = self.consumer.aroutes(topic)
        for invoke, awaited in invokers:
            result = invoke(message)
            if awaited:
                await result

    def _deliver(self, topic: str, message: Message[Any], session: Session) -> None:
        if topic in self.consumer.dispatched:
            session.dispatch(message.payload)
            return
        invokers, _ = self.consumer.routes(topic)
        for invoke in invokers:
            invoke(message)

    def _session(self, envelope: Envelope) -> Session:
        consumer = self.consumer
        repository = consumer.repository(self.store) if consumer.repository else None
        repository = repository or _NoAggregates(self.store)
        publisher = _Inbound(self.store, consumer.registry, consumer.group, envelope)
        return Session(consumer.messagebus, repository, publisher)

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
        if not isinstance(repository, StoreRepository) or repository.storage is not self.store:
            raise TypeError(
                f"The consumer's repository(store) gave {repository!r}: the inbox must commit "
                f"in the repository's transaction, so it must be a store repository on the "
                f"store it is given, as in `repository=lambda store: StateRepository(store, "
                f"Account, registry)`."
            )

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
        if late and self._threads is not None:
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
            purged = await self._transact(lambda records: records.purge_inbox(cutoff))
        except Exception as error:
            logger.warning("Worker %s could not purge the inbox: %r", self.name, error)
            return
        if purged:
            logger.info("Worker %s forgot %d inbox id(s) past retention", self.name, purged)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _transact(self, work: Callable[[SQLRecords], T]) -> T:
        """Run `work` in a transaction of its own on the store, and commit."""
        return await self.store.atransact(cast(Callable[[Records], T], work))


class _Heartbeat:
    """Calls `extend(delivery)` every `interval` seconds until cancelled.

    A timer rather than a task: most messages are done long before the first beat.
    """

    __slots__ = ("_beats", "_delivery", "_extend", "_interval", "_timer")

    def __init__(
        self,
        extend: Callable[[Delivery], Awaitable[None]],
        delivery: Delivery,
        interval: float,
    ) -> None:
        self._extend, self._delivery, self._interval = extend, delivery, interval
        self._beats: set[asyncio.Task[None]] = set()  # referenced until done
        self._timer = asyncio.get_running_loop().call_later(interval, self._beat)

    def _beat(self) -> None:
        beat = asyncio.ensure_future(self._extend(self._delivery))
        self._beats.add(beat)
        beat.add_done_callback(self._beats.discard)
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._beat)

    def cancel(self) -> None:
        """Stop beating."""
        self._timer.cancel()


class _Duplicate(Exception):
    """The inbox has the message already: roll back, acknowledge, skip."""


class _Stopped(Exception):
    """The worker stopped while a message waited for the store: leave it unacknowledged."""


_UNBOUND = Binding()


def _identified(envelope: Envelope, id_header: str | None) -> Envelope:
    """The envelope under the id its producer keeps in `id_header`, if it sent one."""
    id = envelope.headers.get(id_header) if id_header else None
    if not id or id == envelope.id:
        return envelope
    return Envelope(envelope.topic, id, envelope.headers, envelope.body)


def _not_dispatchable(envelope: Envelope, payload: object) -> str:
    if "message-type" in envelope.headers:
        carries = f"this message carries {short_repr(payload)}"
    else:
        carries = (
            f"this message has no message-type header, so its body is plain JSON "
            f"({short_repr(payload)}): bind the topic to a type, as in "
            f"consumer.dispatch({envelope.topic!r}, payload=YourCommand), or have its "
            f"producer send message-type"
        )
    return (
        f"{envelope.topic!r} is dispatched to the messagebus, which takes commands and "
        f"events, but {carries}"
    )


class _Unreadable(Exception):
    """Why a delivered message cannot be handled: it goes to the dead letters at once."""


class _NoAggregates(StoreRepository[Any]):
    """The session's transaction on the store, for consumers without a repository."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, object, cast(Any, None), name="-")

    def _load(self, records: Records, id: Any) -> None:
        return None

    def _save_aggregate(
        self, records: Records, aggregate: Any, events: list[StoredEvent], expected: int
    ) -> None:
        return None


class _Inbound(Outbox):
    """The session's outbox, which also records the message in the inbox at commit."""

    def __init__(self, store: Store, registry: Any, group: str, envelope: Envelope) -> None:
        super().__init__(store, registry)
        self.group, self.envelope = group, envelope

    def prepare(self) -> None:
        """Record the message in the inbox, and write the outbox rows, in the transaction."""
        buffer = self._buffer()
        buffer.joined.run(self._record(list(buffer)))
        buffer.clear()

    async def aprepare(self) -> None:
        """`prepare` for the async path."""
        buffer = self._buffer()
        await buffer.joined.arun(self._record(list(buffer)))
        buffer.clear()

    def _record(self, buffer: list[tuple[str, Envelope]]) -> Callable[[Records], None]:
        group, envelope, enqueue = self.group, self.envelope, _enqueue(buffer)

        def record(records: Records) -> None:
            # Another worker may hold the same message (redelivered while this one was
            # slow): the insert waits for its transaction, and finds the id if it commits.
            if not cast("SQLRecords", records).record_handled(group, envelope):
                raise _Duplicate
            enqueue(records)

        return record


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _report(error: BaseException) -> str:
    """The error for a dead letter: what it says, then where it was raised."""
    trace = "".join(traceback.format_exception(error, limit=-8))
    return f"{_describe(error)}\n\n{trace}"
