from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pybondi import Added, Aggregate, Commited, Committed, Entity, Event, Factory, RolledBack, Root
from pybondi.events import snake_case


@dataclass
class Renamed(Event):
    name: str


class User(Aggregate):
    def __init__(self, id: int, name: str) -> None:
        self.root = Root(id)
        self.name = name

    def rename(self, name: str) -> None:
        self.name = name
        self.root.publish(Renamed(name))


class BankAccount(Aggregate):
    def __init__(self, id: str) -> None:
        self.root = Root(id)


class Item(Entity):
    pass


def test_entities_are_equal_by_class_and_id() -> None:
    assert Item(1) == Item(1)
    assert Item(1) != Item(2)
    assert Item(1) != Root(1)
    assert Item(1) != 1
    assert len({Item(1), Item(1), Item(2)}) == 2


def test_entity_id_cannot_be_reassigned_or_deleted() -> None:
    item = Item(1)
    with pytest.raises(AttributeError, match="cannot be reassigned"):
        item.id = 2
    with pytest.raises(AttributeError, match="cannot be deleted"):
        del item.id
    assert item.id == 1


def test_dataclass_entities_set_their_id_once() -> None:
    @dataclass(eq=False)
    class Line(Entity):
        id: int
        quantity: int

    line = Line(3, 1)
    line.quantity = 2
    assert line == Line(3, 9)
    with pytest.raises(AttributeError):
        line.id = 4


def test_root_collects_events_in_order() -> None:
    user = User(1, "ann")
    user.rename("bob")
    user.rename("cy")
    assert user.root.collect() == [Renamed("bob"), Renamed("cy")]
    assert user.root.collect() == []


def test_root_accepts_only_events() -> None:
    with pytest.raises(TypeError, match="Root.publish\\(\\) takes an Event, got str"):
        Root(1).publish("renamed")  # type: ignore[arg-type]


def test_aggregates_are_equal_by_class_and_root_id() -> None:
    assert User(1, "a") == User(1, "b")
    assert User(1, "a") != User(2, "a")
    assert User(1, "a").id == 1
    assert hash(User(1, "a")) == hash(User(1, "b"))


def test_factory_builds_through_create() -> None:
    class Users(Factory[User]):
        def __init__(self) -> None:
            self.next_id = 0

        def create(self, *args: Any, **kwargs: Any) -> User:
            self.next_id += 1
            return User(self.next_id, *args, **kwargs)

    users = Users()
    assert users("ann").id == 1
    assert users.create(name="bob").id == 2
    with pytest.raises(TypeError):
        Factory()  # type: ignore[abstract]


@pytest.mark.parametrize("event_type", [Added, Committed, RolledBack])
def test_default_events_name_their_aggregate(event_type: type[Added[Any]]) -> None:
    user, account = User(1, "ann"), BankAccount("x")
    assert event_type(user).aggregate is user
    assert event_type(user).user is user
    assert event_type(account).bank_account is account
    with pytest.raises(AttributeError, match="reachable as .aggregate or .user"):
        event_type(user).account  # noqa: B018


def test_commited_is_the_1_2_1_spelling_and_events_are_generic() -> None:
    assert Commited is Committed
    assert Added[User].__origin__ is Added  # type: ignore[attr-defined]
    assert repr(Added(User(1, "a"))).startswith("Added(")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("User", "user"),
        ("BankAccount", "bank_account"),
        ("HTTPServer", "http_server"),
        ("Order2Line", "order2_line"),
    ],
)
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


def test_slotted_dataclass_entities_keep_their_id() -> None:
    @dataclass(eq=False, slots=True)
    class Line(Entity):
        id: int
        quantity: int

    line = Line(1, 2)
    with pytest.raises(AttributeError, match="cannot be reassigned"):
        line.id = 2
    assert line == Line(1, 5)
    assert hash(line) == hash(Line(1, 5))
