"""Failure messages that show what was expected, what happened, and where they differ.

Two lists are lined up as a diff: one item per line, `-` for an expected one that is
missing, `+` for one that came instead, and under each pair of the same type the fields
that differ, side by side:

    Expected 2 events; 2 were published, and they differ (- expected, + published):
      Deposited(account='alice', amount=10)
    - Withdrawn(account='alice', amount=3)
    + Withdrawn(account='alice', amount=4)
        amount: expected 3, published 4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from difflib import SequenceMatcher
from typing import Any

from pybondi.exceptions import short_repr

__all__ = ["count", "differences", "listing", "sequence_diff"]

_DEPTH = 4  # how deep fields are compared before a whole value is shown instead
_ABSENT = object()


def count(number: int, noun: str) -> str:
    """`no event`, `1 event`, `2 events`."""
    if number == 0:
        return f"no {noun}"
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def listing(items: Sequence[object], mark: str = " ") -> list[str]:
    """One line per item, each after its mark."""
    return [f"{mark} {item!r}" for item in items]


def sequence_diff(
    expected: Sequence[object], actual: Sequence[object], *, noun: str, verb: str
) -> str:
    """Explain how two unequal lists differ, `verb` saying what happened to `actual`."""
    if not expected:
        headline = f"Expected {count(0, noun)}, but {_were(len(actual))} {verb}:"
    elif not actual:
        headline = f"Expected {count(len(expected), noun)}, but {count(0, noun)} was {verb}:"
    else:
        headline = (
            f"Expected {count(len(expected), noun)}; {_were(len(actual))} {verb}, and they "
            f"differ (- expected, + {verb}):"
        )
    lines = [headline]
    # Lined up by their reprs, which are hashable where the items may not be; whether
    # two items are the same is still decided by ==.
    matcher = SequenceMatcher(None, list(map(repr, expected)), list(map(repr, actual)), False)
    for tag, low, high, start, stop in matcher.get_opcodes():
        wanted, got = expected[low:high], actual[start:stop]
        if tag != "equal":
            lines += _block(wanted, got, verb)
            continue
        for one, other in zip(wanted, got, strict=True):
            lines += [f"  {one!r}"] if one == other else _pair(one, other, verb)
    return "\n".join(lines)


def _block(wanted: Sequence[object], got: Sequence[object], verb: str) -> list[str]:
    """Lines for a stretch that differs: each expected item beside the next of its type."""
    lines: list[str] = []
    start = 0
    for one in wanted:
        match = next((k for k in range(start, len(got)) if type(got[k]) is type(one)), None)
        if match is None:
            lines.append(f"- {one!r}")
        else:
            lines += listing(got[start:match], "+") + _pair(one, got[match], verb)
            start = match + 1
    return lines + listing(got[start:], "+")


def _pair(expected: object, actual: object, verb: str) -> list[str]:
    lines = [f"- {expected!r}", f"+ {actual!r}"]
    if type(expected) is not type(actual):
        return lines
    notes = differences(expected, actual, verb)
    if not notes and lines[0][1:] == lines[1][1:]:
        # Plain classes compare by identity: two events alike are still not ==.
        notes = [
            f"(alike, but not ==: make {type(expected).__name__} compare by value, as a "
            f"@dataclass does)"
        ]
    return lines + [f"    {note}" for note in notes]


def _were(number: int) -> str:
    return f"{number} was" if number == 1 else f"{number} were"


def differences(expected: object, actual: object, verb: str, path: str = "") -> list[str]:
    """`path: expected X, <verb> Y` for each field where two values differ.

    Dataclasses, named tuples, dicts, lists and objects with attributes are compared
    field by field, a few levels deep; other values as a whole. Two values without
    fields, or of different types, give nothing at the top (`path` empty): their reprs,
    shown above, tell the difference already.
    """
    return [
        f"{where}: expected {_show(one)}, {verb} {_show(other)}"
        for where, one, other in _compare(expected, actual, path, 0)
        if where
    ]


def _compare(expected: object, actual: object, path: str, depth: int) -> list[tuple[str, Any, Any]]:
    """The `(path, expected, actual)` of each differing field, or of the whole values."""
    if expected is actual or _same(expected, actual):
        return []
    mine, theirs = _fields(expected), _fields(actual)
    if depth < _DEPTH and type(expected) is type(actual) and mine and theirs is not None:
        found = []
        for name in [*mine, *(name for name in theirs if name not in mine)]:
            one, other = mine.get(name, _ABSENT), theirs.get(name, _ABSENT)
            found += _compare(one, other, _join(path, name), depth + 1)
        if found:
            return found
    return [(path, expected, actual)]


def _same(one: object, other: object) -> bool:
    try:
        return bool(one == other)
    except Exception:  # a value whose == cannot answer is shown as different
        return False


def _show(value: object) -> str:
    return "nothing" if value is _ABSENT else short_repr(value)


def _join(path: str, name: str) -> str:
    return f"{path}{name}" if name.startswith("[") or not path else f"{path}.{name}"


def _fields(value: object) -> dict[str, Any] | None:
    """A value's parts by name, or None for a value compared as a whole."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.compare}
    names = getattr(type(value), "_fields", None)
    if isinstance(value, tuple) and names is not None:  # a named tuple
        return dict(zip(names, value, strict=True))
    if isinstance(value, dict):
        return {f"[{key!r}]": item for key, item in value.items()}
    if isinstance(value, list | tuple):
        return {f"[{index}]": item for index, item in enumerate(value)}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return dict(vars(value))
    return None
