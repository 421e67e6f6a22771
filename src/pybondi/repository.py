"""Repositories: where aggregates are stored and restored, with an identity map.

Subclass `Repository` and override what your storage needs:

- `store(aggregate)`: persist it; called for each aggregate on `commit()`.
- `restore(aggregate)`: bring it back to its stored state; called on `rollback()`.
- `load(id)`: return the stored aggregate, or None if there is none; used by `get(id)`.
- `begin()` / `close()`: open and release whatever a unit of work needs.
- `record(aggregate, events)`: see the events the session takes from each root.
- `join(transaction)`: write in a store transaction the session was given (store
  repositories do; the in-memory one has none to write in).

Each hook may be written `async def`; then use the repository through the async path
(`async with Session(...)`, `await repository.acommit()`). The base class keeps
aggregates only in its identity map, which makes it the in-memory default.

A repository serves one session at a time: its identity map is that unit of work's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from pybondi._awaiting import maybe_await, refuse_awaitable
from pybondi.aggregate import Aggregate, Root
from pybondi.exceptions import NotFound, SessionError, report_failures, short_repr
from pybondi.messages import Event

if TYPE_CHECKING:
    from pybondi.persistence.store import Transaction

__all__ = ["Repository"]

_INSTEAD = "`async with Session(...)` or the repository's a-methods"

A = TypeVar("A", bound=Aggregate)

# The hooks a session calls on each unit of work. Those a class leaves as they are here
# do nothing (`close` only clears the identity map), so a session skips their calls.
_HOOKS = ("begin", "join", "record", "store", "commit", "close", "abegin", "acommit", "aclose")


class Repository(Generic[A]):
    """Stores and restores aggregates, keeping one object per id (the identity map).

    Attributes:
        aggregates: the identity map, by id.
        transaction: the store transaction this repository reads and writes in during a
            unit of work, if it keeps aggregates in a store (None here); the session's
            publisher (the outbox) joins it.
    """

    transaction: Transaction[Any] | None = None

    # The names of `_HOOKS` the class overrides, set for each subclass.
    _overridden: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._overridden = frozenset(
            name for name in _HOOKS if getattr(cls, name) is not getattr(Repository, name)
        )

    def __init__(self) -> None:
        self.aggregates: dict[Any, A] = {}

    # Hooks for subclasses ---------------------------------------------------------------

    def load(self, id: Any) -> A | Awaitable[A | None] | None:
        """Return the stored aggregate with this id, or None. Override to read storage."""
        return None

    def store(self, aggregate: A) -> Awaitable[None] | None:
        """Persist an aggregate. Override to write storage; the default keeps it in memory."""

    def restore(self, aggregate: A) -> Awaitable[None] | None:
        """Bring an aggregate back to its stored state. Override to read storage."""

    def begin(self) -> Awaitable[None] | None:
        """Start a unit of work. Override to open a connection or a transaction."""

    def join(self, transaction: Transaction[Any]) -> None:
        """Read and write in `transaction`, given to the session, for the next unit of work.

        The in-memory repository keeps its aggregates in no store: it has nothing to
        write there, and the session commits the transaction itself.
        """

    def record(self, aggregate: A, events: Iterable[Event]) -> None:
        """Take note of events an aggregate published, as the session dispatches them.

        The session calls it before it clears the root's events. The base class needs
        them for nothing; repositories that store events keep them until `commit`.
        """

    # The identity map -------------------------------------------------------------------

    def add(self, aggregate: A) -> bool:
        """Put an aggregate in the identity map; return False if it was already there.

        A different object with the same id is an error: one unit of work holds one
        object per aggregate, so that no change is silently lost.
        """
        root = getattr(aggregate, "root", None)
        if root.__class__ is not Root and not isinstance(root, Root):
            raise TypeError(
                f"A repository holds aggregates with a root (self.root = Root(id)), got "
                f"{type(aggregate).__name__}: {short_repr(aggregate)}."
            )
        id = root.id
        existing = self.aggregates.get(id)
        if existing is aggregate:
            return False
        if existing is not None:
            raise ValueError(
                f"{type(self).__name__} already holds another {type(existing).__name__} with "
                f"id {id!r}. Get it with repository.get({id!r}) instead of adding a second copy."
            )
        self.aggregates[id] = aggregate
        return True

    def get(self, id: Any) -> A:
        """The aggregate with this id: from the identity map, else from `load`.

        Raises `NotFound` if there is none.
        """
        aggregate = self.aggregates.get(id)
        if aggregate is None:
            loaded = self.load(id)
            refuse_awaitable(loaded, self.load, "`await repository.aget(id)`")
            aggregate = self._admit(id, cast("A | None", loaded))
        return aggregate

    async def aget(self, id: Any) -> A:
        """`get` for a repository whose `load` may be async."""
        aggregate = self.aggregates.get(id)
        if aggregate is None:
            aggregate = self._admit(id, await maybe_await(self.load(id)))
        return aggregate

    def _admit(self, id: Any, loaded: A | None) -> A:
        if loaded is None:
            raise NotFound(self, id)
        self.add(loaded)
        return loaded

    def __iter__(self) -> Iterator[A]:
        return iter(self.aggregates.values())

    # The unit of work -------------------------------------------------------------------

    def commit(self) -> None:
        """Store every aggregate in the identity map; the first failure stops it."""
        for aggregate in self.aggregates.values():
            if (stored := self.store(aggregate)) is not None:
                refuse_awaitable(stored, self.store, _INSTEAD)

    def rollback(self) -> None:
        """Restore every aggregate, even when restoring one fails.

        The first failure is raised afterwards, with the others noted on it.
        """
        failures: list[BaseException] = []
        for aggregate in self.aggregates.values():
            try:
                refuse_awaitable(self.restore(aggregate), self.restore, _INSTEAD)
            except Exception as failure:
                failures.append(failure)
        report_failures(failures)

    def close(self) -> Awaitable[None] | None:
        """End the unit of work: forget the aggregates.

        Override to release a connection too (and call `super().close()`).
        """
        self.aggregates.clear()
        return None

    async def abegin(self) -> None:
        """`begin`, awaited if the hook is async."""
        await maybe_await(self.begin())

    async def acommit(self) -> None:
        """`commit`, awaiting `store` where it is async."""
        for aggregate in self.aggregates.values():
            await maybe_await(self.store(aggregate))

    async def arollback(self) -> None:
        """`rollback`, awaiting `restore` where it is async."""
        failures: list[BaseException] = []
        for aggregate in self.aggregates.values():
            try:
                await maybe_await(self.restore(aggregate))
            except Exception as failure:
                failures.append(failure)
        report_failures(failures)

    async def aclose(self) -> None:
        """`close`, awaited if it is async."""
        await maybe_await(self.close())

    # One session at a time --------------------------------------------------------------

    def claim(self, session: object) -> None:
        """Reserve the repository for a session; a second open session is an error."""
        # dict.setdefault is atomic, so two threads cannot both claim the repository.
        if self.__dict__.setdefault("_owner", session) is not session:
            raise SessionError(
                f"This {type(self).__name__} is already used by another open session. "
                f"A repository holds one unit of work: give each session its own, as in "
                f"Session(messagebus, {type(self).__name__}(), publisher)."
            )

    def release(self) -> None:
        """Let another session use the repository."""
        self.__dict__.pop("_owner", None)
