"""Deprecated names of pybondi 1.2.1 that keep working, with a warning the first time.

Each alias warns once per process, the first time it is used: a `DeprecationWarning`
that names the replacement, pointing at the caller's line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["deprecated", "module_getattr"]

_warned: set[str] = set()


def deprecated(name: str, replacement: str, note: str = "") -> None:
    """Warn, the first time only, that pybondi 1.2.1's `name` is now `replacement`.

    The warning points at the caller of the function that calls this one: the user's
    code calling a deprecated method, or importing a deprecated module attribute.
    """
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"{name} is deprecated (a pybondi 1.2.1 name, kept so that code written for it "
        f"runs); use {replacement} instead{': ' if note else ''}{note}.",
        DeprecationWarning,
        stacklevel=3,
    )


def module_getattr(module: str, aliases: dict[str, tuple[Any, str]]) -> Callable[[str], Any]:
    """A module `__getattr__` serving deprecated names: `{name: (value, replacement)}`."""

    def __getattr__(name: str) -> Any:
        try:
            value, replacement = aliases[name]
        except KeyError:
            raise AttributeError(f"module {module!r} has no attribute {name!r}") from None
        deprecated(f"{module}.{name}", replacement)
        return value

    return __getattr__
