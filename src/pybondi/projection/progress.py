"""What a projection runner decides without I/O: what to read, failures, leases, lag.

`Progress` holds where the runner is (its checkpoint, while it holds the lease), how
many events to read next, how many times the events at the checkpoint failed, when the
lease wants renewing and when the lag is due in the logs. The runner's sync and async
drivers (`pybondi.projection.runner`) only do the I/O it asks for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pybondi.exceptions import ProjectionFailed
from pybondi.messaging.backoff import backoff
from pybondi.persistence.records import StoredEvent

__all__ = ["Batch", "Progress"]

logger = logging.getLogger("pybondi.projection")


@dataclass
class Batch:
    """Events read from the log after the checkpoint, and the ones to handle, decoded.

    `last` is the position the checkpoint moves to: the last event read (0 when none).
    """

    read: list[StoredEvent] = field(default_factory=list)
    handled: list[tuple[StoredEvent, Any]] = field(default_factory=list)

    @property
    def last(self) -> int:
        """The position the checkpoint moves to."""
        return self.read[-1].position if self.read else 0


class Progress:
    """A runner's position, failures, lease timing and lag reports; see the module doc."""

    def __init__(
        self, name: str, *, batch_size: int, attempts: int, lease: float, max_backoff: float
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.attempts = attempts
        self.lease = timedelta(seconds=lease)
        self.max_backoff = max_backoff
        self._position: int | None = None
        self.reached: int | None = None  # the last checkpoint this runner knew, kept after
        self.lease_until = datetime.min.replace(tzinfo=UTC)
        self.reading: list[StoredEvent] = []  # the batch under way
        self.asked = batch_size  # how many events the last read asked for
        self.failures = 0  # in a row, at `failed_at`
        self.outages = 0  # failures of the store itself, in a row
        self.failed_at = -1
        self.narrow_until = 0  # one event at a time up to here: a failed batch's end
        self.behind = False  # whether events were handled since the last caught-up
        self.reported_at = time.monotonic()
        self.handled_since = 0

    @property
    def position(self) -> int | None:
        """The checkpoint, while this runner holds the lease."""
        return self._position

    @position.setter
    def position(self, position: int | None) -> None:
        self._position = position
        if position is not None:
            self.reached = position

    # Leases -----------------------------------------------------------------------------

    def claim_due(self, now: datetime) -> bool:
        """Whether to claim the lease now: not held, or a third of it gone by."""
        return self.position is None or now >= self.lease_until - self.lease * 2 / 3

    def claimed(self, position: int | None, now: datetime) -> None:
        """Take a claim's answer: the checkpoint, or None when another runner holds it."""
        if position is None:
            self.position = None
            return
        if self.position is not None and position != self.position:
            logger.warning(
                "Projection %s: its checkpoint is at %d, not %d: another runner worked on it "
                "while this one's lease had lapsed",
                self.name, position, self.position,
            )  # fmt: skip
        self.position = position
        self.lease_until = now + self.lease

    def until(self, now: datetime) -> datetime:
        """The end of a lease taken or extended now."""
        return now + self.lease

    # Batches ----------------------------------------------------------------------------

    def limit(self) -> int:
        """How many events to read next: one at a time past a failure, to find the culprit."""
        if self.position is not None and self.position < self.narrow_until:
            return 1
        return self.batch_size

    def done(self, batch: Batch, now: datetime) -> int:
        """Take a committed batch; return how many positions the checkpoint moved."""
        self.reading = []
        if not batch.read:
            return 0
        self.position = batch.last
        self.lease_until = now + self.lease
        self.failures = self.outages = 0
        self.behind = True
        self.handled_since += len(batch.handled)
        return len(batch.read)

    def lost(self) -> None:
        """The checkpoint did not move: another runner took the lease meanwhile."""
        logger.warning(
            "Projection %s lost its lease at position %s: another runner goes on from there",
            self.name, self.position,
        )  # fmt: skip
        self.position = None
        self.reading = []

    def failed(self, error: BaseException, transient: bool) -> float:
        """Take a failed batch (rolled back); return the seconds to wait before retrying.

        A failure of the store itself (out of reach) is waited out, however long. Any
        other failure counts against the events at the checkpoint: the next reads take
        one event at a time up to the end of the failed batch, so that the events before
        the culprit commit and the culprit is known; after `attempts` failures in a row
        on one event, `ProjectionFailed`.
        """
        reading, self.reading = self.reading, []
        at = self.position
        self.position = None  # claimed again before the next try, which also resyncs
        if transient or at is None:
            self.outages += 1
            delay = backoff(self.outages, first=0.1, longest=self.max_backoff, jitter=True)
            logger.warning(
                "Projection %s cannot reach its store (%s: %s); retrying in %.2f s",
                self.name, type(error).__name__, error, delay,
            )  # fmt: skip
            return delay
        self.failures = self.failures + 1 if at == self.failed_at else 1
        self.failed_at = at
        if reading:
            self.narrow_until = max(self.narrow_until, reading[-1].position)
        if len(reading) == 1 and self.failures >= self.attempts:
            raise ProjectionFailed(self.name, reading[0], self.failures, error) from error
        delay = backoff(self.failures, first=0.05, longest=self.max_backoff, jitter=True)
        first = reading[0].position if reading else at + 1
        logger.warning(
            "Projection %s failed on the events from position %d (%d read): %s: %s; "
            "rolled back, retrying %s in %.2f s (failure %d of %d)",
            self.name, first, len(reading), type(error).__name__, error,
            "one event at a time" if len(reading) > 1 else "it", delay, self.failures,
            self.attempts,
        )  # fmt: skip
        return delay

    # Lag --------------------------------------------------------------------------------

    def report_due(self, every: float, caught_up: bool) -> bool:
        """Whether to log the lag now: periodically while behind, and once caught up."""
        if caught_up and self.behind:
            return True
        return self.behind and time.monotonic() - self.reported_at >= every

    def report(self, head: int, caught_up: bool) -> int:
        """Log where the projection is against the log's head; return the lag."""
        position = self.position or 0
        lag = max(head - position, 0)
        now = time.monotonic()
        rate = self.handled_since / max(now - self.reported_at, 1e-9)
        if caught_up and lag == 0:
            logger.info("Projection %s caught up at position %d (lag 0)", self.name, position)
            self.behind = False
        else:
            logger.info(
                "Projection %s at position %d of %d: lag %d event(s), %.0f handled/s",
                self.name, position, head, lag, rate,
            )  # fmt: skip
        self.reported_at, self.handled_since = now, 0
        return lag
