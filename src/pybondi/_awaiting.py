"""Helpers for hooks that may be written sync or `async def`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

from pybondi.exceptions import AsyncRequired, callable_name

T = TypeVar("T")


async def maybe_await(result: T | Awaitable[T]) -> T:
    """`result`, awaited if it is awaitable: the async path accepts both kinds of hook."""
    if result is not None and inspect.isawaitable(result):
        return await result
    return result


def refuse_awaitable(result: object, hook: object, instead: str) -> None:
    """Raise `AsyncRequired` if a hook called on the sync path returned an awaitable.

    The coroutine is closed first, so that it does not warn "never awaited" later.
    """
    # `__await__` on the type, not inspect.isawaitable: this runs on every session, and
    # an ABC isinstance check costs several times more.
    if result is not None and hasattr(type(result), "__await__"):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise AsyncRequired(f"{callable_name(hook)}()", hook, instead)
