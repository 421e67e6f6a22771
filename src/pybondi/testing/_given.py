"""What a scenario was given and has not stored yet: aggregates, and events for an id.

Checked when given, so that a mistake points at the line that made it; put into a unit
of work of the scenario's before its next `when`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pybondi.aggregate import Aggregate, Root
from pybondi.exceptions import callable_name, short_repr
from pybondi.messagebus import Event
from pybondi.persistence.repositories import EventSourcedRepository, StoreRepository
from pybondi.repository import Repository
from pybondi.session import Session

__all__ = ["Given", "Item", "histories"]

A = TypeVar("A", bound=Aggregate)


Item = tuple[Any, A | None, tuple[Event, ...]]
"""An aggregate's id, and the aggregate to store as it is or the events to apply to it."""


def histories(items: list[Item[A]]) -> list[Any]:
    """The ids whose events may continue a stored aggregate: load those first."""
    return list(dict.fromkeys(id for id, aggregate, _ in items if aggregate is None))


class Given(Generic[A]):
    """Collects what a scenario is given, checking each item as it comes."""

    def __init__(self, repository: Repository[A], create: Callable[[Any], A] | None) -> None:
        self.repository = repository
        self.create = create
        self.items: list[Item[A]] = []

    def aggregate(self, aggregate: A) -> Any:
        """Take an aggregate to store as it is; return its id."""
        root = getattr(aggregate, "root", None)
        if not isinstance(root, Root):
            advice = ""
            if isinstance(aggregate, Event):
                advice = " Give events with given_events(id, *events)."
            raise TypeError(
                f"given() takes aggregates (with self.root = Root(id)), got "
                f"{type(aggregate).__name__}: {short_repr(aggregate)}.{advice}"
            )
        if isinstance(self.repository, EventSourcedRepository) and not root.events:
            raise ValueError(
                f"{type(self.repository).__name__} stores only events, and "
                f"{type(aggregate).__name__} {root.id!r} has published none: nothing of it "
                f"would be stored. Give its history with given_events({root.id!r}, ...), or "
                f"build it through methods that publish events."
            )
        self.items.append((root.id, aggregate, ()))
        return root.id

    def events(self, id: Any, events: tuple[Event, ...]) -> None:
        """Take events to apply to aggregate `id`, as its history."""
        if not events:
            raise ValueError(f"given_events({id!r}) needs at least one event after the id.")
        for event in events:
            if not isinstance(event, Event):
                raise TypeError(
                    f"given_events() takes an id and then events, got "
                    f"{type(event).__name__}: {short_repr(event)}."
                )
        self.items.append((id, None, events))

    def take(self) -> list[Item[A]]:
        """What was given since the last time, leaving nothing behind."""
        items, self.items = self.items, []
        return items

    def put(self, session: Session, items: list[Item[A]]) -> None:
        """Add the aggregates to the session, and apply and publish the events.

        The session records what each aggregate publishes, and so stores the events as
        its history; an aggregate loaded for `histories` is continued, not replaced.
        """
        held = session.repository.aggregates
        for id, aggregate, events in items:
            if aggregate is not None:
                session.add(aggregate)
                continue
            existing = held.get(id)
            if existing is None:
                existing = self.blank(id)
                session.add(existing)
            apply = getattr(existing, "apply", None)
            if not callable(apply):
                name = type(existing).__name__
                raise TypeError(
                    f"{name} has no apply(event) method: given_events() applies each event "
                    f"to the aggregate and stores it as its history. Give the state itself "
                    f"instead, with given({name}(...))."
                )
            for event in events:
                apply(event)
                existing.root.publish(event)

    def blank(self, id: Any) -> A:
        """A blank aggregate, for events of an id that nothing is stored under yet."""
        create = self.create
        if create is None and isinstance(self.repository, EventSourcedRepository):
            create = self.repository.create
        elif create is None and isinstance(self.repository, StoreRepository):
            create = self.repository.aggregate_type
        if create is None:
            raise TypeError(
                f"given_events() starts from a blank aggregate, and "
                f"{type(self.repository).__name__} does not say how to build one. Pass "
                f"Scenario(..., create=Account), or give the aggregate with given(...)."
            )
        try:
            return create(id)
        except Exception as error:
            error.add_note(f"While building a blank aggregate with {callable_name(create)}.")
            raise
