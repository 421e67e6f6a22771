"""The projection runner: follows a store's log from the projection's checkpoint.

    runner = ProjectionRunner(projection, store)
    runner.catch_up()              # sync: every event up to the log's head, then return
    await runner.acatch_up()       # the same on the event loop
    await runner.run()             # until runner.stop(), or SIGTERM under `pybondi project`

A batch is one transaction: read up to `batch_size` events after the checkpoint, move
the checkpoint past them (only while this runner holds the lease, and only from where it
was), then dispatch the handled ones, decoded, in a `Session` over that transaction, and
commit. See `pybondi.projection` for the guarantees. The sync driver (`run_once`,
`catch_up`, `rebuild`) and the async one (`arun_once`, `acatch_up`, `arebuild`) sit side
by side and differ only in calling or awaiting; every decision is `Progress`'s. `run` is
the service loop on top: it waits for the lease, retries, logs the lag, and stops within
its grace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from pybondi._stopping import Stopping
from pybondi.exceptions import ProjectionFailed, ProjectionHeld
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.store import MessagingStore, Transaction
from pybondi.projection.base import Projection, ProjectionReset, current, restore
from pybondi.projection.progress import Batch, Progress
from pybondi.repository import Repository
from pybondi.session import Session

__all__ = ["ProjectionRunner"]

logger = logging.getLogger("pybondi.projection")

T = TypeVar("T")


class ProjectionRunner:
    """Runs one projection on one store, from its checkpoint; see the module docstring.

    Args:
        projection: the `Projection` to run.
        store: the store whose log it follows, and where its checkpoint and (through the
            handlers' session) its view are kept: a `SQLStore`, sync or async, or a
            `MemoryStore`.
        batch_size: how many events of the log one transaction reads and handles.
        lease: seconds this runner keeps the projection after its last batch before
            another runner may take it over.
        idle: seconds to wait before looking at the log again once caught up.
        attempts: failures in a row on one event after which the projection stops
            (`ProjectionFailed`); it never skips an event.
        max_backoff: the longest wait between retries.
        report_every: seconds between the lag's log lines while behind.
        grace: seconds within which `run` returns after `stop()` (at least 1).
        name: this runner's name in the lease (host, process and a random part).
    """

    def __init__(
        self,
        projection: Projection,
        store: MessagingStore,
        *,
        batch_size: int = 100,
        lease: float = 30.0,
        idle: float = 0.2,
        attempts: int = 5,
        max_backoff: float = 30.0,
        report_every: float = 10.0,
        grace: float = 10.0,
        name: str | None = None,
    ) -> None:
        if not isinstance(projection, Projection):
            raise TypeError(
                f"ProjectionRunner() runs a pybondi.projection.Projection, got "
                f"{type(projection).__name__}."
            )
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"A projection keeps its checkpoint in a store with the messaging records; "
                f"{store!r} has none. Pass the SQLStore (or MemoryStore) whose log it follows."
            )
        if batch_size < 1 or attempts < 1 or lease <= 0:
            raise ValueError(
                f"batch_size and attempts must be at least 1 and lease above 0 seconds; got "
                f"batch_size={batch_size}, attempts={attempts}, lease={lease}."
            )
        self.grace, self.idle, self.report_every = grace, idle, report_every
        self.projection = projection
        self.store = store
        self.name = name or f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"[-64:]
        self.progress = Progress(
            projection.name,
            batch_size=batch_size,
            attempts=attempts,
            lease=lease,
            max_backoff=max_backoff,
        )
        factory = projection.repository
        self._repository: Repository[Any] | None = None if factory is None else factory(store)
        self.handled = 0  # events this runner's handlers committed
        self.lag: int | None = None  # behind the log's head, when last reported
        self.retry_in = 0.0  # seconds to wait after the last failure
        self._stopping = Stopping()

    def __repr__(self) -> str:
        return f"<ProjectionRunner {self.projection.name} as {self.name} on {self.store!r}>"

    @property
    def position(self) -> int | None:
        """The checkpoint, as this runner knows it while it holds the lease."""
        return self.progress.position

    @property
    def reached(self) -> int | None:
        """The last checkpoint this runner knew, also once it let the lease go."""
        return self.progress.reached

    # The work on the records, written once ----------------------------------------------

    def _claim(self, now: datetime, records: MessagingRecords) -> int | None:
        until = self.progress.until(now)
        return records.projections.claim(self.projection.name, self.name, now=now, until=until)

    def _prepare(self, now: datetime, records: MessagingRecords) -> Batch | None:
        """Read the next events and move the checkpoint past them; None if it was lost."""
        progress, projection = self.progress, self.projection
        assert progress.position is not None  # claimed first
        progress.asked = progress.limit()
        read = records.read_log(progress.position, progress.asked)
        progress.reading = read
        if not read:
            return Batch()
        moved = records.projections.advance(
            projection.name,
            self.name,
            after=progress.position,
            to=read[-1].position,
            until=progress.until(now),
        )
        if not moved:
            return None
        handles = projection.handles
        return Batch(
            read, [(stored, projection.decode(stored)) for stored in read if handles(stored.type)]
        )

    def _reset(self, records: MessagingRecords) -> bool:
        return records.projections.reset(self.projection.name, self.name)

    def _release(self, records: MessagingRecords) -> None:
        records.projections.release(self.projection.name, self.name)

    def _head(self, records: MessagingRecords) -> int:
        return records.projections.head()

    def _session(self, transaction: Transaction[Any]) -> Session:
        return Session(self.projection.messagebus, self._repository, transaction=transaction)

    def _failed(self, error: Exception) -> None:
        """Note a failed batch; `ProjectionFailed` once an event failed too often."""
        self.retry_in = self.progress.failed(error, self.store.unreachable(error))

    def _done(self, batch: Batch | None, now: datetime) -> int:
        if batch is None:
            self.progress.lost()
            return 0
        self.handled += len(batch.handled)
        return self.progress.done(batch, now)

    # The sync driver --------------------------------------------------------------------

    def run_once(self) -> int:
        """Handle one batch of events; return how many positions the checkpoint moved.

        Claims (or renews) the lease first: `ProjectionHeld` if another runner holds it.
        A failed batch is rolled back and its error raised, after `Progress` noted it
        (`ProjectionFailed` instead once one event failed `attempts` times in a row).
        """
        now = _now()
        try:
            self._hold(now)
            transaction = self.store.begin()
            try:
                batch = transaction.run(lambda records: self._prepare(now, records))
                if batch is not None and batch.handled:
                    with self._session(transaction) as session:
                        for stored, event in batch.handled:
                            token = current(stored)
                            try:
                                session.dispatch(event)
                            finally:
                                restore(token)
                elif batch is not None and batch.read:
                    transaction.commit()
            finally:
                transaction.close()
        except ProjectionHeld:
            raise
        except Exception as error:
            self._failed(error)
            raise
        return self._done(batch, now)

    def _hold(self, now: datetime) -> None:
        if self.progress.claim_due(now):
            self.progress.claimed(self.store.transact(partial(self._claim, now)), now)
        if self.progress.position is None:
            raise ProjectionHeld(self.projection.name)

    def catch_up(self) -> int:
        """Handle every event up to the log's head; return how many positions it moved.

        A failing batch is retried (one event at a time, after a backoff) until it
        passes or `ProjectionFailed`.
        """
        total = 0
        while True:
            try:
                moved = self.run_once()
            except (ProjectionHeld, ProjectionFailed):
                raise
            except Exception:
                time.sleep(self.retry_in)
                continue
            total += moved
            if self.progress.position is not None and moved < self.progress.asked:
                return total

    def rebuild(self) -> None:
        """Empty the view (the reset hook) and set the checkpoint back to 0, as one."""
        self._check_resets()
        now = _now()
        self.progress.position = None  # claimed afresh: a rebuild needs the lease now
        self._hold(now)
        transaction = self.store.begin()
        try:
            if not transaction.run(self._reset):
                raise ProjectionHeld(self.projection.name)
            with self._session(transaction) as session:
                session.dispatch(ProjectionReset(self.projection.name))
        finally:
            transaction.close()
        self._rebuilt()

    def release(self) -> None:
        """Give the lease back, so that another runner may take over at once."""
        self.store.transact(self._release)
        self.progress.position = None

    def head(self) -> int:
        """The position of the log's last committed event."""
        return self.store.transact(self._head)

    # The async driver: the same, awaiting -----------------------------------------------

    async def arun_once(self) -> int:
        """`run_once` on the event loop (a sync store's batch runs in a thread)."""
        if not self.store.is_async:
            return await asyncio.to_thread(self.run_once)
        now = _now()
        try:
            await self._ahold(now)
            transaction = await self.store.abegin()
            try:
                batch = await transaction.arun(lambda records: self._prepare(now, records))
                if batch is not None and batch.handled:
                    async with self._session(transaction) as session:
                        for stored, event in batch.handled:
                            token = current(stored)
                            try:
                                await session.adispatch(event)
                            finally:
                                restore(token)
                elif batch is not None and batch.read:
                    await transaction.acommit()
            finally:
                await transaction.aclose()
        except ProjectionHeld:
            raise
        except Exception as error:
            self._failed(error)
            raise
        return self._done(batch, now)

    async def _ahold(self, now: datetime) -> None:
        if self.progress.claim_due(now):
            claimed = await self.store.atransact(partial(self._claim, now))
            self.progress.claimed(claimed, now)
        if self.progress.position is None:
            raise ProjectionHeld(self.projection.name)

    async def acatch_up(self) -> int:
        """`catch_up` on the event loop."""
        total = 0
        while True:
            try:
                moved = await self.arun_once()
            except (ProjectionHeld, ProjectionFailed):
                raise
            except Exception:
                await asyncio.sleep(self.retry_in)
                continue
            total += moved
            if self.progress.position is not None and moved < self.progress.asked:
                return total

    async def arebuild(self) -> None:
        """`rebuild` on the event loop."""
        if not self.store.is_async:
            await asyncio.to_thread(self.rebuild)
            return
        self._check_resets()
        now = _now()
        self.progress.position = None
        await self._ahold(now)
        transaction = await self.store.abegin()
        try:
            if not await transaction.arun(self._reset):
                raise ProjectionHeld(self.projection.name)
            async with self._session(transaction) as session:
                await session.adispatch(ProjectionReset(self.projection.name))
        finally:
            await transaction.aclose()
        self._rebuilt()

    async def arelease(self) -> None:
        """`release` on the event loop."""
        await self.store.atransact(self._release)
        self.progress.position = None

    async def ahead(self) -> int:
        """`head` on the event loop."""
        return await self.store.atransact(self._head)

    # What both drivers share ------------------------------------------------------------

    def _check_resets(self) -> None:
        if not self.projection.resets:
            raise ValueError(
                f"Projection {self.projection.name!r} has no reset hook: a rebuild would "
                f"apply every event again on top of its view. Register one with "
                f"@projection.reset, which empties the view."
            )

    def _rebuilt(self) -> None:
        self.progress.position = 0
        self.progress.narrow_until = 0
        self.progress.behind = True
        logger.info(
            "Projection %s reset by %s: starts over from position 0",
            self.projection.name,
            self.name,
        )

    # The service ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run` to return within `grace` seconds: the batch under way first, if it can."""
        self._stopping.stop(self.grace)

    async def run(self, *, rebuild: bool = False) -> None:
        """Follow the log until `stop()`, then give the lease back.

        Waits while another runner holds the projection, and takes over when its lease
        expires. With `rebuild`, empties the view and starts from position 0 once it
        holds the lease. A failing batch is retried (`Progress.failed`); an event that
        fails `attempts` times in a row ends the run with `ProjectionFailed`.
        """
        waiting = False
        try:
            while not self._stopping.is_set():
                try:
                    if rebuild:
                        await self._within_grace(self.arebuild())
                        rebuild = False
                        continue
                    moved = await self._within_grace(self.arun_once())
                    if moved is None:  # cancelled: the stop's budget ran out
                        continue
                except ProjectionHeld:
                    if not waiting:
                        logger.info(
                            "Projection %s is held by another runner; %s waits for its lease",
                            self.projection.name, self.name,
                        )  # fmt: skip
                    waiting = True
                    await self._stopping.pause(self.progress.lease.total_seconds() / 3)
                    continue
                except ProjectionFailed:
                    raise
                except Exception:
                    await self._stopping.pause(self.retry_in)
                    continue
                if waiting:
                    logger.info(
                        "Projection %s taken over by %s at position %s",
                        self.projection.name, self.name, self.progress.position,
                    )  # fmt: skip
                    waiting = False
                caught_up = moved < self.progress.asked
                if self.progress.report_due(self.report_every, caught_up):
                    await self._report(caught_up)
                if caught_up:
                    await self._stopping.pause(self.idle)
        finally:
            if not self._stopping.is_set():  # an error ends the run: the same budget
                self.stop()
            await self._shutdown()
            self._stopping.clear()  # so that run() may be called again

    async def _within_grace(self, work: Coroutine[Any, Any, T]) -> T | None:
        """`work`, left to finish within the stop's budget once `stop()` is called."""

        def overrun() -> None:
            logger.warning(
                "Projection %s stops without waiting longer for the batch under way "
                "(grace %.1f s): it is rolled back, and handled again by the next runner",
                self.projection.name, self.grace,
            )  # fmt: skip

        return await self._stopping.within_grace(work, overrun)

    async def _report(self, caught_up: bool) -> None:
        try:
            head = await self.ahead()
        except Exception as error:  # the lag waits for the next report
            logger.debug("Projection %s could not read the log's head: %r", self.name, error)
            return
        self.lag = self.progress.report(head, caught_up)

    async def _shutdown(self) -> None:
        """Give the lease back within what is left of the budget; it expires anyway."""
        position = self.progress.position
        try:
            async with asyncio.timeout(self._stopping.left()):
                await self.arelease()
        except Exception as error:
            logger.warning(
                "Projection %s could not give its lease back: %r", self.projection.name, error
            )
        logger.info(
            "Projection %s stopped at position %s (%s): %d event(s) handled",
            self.projection.name, position, self.name, self.handled,
        )  # fmt: skip


def _now() -> datetime:
    return datetime.now(UTC)
