"""The relay: sends the outbox's committed rows to a broker, and marks them sent.

    relay = Relay(SQLStore("postgresql://localhost/bank", asynchronous=True),
                  connect("amqp://guest:guest@localhost/"))
    await relay.run()           # until relay.stop(), or SIGTERM under `pybondi relay`

Each round, the relay lists the topics with unsent rows and, topic by topic, takes the
topic's lease, reads the next rows in `seq` order, sends them as one batch, and once the
broker confirmed them, moves the topic's cursor past them; up to ten batches per topic,
so that a backlog on one topic does not keep the others waiting. So messages reach the broker
in commit order per topic, and a row is marked sent only after the broker took it; when
the broker confirms only the first part of a batch, that part is marked sent.

Several relays may run at once, on one machine or many: a topic's lease lets one of them
send its rows at a time, so the normal case sends no row twice. The lease is renewed
while a batch is sending, however long the broker takes. A relay that stops without
giving its leases back (killed, or cut off) holds them until they expire, after `lease`
seconds; another relay then takes over from the last confirmed row. Anything sent but
not yet confirmed when a relay dies is sent again: delivery is at least once. Leases
compare the relays' clocks, which must agree to well within `lease` seconds.

A topic whose batch the broker does not confirm waits, with exponential backoff and full
jitter (up to `max_backoff` seconds), while the other topics go on: a message the broker
refuses for good holds back its own topic only, and the log names it. While the database
is unreachable, the whole relay backs off the same way, and catches up afterwards. Any
other error (a bug, a wrong option) would fail every time: it ends `run`.

`stop()` lets the round under way finish, then the relay gives its leases back and
closes the broker: all within `grace` seconds (at least one, for the leases), after
which `run` returns whatever is still under way. What was being sent is sent again
later. Rows sent more than `retention` ago are
deleted, by whichever relay gets there first, and so are the head and cursor rows of
a topic whose rows are all gone. Batches hold up to `batch_size` rows,
whatever their size: keep messages small (a reference to a large document, not the
document), as every broker limits them anyway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from pybondi._stopping import Stopping
from pybondi.exceptions import PublishError
from pybondi.messaging.backoff import backoff
from pybondi.messaging.brokers.base import Broker
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import MessagingRecords, OutboxRecords
from pybondi.persistence.store import MessagingStore

__all__ = ["Relay"]

logger = logging.getLogger("pybondi.messaging.relay")

T = TypeVar("T")


class Relay:
    """Sends an outbox's rows to a broker; see the module docstring.

    Args:
        store: the `SQLStore` the outbox writes to, sync or async.
        broker: where to send (`pybondi.messaging.brokers.connect(url)`).
        batch_size: how many rows of a topic go in one confirmed batch.
        idle: seconds to wait before looking again when nothing was pending.
        lease: seconds a relay keeps a topic after its last batch, before another relay
            may take it over.
        retention: how long sent rows are kept.
        max_backoff: the longest wait between retries while something is unreachable.
        grace: seconds within which `run` returns after `stop()` (at least 1): the round
            under way gets most of it, giving the leases back and closing the rest
            (what it was sending is sent again later).
        name: this relay's name in the lease table (host, process and a random part).
    """

    def __init__(
        self,
        store: MessagingStore,
        broker: Broker,
        *,
        batch_size: int = 100,
        idle: float = 0.2,
        lease: float = 30.0,
        retention: timedelta = timedelta(days=1),
        max_backoff: float = 30.0,
        grace: float = 10.0,
        name: str | None = None,
    ) -> None:
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"The relay reads the outbox of a store; {store!r} keeps no outbox. Pass the "
                f"SQLStore (or MemoryStore) the sessions' Outbox writes to."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if lease <= 0 or retention < timedelta(0):
            raise ValueError(
                f"lease must be above 0 seconds and retention at least 0; got lease={lease}, "
                f"retention={retention}."
            )
        self.store = store
        self.broker = broker
        self.batch_size = batch_size
        self.idle = idle
        self.lease = timedelta(seconds=lease)
        self.retention = retention
        self.max_backoff = max_backoff
        self.grace = grace
        self.name = name or f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"[-64:]
        self.sent = 0  # messages this relay has had confirmed
        self._stopping = Stopping()
        self._purged_at: datetime | None = None
        self._held: dict[str, tuple[int, float]] = {}  # topic -> (failures, retry at)
        # What may pass: the broker or the database out of reach, or busy. Anything else
        # (a bug, a wrong option) would fail every time: it ends `run` instead.
        self._transient = (PublishError, OSError, TimeoutError)

    def __repr__(self) -> str:
        return f"<Relay {self.name} from {self.store!r} to {self.broker!r}>"

    def stop(self) -> None:
        """Ask `run` to return within `grace` seconds: the batch under way first, if it can."""
        self._stopping.stop(self.grace)

    async def run(self) -> None:
        """Relay until `stop()`; then give the leases back and close the broker."""
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    sent = await self._round()
                    failures = 0
                except Exception as error:
                    if not self._passing(error):
                        raise
                    failures += 1
                    delay = self._backoff(failures)
                    logger.warning(
                        "Relay %s: %s: %s; retrying in %.2f s (attempt %d)",
                        self.name, type(error).__name__, error, delay, failures,
                    )  # fmt: skip
                    await self._stopping.pause(delay)
                    continue
                if not sent:
                    await self._stopping.pause(self.idle)
        finally:
            if not self._stopping.is_set():  # an error ends the run: the same budget
                self.stop()
            await self._shutdown()
            self._stopping.clear()  # so that run() may be called again

    async def _round(self) -> int:
        """`run_once`, left to finish within the stop's budget once `stop()` is called."""

        def overrun() -> None:
            logger.warning(
                "Relay %s stops without waiting longer for the batch under way (grace %.1f s): "
                "the broker may have some of it, and it will be sent again",
                self.name, self.grace,
            )  # fmt: skip

        sent = await self._stopping.within_grace(self.run_once(), overrun)
        return sent or 0

    async def run_once(self) -> int:
        """Send what is pending now, topic by topic; return how many messages were sent.

        A topic whose batch the broker did not confirm waits, with backoff, while the
        other topics go on: a message the broker refuses holds back only its own topic.
        """
        topics: list[str] = await self._outbox(lambda outbox: outbox.pending_topics())
        clock = asyncio.get_running_loop().time()
        topics = [topic for topic in topics if self._held.get(topic, (0, 0.0))[1] <= clock]
        random.shuffle(topics)  # relays starting together try the topics in other orders
        sent = failed_in_a_row = 0
        for topic in topics:
            try:
                sent += await self._relay_topic(topic)
            except _Held as held:
                sent += held.sent
                self._hold(held)
                # Another relay, maybe with a broker it can reach, may take the topic now.
                await self._outbox(partial(_release, self.name, topic))
                failed_in_a_row += 1
                if failed_in_a_row == _BROKER_DOWN_AFTER:
                    raise held.error from None  # the broker, not a message: `run` backs off
                continue
            failed_in_a_row = 0
            self._held.pop(topic, None)
            if self._stopping.is_set():
                break
        await self._purge()
        return sent

    async def _relay_topic(self, topic: str) -> int:
        """Send a few batches of the topic's rows, while this relay holds its lease.

        A few, not all: a topic with a backlog gives way to the others, and the next
        round goes on with it.
        """
        sent = 0
        for _ in range(_BATCHES_PER_VISIT):
            if self._stopping.is_set():
                break
            claimed = await self._outbox(partial(self._claim, topic, _now()))
            if claimed is None:
                return sent  # another relay has it
            after, envelopes = claimed
            if not envelopes:
                return sent
            try:
                await self._send(topic, envelopes)
            except PublishError as error:
                # What the broker confirmed before the failure is not sent again.
                done = len(envelopes) - len(error.unconfirmed)
                if done > 0 and await self._confirm(topic, after, after + done):
                    sent += done
                raise _Held(topic, after + max(done, 0) + 1, error, sent) from error
            if not await self._confirm(topic, after, after + len(envelopes)):
                return sent
            sent += len(envelopes)
            if len(envelopes) < self.batch_size:
                return sent
        return sent

    async def _send(self, topic: str, envelopes: list[Envelope]) -> None:
        """Send a batch, renewing the topic's lease for as long as the broker takes."""
        renewing = asyncio.ensure_future(self._keep_lease(topic))
        try:
            await self.broker.asend(envelopes)
        finally:
            # Not awaited: awaiting it here would swallow a cancellation of this task.
            renewing.cancel()

    async def _keep_lease(self, topic: str) -> None:
        period = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            until = _now() + self.lease
            try:
                kept = await self._outbox(partial(_renew, topic, self.name, until))
            except Exception as error:
                if not self._passing(error):
                    raise
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # cancelled mid-query, which some drivers report as an error
                logger.warning(
                    "Relay %s could not renew its lease on %r: %s", self.name, topic, error
                )
                continue
            if not kept:
                return  # lost: _confirm finds out and says so

    async def _confirm(self, topic: str, after: int, last: int) -> bool:
        """Mark rows `after`+1..`last` sent; False (and a warning) if the lease was lost."""
        now = _now()
        confirmed: bool = await self._outbox(
            lambda outbox: outbox.confirm(
                topic, self.name, after=after, last=last, now=now, until=now + self.lease
            )
        )
        if confirmed:
            self.sent += last - after
        else:
            logger.warning(
                "Relay %s lost the lease on %r while sending; another relay resends seq %d..%d",
                self.name, topic, after + 1, last,
            )  # fmt: skip
        return confirmed

    def _hold(self, held: _Held) -> None:
        """Make a topic wait before its next try, and say why."""
        # A batch partly confirmed is progress (a broker pushing back): start over.
        failures = 1 if held.sent else self._held.get(held.topic, (0, 0.0))[0] + 1
        delay = self._backoff(failures)
        self._held[held.topic] = (failures, asyncio.get_running_loop().time() + delay)
        error = held.error
        log = (
            logger.warning if failures in (1, _STUCK_AFTER) or failures % 10 == 0 else logger.debug
        )
        log(
            "Relay %s: topic %r waits at seq %d: %s did not confirm message %s: %s; "
            "retrying in %.2f s (attempt %d)%s",
            self.name, held.topic, held.seq, error.broker,
            error.unconfirmed[0].id if error.unconfirmed else "?", error.reason, delay,
            failures, _STUCK if failures == _STUCK_AFTER else "",
        )  # fmt: skip

    async def _purge(self) -> None:
        """Delete rows sent longer ago than the retention, about once a minute."""
        now = _now()
        if self._purged_at is not None and now - self._purged_at < timedelta(minutes=1):
            return
        self._purged_at = now
        cutoff = now - self.retention
        purged = await self._outbox(lambda outbox: outbox.purge(cutoff))
        if purged:
            logger.info("Relay %s deleted %d sent row(s) past retention", self.name, purged)
        forgotten = await self._outbox(lambda outbox: outbox.forget_idle_topics(now))
        if forgotten:
            logger.info("Relay %s forgot %d idle topic(s)", self.name, forgotten)

    async def _shutdown(self) -> None:
        """Give the leases back and close the broker, within what is left of the budget."""
        try:
            async with asyncio.timeout(self._stopping.left() / 2):
                await self._outbox(lambda outbox: outbox.release(self.name))
        except Exception as error:  # the leases expire on their own
            logger.warning("Relay %s could not give its leases back: %r", self.name, error)
        try:
            async with asyncio.timeout(self._stopping.left()):
                await self.broker.aclose()
        except TimeoutError:
            logger.warning("Relay %s could not close %r within its grace", self.name, self.broker)

    def _backoff(self, failures: int) -> float:
        """Up to 0.1 s, 0.2 s, 0.4 s... max_backoff, with jitter."""
        return backoff(failures, first=0.1, longest=self.max_backoff, jitter=True)

    def _claim(
        self, topic: str, now: datetime, outbox: OutboxRecords
    ) -> tuple[int, list[Envelope]] | None:
        return outbox.claim(
            topic, self.name, now=now, until=now + self.lease, limit=self.batch_size
        )

    def _passing(self, error: Exception) -> bool:
        """Whether the error may pass: the broker or the store out of reach, or busy."""
        return isinstance(error, self._transient) or self.store.unreachable(error)

    async def _outbox(self, work: Callable[[OutboxRecords], T]) -> T:
        """Run `work` on the outbox in a transaction of its own, and commit."""

        def on_outbox(records: MessagingRecords) -> T:
            return work(records.outbox)

        return await self.store.atransact(on_outbox)


_BATCHES_PER_VISIT = 10
_STUCK_AFTER = 5
# Topics failing one after the other in a round: the broker is likely down, not a message.
_BROKER_DOWN_AFTER = 3
_STUCK = (
    ". The topic's later messages wait behind it, to keep their order: if the broker "
    "refuses it for good, fix what it says (a missing stream or queue, a size limit)"
)


class _Held(Exception):
    """A topic's batch the broker did not confirm from `seq` on, after `sent` messages."""

    def __init__(self, topic: str, seq: int, error: PublishError, sent: int) -> None:
        super().__init__(topic, seq)
        self.topic, self.seq, self.error, self.sent = topic, seq, error, sent


def _now() -> datetime:
    return datetime.now(UTC)


def _release(owner: str, topic: str, outbox: OutboxRecords) -> None:
    outbox.release(owner, topic)


def _renew(topic: str, owner: str, until: datetime, outbox: OutboxRecords) -> bool:
    return outbox.renew(topic, owner, until=until)
