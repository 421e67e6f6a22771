"""A counter aggregate that many writers share: the domain of the SQL stress tests."""

from __future__ import annotations

from dataclasses import dataclass

from pybondi import Aggregate, Event, Root
from pybondi.persistence.serialization import Registry


@dataclass
class Incremented(Event):
    counter: str
    value: int


@dataclass(eq=False)
class Counter(Aggregate):
    """State-stored as `{"value": n}`, or event-sourced from its `Incremented` events."""

    root: Root
    value: int = 0

    def increment(self) -> None:
        event = Incremented(self.root.id, self.value + 1)
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        if isinstance(event, Incremented):
            self.value = event.value


def registry() -> Registry:
    made = Registry()
    made.register(Counter, name="counters.Counter")
    made.register(Incremented, name="counters.Incremented")
    return made
