"""Time for the in-process broker: real, or a `ManualClock` the tests move.

    clock = ManualClock()
    broker = MemoryBroker(clock=clock)
    clock.advance(300)          # a retry due in 300 s is due now; no real time passed

A `MemoryBroker` (pybondi.messaging.brokers.memory) reads due times (retries,
redeliveries) and message timestamps from its clock. Receives waiting on a clock that
does not run by itself are woken by its jumps, through `watch`.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "ManualClock"]


class Clock:
    """Real time, as a `MemoryBroker` reads it for due times and timestamps.

    Subclass it for a time of your own: `monotonic()` never goes back, `runs` says
    whether it moves by itself, and a clock that jumps (as `ManualClock.advance` does)
    calls the callbacks given to `watch` afterwards, so that waiting receives look again.
    """

    runs = True
    """Whether time passes by itself, so that a receive may sleep until a due time."""

    def monotonic(self) -> float:
        """Seconds that never go back: the scale of due times."""
        return time.monotonic()

    def now(self) -> datetime:
        """The date and time now, in UTC: the timestamp of a message sent now."""
        return datetime.now(UTC)

    def watch(self, callback: Callable[[], None]) -> None:
        """Have `callback` called after each jump of the clock; real time never jumps."""


class ManualClock(Clock):
    """A clock that moves only when `advance()` is called: waiting takes no real time.

    Args:
        start: the date and time it shows before any advance (default: now), which is
            the timestamp of the messages sent then.
    """

    runs = False

    def __init__(self, start: datetime | None = None) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError(
                f"ManualClock(start={start!r}) needs a time zone, as in "
                f"datetime(2024, 5, 1, tzinfo=UTC): timestamps are compared in UTC."
            )
        self._start = start or datetime.now(UTC)
        self._elapsed = 0.0
        self._lock = threading.Lock()
        self._watchers: list[Callable[[], Callable[[], None] | None]] = []

    def __repr__(self) -> str:
        return f"<ManualClock at {self.now().isoformat()} (+{self._elapsed:g} s)>"

    def monotonic(self) -> float:
        """The seconds advanced since the clock was made."""
        return self._elapsed

    def now(self) -> datetime:
        """`start` plus the seconds advanced."""
        return self._start + timedelta(seconds=self._elapsed)

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` ahead; what comes due by then is ready at once."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(
                f"A clock only moves forward: advance({seconds!r}) needs 0 or more seconds."
            )
        with self._lock:
            self._elapsed += seconds
            watchers = [watcher() for watcher in self._watchers]
            self._watchers = [
                ref for ref, alive in zip(self._watchers, watchers, strict=True) if alive
            ]
        for callback in watchers:
            if callback is not None:
                callback()

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` after each advance; a bound method is held weakly."""
        reference: Callable[[], Callable[[], None] | None]
        if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
            reference = weakref.WeakMethod(callback)  # a dropped broker is forgotten
        else:
            reference = lambda: callback  # noqa: E731
        with self._lock:
            self._watchers.append(reference)
