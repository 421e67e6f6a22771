"""Given, when, then: test handlers and aggregates through a real session, without servers.

    accounts = EventSourcedRepository(MemoryStore(), Account, registry)
    scenario = Scenario(messagebus, accounts, dependencies={get_accounts: lambda: accounts})

    scenario.given_events("alice", Opened("alice"), Deposited("alice", 10))
    scenario.when(Withdraw("alice", 3)).then(Withdrawn("alice", 3))
    scenario.then_state("alice", balance=7)

    scenario.when(Withdraw("alice", 50)).then_raises(InsufficientFunds, match="has 7")
    scenario.then_state("alice", balance=7)  # rolled back: still 7

- **given** stores aggregates (`given(account)`) or an aggregate's past events
  (`given_events(id, *events)`) through the repository, in a unit of work of their own
  that dispatches nothing: they are history, and no handler runs for them.
- **when** (`await awhen` for async handlers) dispatches one command or event through
  your messagebus, in a `Session` over your repository and publisher, which commits or
  rolls back as in production. Whatever it raises is kept for the `then` methods.
- **then** checks what happened: `then(*events)` the domain events dispatched, in
  order; `then_raises(Error, match=...)` the error; `then_published((topic, payload),
  ...)` what the publisher delivered; `then_state(id, balance=7)` the aggregate as
  loaded again after the commit. A failure is an `AssertionError` that shows expected
  and actual side by side, or says what happened instead.

Each `when` is a new unit of work on the same repository, so a scenario can go on:
when, then, when again, then again.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, NamedTuple, Self, TypeVar

from pybondi.aggregate import Aggregate
from pybondi.exceptions import AsyncRequired, NotFound, short_repr
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, Message, Publisher
from pybondi.repository import Repository
from pybondi.session import Session
from pybondi.testing._diffs import count, differences, listing, sequence_diff
from pybondi.testing._given import Given, histories
from pybondi.testing._observers import RecordingBus, WatchedPublisher, WhenSession

__all__ = ["Scenario"]

A = TypeVar("A", bound=Aggregate)
Dependency = Callable[..., Any]

_AWHEN = "In a Scenario, run async handlers with `await scenario.awhen(...)`."
_STORING = "While the scenario stored what it was given, before the message of when()."
_MISSING = object()


class _Delivery(NamedTuple):
    """A message as `then_published` compares it: its topic and its payload."""

    topic: str
    payload: Any

    def __repr__(self) -> str:
        return repr(tuple(self))  # as the test wrote it: ('topic', payload)


class Scenario(Generic[A]):
    """A given/when/then test of your handlers and aggregates, through a real `Session`.

        scenario = Scenario(messagebus, accounts, dependencies={get_accounts: lambda: accounts})
        scenario.given(Account("alice", balance=10))
        scenario.when(Withdraw("alice", 3)).then(Withdrawn("alice", 3))

    Args:
        messagebus: your messagebus, with its handlers registered.
        repository: where aggregates live between units of work: a `StateRepository` or
            an `EventSourcedRepository` on a `MemoryStore`, or a `Repository` of yours
            that loads and stores. A bare `Repository` keeps nothing once a unit of work
            ends, so it is refused.
        publisher: the publisher the session commits (handlers that publish must use
            it); a new `pybondi.Publisher` by default.
        dependencies: dependency overrides set on the messagebus while `when` runs, and
            taken back afterwards, such as `{get_accounts: lambda: accounts}`.
        create: builds a blank aggregate from an id for `given_events`; by default the
            repository's `create` (`EventSourcedRepository`) or its aggregate type.

    After each `when`: `events` holds the domain events dispatched (not the message
    given to `when`, nor `Added`, `Committed` and `RolledBack`), `published` the
    `(topic, Message)` pairs the publisher delivered, `error` what `when` raised (or
    None), and `session` the session it ran in.
    """

    def __init__(
        self,
        messagebus: Messagebus,
        repository: Repository[A],
        *,
        publisher: BasePublisher | None = None,
        dependencies: Mapping[Dependency, Dependency] | None = None,
        create: Callable[[Any], A] | None = None,
    ) -> None:
        if not isinstance(messagebus, Messagebus):
            raise TypeError(
                f"Scenario() takes your Messagebus first, got {type(messagebus).__name__}: "
                f"{short_repr(messagebus)}."
            )
        if not isinstance(repository, Repository):
            raise TypeError(
                f"Scenario() takes a pybondi Repository second, got "
                f"{type(repository).__name__}: {short_repr(repository)}."
            )
        if type(repository) is Repository:
            raise ValueError(
                "A bare Repository keeps aggregates only in its identity map, which every "
                "unit of work empties: what the scenario is given would be gone by when(). "
                "Use a repository that stores, such as StateRepository(MemoryStore(), "
                "Account, registry), or a Repository subclass with load() and store()."
            )
        if publisher is not None and not isinstance(publisher, BasePublisher):
            raise TypeError(
                f"Scenario(publisher=...) takes a pybondi BasePublisher, such as "
                f"pybondi.Publisher(), got {type(publisher).__name__}: {short_repr(publisher)}."
            )
        self.messagebus = messagebus
        self.repository = repository
        self.publisher = publisher if publisher is not None else Publisher()
        self.dependencies: dict[Dependency, Dependency] = dict(dependencies or {})
        _check_dependencies(self.dependencies)
        self.events: list[Event] = []
        self.published: list[tuple[str, Message[Any]]] = []
        self.error: Exception | None = None
        self.session: Session | None = None
        self._given = Given(repository, create)
        self._known: dict[Any, None] = {}  # ids given or committed, loaded after each when
        self._states: dict[Any, A] = {}
        self._when: Command | Event | None = None
        self._watched = WatchedPublisher(self.publisher)
        self._expected = False  # whether then_raises expected the error

    # Given ------------------------------------------------------------------------------

    def given(self, *aggregates: A) -> Self:
        """Store these aggregates, as they are, before the next `when`.

        An aggregate built through its own methods brings the events it published:
        they are stored as its history (an `EventSourcedRepository` stores nothing else).
        """
        for aggregate in aggregates:
            self._known[self._given.aggregate(aggregate)] = None
        return self

    def given_events(self, id: Any, *events: Event) -> Self:
        """Store these events as the history of aggregate `id` before the next `when`.

        Each is applied, in order, with the aggregate's `apply(event)`: to the stored
        aggregate if there is one, else to a blank one built by `create(id)`. An
        event-sourced repository keeps them as the aggregate's stream; a state one
        keeps the resulting state, and the events in its log.
        """
        self._given.events(id, events)
        self._known[id] = None
        return self

    def _store(self) -> None:
        if items := self._given.take():
            try:
                # A bus without handlers: the given events are history, not news.
                with Session(Messagebus(), self.repository) as session:
                    for id in histories(items):
                        _found(session.repository.get, id)
                    self._given.put(session, items)
            except Exception as error:
                error.add_note(_STORING)
                raise

    async def _astore(self) -> None:
        if items := self._given.take():
            try:
                async with Session(Messagebus(), self.repository) as session:
                    for id in histories(items):
                        await _afound(session.repository.aget, id)
                    self._given.put(session, items)
            except Exception as error:
                error.add_note(_STORING)
                raise

    # When -------------------------------------------------------------------------------

    def when(self, message: Command | Event) -> Self:
        """Store what was given, then dispatch `message` in a session, and commit.

        What the message raises is kept for `then_raises`, not raised; what goes wrong
        before or after (storing what was given, loading the state) is raised.
        """
        session = self._begin(message)
        try:
            self._store()
            with self._overriding():
                try:
                    with session:
                        session.dispatch(message)
                except AsyncRequired:
                    raise
                except Exception as error:
                    self.error = error
            self._load(session.held)
        except AsyncRequired as error:
            error.add_note(_AWHEN)
            raise
        return self

    async def awhen(self, message: Command | Event) -> Self:
        """`when` on the async path, for async handlers, dependencies and repositories."""
        session = self._begin(message)
        await self._astore()
        with self._overriding():
            try:
                async with session:
                    await session.adispatch(message)
            except Exception as error:
                self.error = error
        await self._aload(session.held)
        return self

    def _begin(self, message: Command | Event) -> WhenSession:
        if not isinstance(message, Command | Event):
            raise TypeError(
                f"when() takes a Command or an Event, got {type(message).__name__}: "
                f"{short_repr(message)}."
            )
        recorder = RecordingBus(self.messagebus, message)
        self._watched = WatchedPublisher(self.publisher)
        session = WhenSession(recorder, self.repository, self._watched)
        self._when, self.session, self.error, self._expected = message, session, None, False
        self.events, self.published = recorder.events, self._watched.delivered
        self._states = {}
        return session

    @contextmanager
    def _overriding(self) -> Iterator[None]:
        overrides = self.messagebus.dependency_overrides
        _check_dependencies(self.dependencies)  # all checked before any is set
        previous = {dependency: overrides.get(dependency) for dependency in self.dependencies}
        overrides.update(self.dependencies)
        try:
            yield
        finally:
            for dependency, replacement in previous.items():
                if replacement is None:
                    del overrides[dependency]
                else:
                    overrides[dependency] = replacement

    def _load(self, held: list[Any]) -> None:
        self._known.update(dict.fromkeys(held))
        # A unit of work that only reads: closed, never committed.
        session = Session(Messagebus(), self.repository).begin()
        try:
            for id in self._known:
                if (aggregate := _found(session.repository.get, id)) is not None:
                    self._states[id] = aggregate
        finally:
            session.close()

    async def _aload(self, held: list[Any]) -> None:
        self._known.update(dict.fromkeys(held))
        session = await Session(Messagebus(), self.repository).abegin()
        try:
            for id in self._known:
                if (aggregate := await _afound(session.repository.aget, id)) is not None:
                    self._states[id] = aggregate
        finally:
            await session.aclose()

    # Then -------------------------------------------------------------------------------

    def then(self, *events: Event) -> Self:
        """Assert that `when` succeeded and dispatched exactly these events, in order.

        With no events, assert that it dispatched none. Events are compared with ==.
        """
        expected = list(events)
        if (error := self._error("then")) is not None:
            raise AssertionError(
                f"Expected {count(len(expected), 'event')}, but {self._what} raised {error!r}."
            ) from error
        if self.events != expected:
            raise AssertionError(
                sequence_diff(expected, self.events, noun="event", verb="published")
            )
        return self

    def then_raises(
        self, error_type: type[BaseException], match: str | re.Pattern[str] | None = None
    ) -> Self:
        """Assert that `when` raised an `error_type` whose message matches `match`.

        `match` is searched for in `str(error)` with `re.search`, as `pytest.raises`
        does. Once the error is expected, `state` and `then_state` may look at what
        the rollback left.
        """
        error = self._error("then_raises")
        wanted = error_type.__name__
        if error is None:
            published = ":\n" + "\n".join(listing(self.events)) if self.events else "."
            raise AssertionError(
                f"Expected {self._what} to raise {wanted}, but it succeeded and published "
                f"{count(len(self.events), 'event')}{published}"
            )
        if not isinstance(error, error_type):
            raise AssertionError(
                f"Expected {self._what} to raise {wanted}, but it raised {error!r}."
            ) from error
        if match is not None and not re.search(match, str(error)):
            pattern = match.pattern if isinstance(match, re.Pattern) else match
            raise AssertionError(
                f"{self._what} raised {type(error).__name__} as expected, but its message "
                f"{str(error)!r} does not match {pattern!r}."
            ) from error
        self._expected = True
        return self

    def then_published(self, *messages: tuple[str, Any]) -> Self:
        """Assert that the publisher delivered exactly these `(topic, payload)` pairs.

        In the order published; payloads are compared with ==. `published` holds the
        whole `Message`s, for checks on their headers or sender.
        """
        expected = [_delivery(pair) for pair in messages]
        if (error := self._error("then_published")) is not None:
            raise AssertionError(
                f"Expected {count(len(expected), 'message')}, but {self._what} raised "
                f"{error!r}, and a session that fails delivers nothing."
            ) from error
        if self._watched.blind:
            raise TypeError(
                f"then_published() sees what a BufferedPublisher (such as pybondi.Publisher) "
                f"delivers; {type(self.publisher).__name__} is not one. Read what your "
                f"publisher sent yourself, or give the scenario a pybondi.Publisher."
            )
        actual = [_Delivery(topic, message.payload) for topic, message in self.published]
        if actual != expected:
            raise AssertionError(sequence_diff(expected, actual, noun="message", verb="delivered"))
        return self

    def then_state(self, id: Any, /, **attributes: Any) -> Self:
        """Assert that aggregate `id`, as loaded again after `when`, has these attributes.

            scenario.then_state("alice", balance=7, owner="Alice")

        Only the attributes named are compared, with ==.
        """
        aggregate = self.state(id)
        lines = []
        for name, value in attributes.items():
            actual = getattr(aggregate, name, _MISSING)
            if actual is _MISSING:
                lines.append(f"{name}: expected {short_repr(value)}, but there is no {name}")
            else:
                lines += differences(value, actual, "stored", name)
        if lines:
            raise AssertionError(
                f"{type(aggregate).__name__} {id!r}, as stored after {self._what}, is not "
                f"as expected:\n" + "\n".join(f"  {line}" for line in lines)
            )
        return self

    def state(self, id: Any) -> A:
        """Aggregate `id` as loaded from the repository after the last `when`.

        The scenario loads the aggregates it was given and those the session held when
        it committed. If `when` raised, call `then_raises` first: the state is then
        what the rollback left.
        """
        error = self._error("state")
        if error is not None and not self._expected:
            raise AssertionError(
                f"{self._what} raised {error!r}. If it should, say so with "
                f"then_raises({type(error).__name__}) before looking at the state."
            ) from error
        if id in self._states:
            return self._states[id]
        if id in self._known:
            raise AssertionError(
                f"{type(self.repository).__name__} has no aggregate {id!r} after {self._what}."
            )
        raise AssertionError(
            f"The scenario did not load {id!r}: it loads the aggregates it was given and "
            f"those its session held when it committed, which are {list(self._known)!r}."
        )

    def _error(self, method: str) -> Exception | None:
        """What `when` raised; refuses to answer before any `when`."""
        if self._when is None:
            raise RuntimeError(
                f"{method}() checks what when() did: call scenario.when(message) (or "
                f"await scenario.awhen(message)) first."
            )
        return self.error

    @property
    def _what(self) -> str:
        return short_repr(self._when)

    def __repr__(self) -> str:
        ran = "before when()" if self._when is None else f"after when({self._what})"
        return f"<Scenario {ran} on {type(self.repository).__name__}>"


def _found(get: Callable[[Any], A], id: Any) -> A | None:
    try:
        return get(id)
    except NotFound:
        return None


async def _afound(aget: Callable[[Any], Awaitable[A]], id: Any) -> A | None:
    try:
        return await aget(id)
    except NotFound:
        return None


def _delivery(pair: object) -> _Delivery:
    if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str):
        raise TypeError(
            f"then_published() takes (topic, payload) pairs, got {short_repr(pair)}, as in "
            f"then_published(('withdrawals', {{'account': 'alice'}}))."
        )
    return _Delivery(*pair)


def _check_dependencies(dependencies: Mapping[Dependency, Dependency]) -> None:
    for original, replacement in dependencies.items():
        if not callable(original) or not callable(replacement):
            raise TypeError(
                f"dependencies maps each dependency to its replacement, both callables, as "
                f"in {{get_accounts: lambda: accounts}}; got {short_repr(original)}: "
                f"{short_repr(replacement)}."
            )
