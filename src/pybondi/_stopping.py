"""A stop with a time budget, as the relay and the projection runner take it.

`stop(grace)` sets the moment by which `run` must have returned: `grace` seconds on, or
at least a second, to give the leases back. The work under way may go on within that
budget, less what the shutdown keeps for itself; past it, it is cancelled (and rolled
back). `pause` sleeps, unless a stop comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Stopping"]

T = TypeVar("T")

_AT_LEAST = 1.0  # seconds a stop takes at most even with less grace: to give leases back
_SHUTDOWN = 0.5  # seconds of the stop's budget kept for giving leases back, closing


class Stopping:
    """Whether a stop was asked for, and the seconds it has left; see the module doc."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self._by = 0.0  # when the stop must be over (time.monotonic())

    def stop(self, grace: float) -> None:
        """Ask for a stop within `grace` seconds (a second at least); a second ask keeps it."""
        if not self.asked.is_set():
            self._by = time.monotonic() + max(grace, _AT_LEAST)
        self.asked.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self.asked.is_set()

    def clear(self) -> None:
        """Forget the stop, once it is over: `run` may be called again."""
        self.asked.clear()

    def left(self) -> float:
        """Seconds left of the stop's budget (a little, at least, for each step)."""
        return max(self._by - time.monotonic(), 0.05)

    async def pause(self, seconds: float) -> None:
        """Sleep for `seconds`, or until a stop is asked for."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.asked.wait(), seconds)

    async def within_grace(
        self, work: Coroutine[Any, Any, T], overrun: Callable[[], None]
    ) -> T | None:
        """What `work` returns; None if a stop's budget ran out first and it was cancelled.

        `overrun()` is called then, before the cancellation (to say so in the log).
        """
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.asked.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.wait((task,), timeout=max(self.left() - _SHUTDOWN, 0))
            if not task.done():
                overrun()
                task.cancel()
                # Unlike `await task`, asyncio.wait keeps a cancellation of our own.
                await asyncio.wait((task,), timeout=self.left())
                return None
            return task.result()
        finally:
            stopped.cancel()
            task.cancel()
