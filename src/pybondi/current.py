"""The unit of work a handler runs in: `current_session` and `current_connection`.

    @bus.register
    def withdraw(command: Withdraw, session: Session = Depends(current_session)) -> int:
        account = session.repository.get(command.account)
        ...

A session is current from its beginning to its end, in the thread or task that opened it
(a session opened inside another's block is current until it closes). So each web
request, each worker's message, each script's unit of work reaches its own, and no
bus-wide override is needed.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from pybondi.depends import async_twin
from pybondi.exceptions import SessionError
from pybondi.persistence.store import Connected

if TYPE_CHECKING:
    from pybondi.session import Session

__all__ = ["current_connection", "current_session"]

_current: ContextVar[Session | None] = ContextVar("pybondi.session.current", default=None)


def current_session() -> Session:
    """The open session of this thread or task: use it as `Depends(current_session)`.

    Whichever opened it (a web request, a worker, a script): its `repository`, its
    `publisher`, its store `transaction`, and `on_commit`. Sessions opened inside another
    one's block are current until they close. Outside any open session, `SessionError`.
    """
    session = _current.get()
    if session is None:
        raise SessionError(
            "No session is open in this thread or task: current_session() is the session "
            "a handler runs in. Call it from a handler (Depends(current_session)), or "
            "inside a `with Session(...)` or `async with Session(...)` block."
        )
    return session


async def _acurrent_connection() -> Any:
    return await _connected(current_session()).awriting_connection()


@async_twin(_acurrent_connection)
def current_connection() -> Any:
    """The SQLAlchemy connection of the current session's transaction: `Depends(...)` it.

    A `Connection` in a sync session, an `AsyncConnection` (to await) in an async one,
    its writes begun: what a handler writes through it (a read model, a view) commits
    with the unit of work's aggregates, or rolls back with them, on SQLite, PostgreSQL
    and MariaDB alike. A session whose store keeps no SQL connection (the memory store,
    an in-memory repository) raises `SessionError`.
    """
    return _connected(current_session()).writing_connection()


_CONNECTED: dict[type, bool] = {}
"""Whether a kind of transaction is `Connected`: isinstance against an ABC, on every
`current_connection`, would cost as much as resolving the dependency."""


def _connected(session: Session) -> Connected:
    transaction = session.transaction
    kind = type(transaction)
    connected = _CONNECTED.get(kind)
    if connected is None:
        connected = _CONNECTED[kind] = isinstance(transaction, Connected)
    if not connected:
        where = (
            "no store" if transaction is None else f"a store without SQL ({transaction.store!r})"
        )
        raise SessionError(
            f"current_connection() is the SQL connection of the session's transaction, and "
            f"this session has {where}. Give the session a repository on a SQLStore, or "
            f"keep what the handlers write in the repository's aggregates instead."
        )
    return cast("Connected", transaction)  # isinstance said so, once for its type
