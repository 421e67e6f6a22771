"""Settling a delivery: acknowledged once handled, or retried later, or dead-lettered.

- A message that cannot be read goes to the dead letters at once, without an inbox row.
- One delivered more often than its attempts without ever failing (its worker died each
  time) goes there without a handler running, with its inbox row.
- A handled one is acknowledged; one the group had already is acknowledged and skipped.
- A failure is retried through the broker after `consumer.retry`'s backoff, until its
  last attempt, which goes to the dead letters with the error, and its inbox row.
- A failure because the store is out of reach is none of these: the message waits for
  the store (`storehealth`), and runs again, the same attempt, once it answers.

While a message is under way, a heartbeat tells the broker so every third of
`redeliver_after`, so that no other worker takes it over.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pybondi.exceptions import PybondiError, short_repr
from pybondi.messaging.brokers.base import Delivery
from pybondi.messaging.consumer import Consumer
from pybondi.messaging.worker.reading import Unreadable, describe
from pybondi.messaging.worker.sessions import Sessions
from pybondi.messaging.worker.storehealth import StoreHealth
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.store import MessagingStore
from pybondi.publisher import Message
from pybondi.tracing import handling

__all__ = ["Heartbeat", "Settler"]

logger = logging.getLogger("pybondi.messaging.worker")

T = TypeVar("T")

_GAVE_UP = (
    "Gave up after {} deliveries that ended neither in a commit nor in an error: the "
    "worker handling it stopped or died each time (a crash, a kill, an exhausted memory)"
)
_LOGGED_BODY = 2000  # characters of a message's body a log line shows, at most


class Settler:
    """Settles each delivery of one worker; see the module docstring.

    Attributes:
        handled, skipped, retried, dead_lettered: how many deliveries it handled, skipped
            (the group had them already), retried later and dead-lettered.
    """

    def __init__(
        self,
        name: str,
        consumer: Consumer,
        store: MessagingStore,
        sessions: Sessions,
        health: StoreHealth,
    ) -> None:
        self.name = name
        self.consumer = consumer
        self.store = store
        self.sessions = sessions
        self.health = health
        self.handled = self.skipped = self.retried = self.dead_lettered = 0

    async def settle(self, delivery: Delivery, opened: Message[Any] | Unreadable) -> None:
        """Handle the message and acknowledge it, or retry or dead-letter it."""
        if isinstance(opened, Unreadable):
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
                    lambda: self.sessions.handle(delivery.envelope, opened)
                )
            except _Stopped:
                return  # unacknowledged, it comes back to the group
            except Exception as error:
                await self._failed(delivery, error)
                return
            await self.committed(delivery, handled)

    async def committed(self, delivery: Delivery, handled: bool) -> None:
        """Acknowledge a message whose transaction committed; skipped if not `handled`."""
        if not handled:
            await self._skip(delivery, "the group handled it already")
            return
        await self._ack(delivery)
        self.handled += 1
        logger.debug("Handled %r", delivery)

    async def _failed(self, delivery: Delivery, error: Exception) -> None:
        """Retry the message later, or dead-letter it after its last attempt."""
        retry = self.consumer.retry
        if delivery.attempt >= retry.attempts:
            await self._dead_letter(delivery, _report(error))
            return
        delay = retry.backoff(delivery.attempt)
        logger.warning(
            "Attempt %d of %d failed for %r: %s; retrying in %.1f s",
            delivery.attempt, retry.attempts, delivery, describe(error), delay,
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
        `DeadLetterRecords.add`.
        """
        group, envelope, attempts = self.consumer.group, delivery.envelope, delivery.attempt

        def add(records: MessagingRecords) -> int | None:
            return records.dead_letters.add(group, envelope, error, attempts, claim=claim)

        try:
            letter = await self._despite_outages(lambda: self.store.atransact(add))
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
        waits (`storehealth`). Any other error is raised; `_Stopped` if the worker stops
        while waiting.
        """
        while True:
            try:
                return await work()
            except Exception as error:
                if not await self.health.confirm(error):
                    raise
                if not await self.health.wait():
                    raise _Stopped from error

    async def _skip(self, delivery: Delivery, reason: str) -> None:
        self.skipped += 1
        logger.info("Skipped %r: %s", delivery, reason)
        await self._ack(delivery)

    async def _ack(self, delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except Exception as error:  # it comes again, and the inbox skips it
            logger.warning("Worker %s could not acknowledge %r: %r", self.name, delivery, error)

    async def extend(self, delivery: Delivery) -> None:
        """Tell the broker the message is still under way; a failure is only logged."""
        try:
            await delivery.extend()
        except Exception as error:  # at worst, another worker gets it: the inbox copes
            logger.warning("Worker %s could not extend %r: %r", self.name, delivery, error)


class Heartbeat:
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


class _Stopped(Exception):
    """The worker stopped while a message waited for the store: leave it unacknowledged."""


def _report(error: BaseException) -> str:
    """The error for a dead letter: what it says, then where it was raised."""
    trace = "".join(traceback.format_exception(error, limit=-8))
    return f"{describe(error)}\n\n{trace}"
