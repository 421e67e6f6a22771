"""The events a session sends about each aggregate it holds.

- `Added` when the aggregate joins the session: bring its state up to date.
- `Committed` (`Commited` is the pybondi 1.2.1 spelling) when the session commits: save it.
- `RolledBack` when the session rolls back: restore it.

Each is generic over the aggregate (`Added[User]` in annotations) and exposes it as
`.aggregate`, and also under its class name in snake_case: `event.user` for a `User`,
`event.bank_account` for a `BankAccount`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any, Generic, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.messagebus import Event
from pybondi.messages import AggregateGuard

__all__ = ["Added", "AggregateEvent", "Commited", "Committed", "RolledBack"]

A = TypeVar("A", bound=Aggregate)


@cache
def snake_case(name: str) -> str:
    """`BankAccount` -> `bank_account`, `HTTPServer` -> `http_server`."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


class AggregateEvent(Event, Generic[A]):
    """An event about one aggregate, reachable as `.aggregate` or by its snake_case name."""

    def __init__(self, aggregate: A) -> None:
        self.aggregate = aggregate

    @classmethod
    def _guard(cls, arguments: tuple[Any, ...]) -> Callable[[Any], bool] | None:
        """A handler of `Added[User]` receives `Added` events about users only."""
        aggregate_type = arguments[0]
        if not isinstance(aggregate_type, type):
            return None  # a TypeVar or another unresolvable parameter: every aggregate
        return AggregateGuard(aggregate_type)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found the normal way, so `.aggregate` stays fast.
        aggregate = self.__dict__.get("aggregate")
        if aggregate is None:
            raise AttributeError(name)
        alias = snake_case(type(aggregate).__name__)
        if name == alias:
            return aggregate
        raise AttributeError(
            f"{type(self).__name__} has no attribute {name!r}: its aggregate is a "
            f"{type(aggregate).__name__}, reachable as .aggregate or .{alias}"
        )

    def __eq__(self, other: object) -> bool:
        # As pybondi 1.2.1's dataclasses were: the same event about the same aggregate.
        if type(other) is not type(self):
            return NotImplemented
        return bool(other.aggregate == self.aggregate)

    def __hash__(self) -> int:
        return hash((type(self), self.aggregate))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aggregate!r})"


class Added(AggregateEvent[A]):
    """The aggregate joined a session; handlers may bring its state up to date."""


class Committed(AggregateEvent[A]):
    """The session is committing; handlers may save the aggregate's state."""


class RolledBack(AggregateEvent[A]):
    """The session rolled back; handlers may restore the aggregate's state."""


Commited = Committed
"""The pybondi 1.2.1 spelling of `Committed`, kept so existing code keeps working."""
