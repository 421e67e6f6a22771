"""Whether a worker's store answers, and waiting for it while it does not.

A session that fails because the database is out of reach says nothing about its
message: it would fail the same way for every message, and retrying it later, or
dead-lettering it, would spend its attempts and write false reasons. So when a session
(or a dead letter) fails with an error that may mean the database is unreachable, the
worker asks `StoreHealth.confirm`: a trivial transaction (`SELECT 1`) decides. If that
fails too, the store is down: the worker takes no new messages, and those under way
wait (`StoreHealth.wait`) without counting an attempt, their heartbeats going on. While
down, the store is probed every second; the first answer ends the outage, and the
messages waiting are handled again at once.

What may mean "unreachable": SQLAlchemy's `DBAPIError` whose connection was invalidated,
its `OperationalError` and `InterfaceError` (the driver lost or could not make the
connection), its pool's `TimeoutError`, and any `OSError` or `TimeoutError` (a socket,
a connect that hangs), anywhere in the error's chain of causes. Each needs the probe to
fail too: a handler's own network error, or a deadlock (an `OperationalError` on
PostgreSQL), leaves the probe answering, and counts as the failed attempt it is.

The log says it once per change: "store unreachable: ..." and "store reachable again
after N s", plus one line a minute while it lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pybondi.persistence.records import Records
    from pybondi.persistence.store import Store

__all__ = ["StoreHealth"]

logger = logging.getLogger("pybondi.messaging.worker")

_PROBE_EVERY = 1.0  # seconds between probes while the store is down
_PROBE_WITHIN = 5.0  # seconds a probe may take: a connect to a silent host can hang
_SUMMARY_EVERY = 60.0  # seconds between the log lines of an outage that goes on


class StoreHealth:
    """Tracks whether a store answers; see the module docstring.

    Args:
        name: the worker's name, for the log.
        store: the store to probe.
        stopping: set when the worker stops; waits end then.
        under_way: how many messages the worker holds, for the log.
    """

    def __init__(
        self,
        name: str,
        store: Store[Records],
        stopping: asyncio.Event,
        under_way: Callable[[], int],
    ) -> None:
        self.name = name
        self.store = store
        self._stopping = stopping
        self._under_way = under_way
        self._up = asyncio.Event()
        self._up.set()
        self._checking: asyncio.Future[BaseException | None] | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        """False from a confirmed failure until a probe succeeds again."""
        return self._up.is_set()

    async def confirm(self, error: BaseException) -> bool:
        """Whether `error` is the store being out of reach; if so, the outage begins.

        True at once while the store is known to be down. Otherwise only an error that
        may mean unreachable is checked, by a probe shared by every caller at the time.
        """
        if not self.reachable:
            return True
        if not self._looks_unreachable(error):
            return False
        checking = self._checking
        if checking is None or checking.done():
            checking = self._checking = asyncio.ensure_future(self._probe())
        failure = await asyncio.shield(checking)
        if failure is None or not self._looks_unreachable(failure):
            return False
        self._down(failure)
        return True

    async def wait(self) -> bool:
        """Wait until the store answers (True) or the worker stops (False)."""
        if self.reachable or self._stopping.is_set():
            return self.reachable
        up = asyncio.ensure_future(self._up.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((up, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            stopping.cancel()
        return self.reachable

    async def close(self) -> None:
        """Stop probing."""
        for task in (self._watching, self._checking):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _down(self, error: BaseException) -> None:
        if not self.reachable:
            return
        self._up.clear()
        logger.warning(
            "Worker %s: store unreachable: %s; the %d message(s) under way wait for it "
            "(no attempt counted), and no new ones are taken until it answers",
            self.name, _summary(error), self._under_way(),
        )  # fmt: skip
        self._watching = asyncio.ensure_future(self._watch(error))

    async def _watch(self, error: BaseException) -> None:
        """Probe every second until the store answers, then end the outage."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        summary = started + _SUMMARY_EVERY
        while True:
            await asyncio.sleep(_PROBE_EVERY)
            if self._stopping.is_set():
                return  # the worker closes: nothing waits any more
            failure = await self._probe()
            if failure is None or not self._looks_unreachable(failure):
                break
            error = failure
            if loop.time() >= summary:
                summary += _SUMMARY_EVERY
                logger.warning(
                    "Worker %s: store still unreachable after %.0f s (%d message(s) "
                    "waiting): %s",
                    self.name, loop.time() - started, self._under_way(), _summary(error),
                )  # fmt: skip
        logger.warning(
            "Worker %s: store reachable again after %.1f s", self.name, loop.time() - started
        )
        self._up.set()

    async def _probe(self) -> BaseException | None:
        """Run a trivial transaction: None if it committed, else its error."""
        try:
            async with asyncio.timeout(_PROBE_WITHIN):
                await self.store.atransact(_ping)
        except Exception as error:
            return error
        return None

    def _looks_unreachable(self, error: BaseException) -> bool:
        return self.store.unreachable(error)


def _ping(records: Records) -> None:
    records.ping()


def _summary(error: BaseException) -> str:
    """The error's type and first line: SQLAlchemy's add the statement and a link."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
