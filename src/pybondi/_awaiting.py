"""Helpers for hooks that may be written sync or `async def`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar

from pybondi.exceptions import AsyncRequired, callable_name

T = TypeVar("T")

_NOT_AWAITABLE: set[type] = set()  # what hooks returned that `refuse_awaitable` let pass
_REMEMBERED = 64  # a bound, for types made on the fly (in tests, say)


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
    # an ABC isinstance check costs several times more. The types found not awaitable
    # are remembered: `hasattr` raises and swallows an AttributeError for each of them.
    if result is None or type(result) in _NOT_AWAITABLE:
        return
    if not hasattr(type(result), "__await__"):
        if len(_NOT_AWAITABLE) >= _REMEMBERED:
            _NOT_AWAITABLE.clear()
        _NOT_AWAITABLE.add(type(result))
    else:
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise AsyncRequired(f"{callable_name(hook)}()", hook, instead)
