from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pybondi import AsyncRequired, NotFound, Repository, SessionError
from tests.test_aggregate import User


class Users(Repository[User]):
    def __init__(self, database: dict[int, str]) -> None:
        super().__init__()
        self.database = database
        self.calls: list[str] = []

    def load(self, id: Any) -> User | None:
        self.calls.append(f"load {id}")
        name = self.database.get(id)
        return None if name is None else User(id, name)

    def store(self, user: User) -> None:
        self.calls.append(f"store {user.id}")
        self.database[user.id] = user.name

    def restore(self, user: User) -> None:
        self.calls.append(f"restore {user.id}")
        user.name = self.database[user.id]


def test_identity_map_returns_the_same_object() -> None:
    users = Users({1: "ann"})
    first = users.get(1)
    assert users.get(1) is first
    assert users.calls == ["load 1"]
    assert list(users) == [first]


def test_get_missing_is_not_found_naming_the_id() -> None:
    with pytest.raises(NotFound, match="Users has no aggregate with id 9"):
        Users({}).get(9)
    with pytest.raises(LookupError):
        Repository().get(1)


def test_add_then_get_and_conflicting_copy() -> None:
    users, user = Users({}), User(1, "ann")
    assert users.add(user) is True
    assert users.add(user) is False
    assert users.get(1) is user
    with pytest.raises(ValueError, match="already holds another User with id 1"):
        users.add(User(1, "impostor"))


def test_add_refuses_objects_without_a_root() -> None:
    with pytest.raises(TypeError, match="self.root = Root\\(id\\)"):
        Repository().add(object())  # type: ignore[arg-type]


def test_commit_stores_and_rollback_restores_each_aggregate() -> None:
    database = {1: "ann", 2: "bob"}
    users = Users(database)
    ann, bob = users.get(1), users.get(2)
    ann.name, bob.name = "ANN", "BOB"
    users.rollback()
    assert (ann.name, bob.name) == ("ann", "bob")
    ann.name = "anne"
    users.commit()
    assert database == {1: "anne", 2: "bob"}
    users.close()
    assert users.aggregates == {}


class AsyncUsers(Repository[User]):
    def __init__(self) -> None:
        super().__init__()
        self.stored: list[int] = []

    async def load(self, id: Any) -> User | None:
        return User(id, "loaded")

    async def store(self, user: User) -> None:
        self.stored.append(user.id)


def test_async_hooks_through_the_async_methods() -> None:
    users = AsyncUsers()

    async def work() -> None:
        user = await users.aget(1)
        assert await users.aget(1) is user
        await users.acommit()

    asyncio.run(work())
    assert users.stored == [1]


def test_async_hooks_refused_on_the_sync_path() -> None:
    users = AsyncUsers()
    with pytest.raises(AsyncRequired, match="load is async"):
        users.get(1)
    users.add(User(1, "x"))
    with pytest.raises(AsyncRequired, match="store is async"):
        users.commit()


def test_one_session_at_a_time() -> None:
    users, first, second = Repository[User](), object(), object()
    users.claim(first)
    users.claim(first)
    with pytest.raises(SessionError, match="already used by another open session"):
        users.claim(second)
    users.release()
    users.claim(second)
