"""Entities, aggregate roots that collect domain events, aggregates and factories.

    class Account(Aggregate):
        def __init__(self, id: str, balance: int = 0) -> None:
            self.root = Root(id)
            self.balance = balance

        def deposit(self, amount: int) -> None:
            self.balance += amount
            self.root.publish(Deposited(self.id, amount))

A session dispatches the events a root collected after each message it handles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Generic, TypeVar

from pybondi.exceptions import short_repr
from pybondi.messagebus import Event

__all__ = ["Aggregate", "Entity", "Factory", "Root"]


class Entity:
    """A domain object with an identity: equal to another of its class with the same id.

    The id is set once, by `Entity.__init__` or a dataclass field, and cannot be reassigned
    or deleted afterwards, since the entity's hash and equality rest on it. Declare
    dataclass entities with `@dataclass(eq=False)`: the default `eq=True` would replace
    this equality with a field-by-field one and make the entity unhashable.
    """

    id: Any

    # Whether a class of the entity defines `id` itself (a slot, a property, a default):
    # then only `hasattr` tells if it is set. Otherwise the instance's `__dict__` does,
    # without the AttributeError `hasattr` raises and swallows while an entity is built.
    _id_in_class = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._id_in_class = any("id" in vars(klass) for klass in cls.__mro__[:-1])

    def __init__(self, id: Any) -> None:
        if self._plain():
            self.__dict__["id"] = id
        else:
            self.id = id

    def _plain(self) -> bool:
        """Whether setting `id` can skip `__setattr__`: it would only store it.

        A Python `__setattr__` costs every attribute set a call (it was most of the cost
        of building a `Root`); `__init__` stores straight into the instance's dict when
        no subclass changed how attributes are set and `id` is not set yet.
        """
        return (
            type(self).__setattr__ is Entity.__setattr__
            and not self._id_in_class
            and "id" not in self.__dict__
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "id" and ("id" in self.__dict__ or (self._id_in_class and hasattr(self, "id"))):
            raise AttributeError(
                f"{type(self).__name__}.id is already {self.id!r} and cannot be reassigned: "
                f"an entity's identity never changes. Create a new entity instead."
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "id":
            raise AttributeError(f"{type(self).__name__}.id cannot be deleted.")
        super().__delattr__(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entity):
            return NotImplemented
        return type(other) is type(self) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"


class Root(Entity):
    """The root entity of an aggregate: its identity, and the events it has published.

    `publish(event)` records a domain event; the session that holds the aggregate takes
    the recorded events after each message it handles and dispatches them, in order.
    """

    def __init__(self, id: Any) -> None:
        self.events: deque[Event]
        if type(self) is Root and "id" not in self.__dict__:
            # What Entity.__init__ and __setattr__ would do, without their calls: a root
            # is built per aggregate, often per unit of work.
            self.__dict__["id"], self.__dict__["events"] = id, deque()
        else:
            super().__init__(id)
            self.events = deque()

    def publish(self, event: Event) -> None:
        """Record a domain event for the session to dispatch."""
        if not isinstance(event, Event):
            raise TypeError(
                f"Root.publish() takes an Event, got {type(event).__name__}: "
                f"{short_repr(event)}. Subclass pybondi.Event for domain events."
            )
        self.events.append(event)

    def collect(self) -> list[Event]:
        """Take the recorded events, oldest first, leaving none behind."""
        events = list(self.events)
        self.events.clear()
        return events


class Aggregate:
    """A cluster of domain objects treated as one unit, reached through its `root`.

    Subclasses set `self.root = Root(id)` in their `__init__`; `id` reads the root's id.
    Two aggregates of the same class with the same id are equal.
    """

    root: Root

    @property
    def id(self) -> Any:
        """The identity of the aggregate: its root's id."""
        return self.root.id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Aggregate):
            return NotImplemented
        return type(other) is type(self) and other.root.id == self.root.id

    def __hash__(self) -> int:
        return hash(self.root.id)


A = TypeVar("A", bound=Aggregate)


class Factory(ABC, Generic[A]):
    """Builds aggregates whose construction is more than a constructor call.

    Override `create`; calling the factory calls `create`. A factory written for pybondi
    1.2.1, which overrides `__call__` instead, works too.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls) and getattr(cls.create, "__isabstractmethod__", False):
            # Runs before ABCMeta lists the abstract methods, so `create` no longer is one.
            cls.create = cls.__call__  # type: ignore[method-assign]

    @abstractmethod
    def create(self, *args: Any, **kwargs: Any) -> A:
        """Build and return a new aggregate."""

    def __call__(self, *args: Any, **kwargs: Any) -> A:
        """Build a new aggregate with `create`."""
        return self.create(*args, **kwargs)
