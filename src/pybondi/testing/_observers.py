"""What a scenario puts around the user's messagebus, publisher and session to watch them.

Each one passes every call on unchanged and takes note on the way: the domain events
dispatched, the messages delivered, the aggregates held at commit. None changes what
the user's objects do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pybondi.events import Added, Committed, RolledBack
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, BufferedPublisher, Message
from pybondi.repository import Repository
from pybondi.session import Session

if TYPE_CHECKING:
    from pybondi.persistence.store import Transaction

__all__ = ["RecordingBus", "WatchedPublisher", "WhenSession"]

# What a session says about every aggregate it holds: not the domain's own events.
_LIFECYCLE = (Added, Committed, RolledBack)


class RecordingBus(Messagebus):
    """The user's messagebus, noting each domain event a session dispatches through it.

    A session calls only `handle`, `ahandle` and `listens`; they go to the user's bus,
    whose handlers and dependency overrides are the ones that run. The message given
    to `when` is not noted, nor are `Added`, `Committed` and `RolledBack`.
    """

    def __init__(self, messagebus: Messagebus, when: Command | Event) -> None:
        super().__init__()  # its own tables stay empty: every call goes to `inner`
        self.inner = messagebus
        self.events: list[Event] = []
        self._when: Command | Event | None = when

    def listens(self, event_type: type[Event]) -> bool:
        """Whether the user's messagebus listens to `event_type`."""
        return self.inner.listens(event_type)

    def handle(self, message: Command | Event) -> Any:
        """Note the message, then handle it with the user's messagebus."""
        self._note(message)
        return self.inner.handle(message)

    async def ahandle(self, message: Command | Event) -> Any:
        """Note the message, then handle it with the user's messagebus, awaiting it."""
        self._note(message)
        return await self.inner.ahandle(message)

    def _note(self, message: Command | Event) -> None:
        if message is self._when:
            self._when = None  # the first message handled; the same object again counts
        elif isinstance(message, Event) and not isinstance(message, _LIFECYCLE):
            self.events.append(message)


class WatchedPublisher(BasePublisher):
    """The user's publisher, noting the messages it delivers when the session commits.

    It sees them if the publisher buffers them where `pending()` shows them, as every
    `BufferedPublisher` does (`pybondi.Publisher` among them); `blind` says it cannot.
    """

    def __init__(self, publisher: BasePublisher) -> None:
        self.inner = publisher
        self.blind = not isinstance(publisher, BufferedPublisher)
        self.delivered: list[tuple[str, Message[Any]]] = []

    def publish(self, topic: str, message: Message[Any]) -> None:
        """Buffer the message in the user's publisher."""
        self.inner.publish(topic, message)

    def begin(self) -> object | None:
        """Begin the user's publisher's transaction."""
        return self.inner.begin()

    def current(self) -> object | None:
        """The transaction the user's publisher writes to."""
        return self.inner.current()

    def join(self, transaction: Transaction[Any] | None) -> None:
        """Let the user's publisher join the session's store transaction."""
        self.inner.join(transaction)

    def prepare(self) -> Any:
        """Let the user's publisher prepare for the commit."""
        return self.inner.prepare()

    def commit(self) -> Any:
        """Deliver through the user's publisher, noting what it delivered."""
        pending = self._pending()
        result = self.inner.commit()
        if result is None:  # an awaitable is refused by the session: nothing left yet
            self.delivered += pending
        return result

    def rollback(self) -> Any:
        """Roll the user's publisher back."""
        return self.inner.rollback()

    def close(self) -> Any:
        """Close the user's publisher."""
        return self.inner.close()

    async def abegin(self) -> object | None:
        """`begin`, awaited."""
        return await self.inner.abegin()

    async def aprepare(self) -> None:
        """`prepare`, awaited."""
        await self.inner.aprepare()

    async def acommit(self) -> None:
        """`commit`, awaited."""
        pending = self._pending()
        await self.inner.acommit()
        self.delivered += pending

    async def arollback(self) -> None:
        """`rollback`, awaited."""
        await self.inner.arollback()

    async def aclose(self) -> None:
        """`close`, awaited."""
        await self.inner.aclose()

    def _pending(self) -> list[tuple[str, Message[Any]]]:
        inner = self.inner
        return inner.pending() if isinstance(inner, BufferedPublisher) else []


class WhenSession(Session):
    """A session that remembers the ids of the aggregates it held when it committed."""

    __slots__ = ("held",)

    def __init__(
        self, messagebus: Messagebus, repository: Repository[Any], publisher: BasePublisher
    ) -> None:
        super().__init__(messagebus, repository, publisher)
        self.held: list[Any] = []

    def commit(self) -> None:
        """Commit, then note the ids (before closing empties the identity map)."""
        super().commit()
        self.held = list(self.repository.aggregates)

    async def acommit(self) -> None:
        """`commit` for the async path."""
        await super().acommit()
        self.held = list(self.repository.aggregates)
