"""One backoff for everything that waits before trying again.

Retries of a failing message, the relay and the worker waiting for an unreachable broker,
the command line waiting for its store and the supervisor restarting a worker process all
wait `first * factor ** (n - 1)` seconds after failure n, at most `longest`. Waits of many
processes for one server take jitter, so that they do not all come back at once.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 64  # past this the cap applies anyway; a larger power would overflow


def backoff(
    failures: int, *, first: float, longest: float, factor: float = 2.0, jitter: bool = False
) -> float:
    """Seconds to wait after failure number `failures` (1, 2, ...).

    With `jitter`, a uniformly random wait up to that ("full jitter").
    """
    exponent = min(max(failures - 1, 0), _MAX_EXPONENT)
    ceiling = float(min(longest, first * factor**exponent))
    return random.uniform(0, ceiling) if jitter else ceiling
