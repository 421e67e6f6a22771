"""Projections: views of a store's event log, kept up to date from a checkpoint.

    projection = Projection("balances", registry)

    @projection.on
    def deposited(event: Deposited, connection: Connection = Depends(current_connection)):
        connection.execute(upsert_balance, {"account": event.account, "amount": event.amount})

    runner = ProjectionRunner(projection, store)
    runner.catch_up()          # or: await runner.run(), or `pybondi project module:projection`

Each batch of events is handled in one transaction that also moves the projection's
checkpoint, so each event's effect happens exactly once:

- the runner reads up to `batch_size` events of the log after the checkpoint (the log is
  gap-free and in commit order, so none is ever passed over), moves the checkpoint past
  them, and dispatches the ones the projection handles, decoded, in a `Session` over
  that same transaction; what the handlers write through `Depends(current_connection)`
  (SQL stores) or the session's repository (`Projection(..., repository=...)`, every
  store) commits with the checkpoint, or rolls back with it. Events of other types are
  skipped without being decoded.
- One runner at a time works on a projection: it holds a lease, renewed as it goes. A
  second one waits, and takes over from the checkpoint when the lease expires (or at
  once, when the first stops and gives it back). Even two runners that both believe they
  hold it never commit the same events twice: the checkpoint moves only from where each
  read it, and the second's batch rolls back.
- A failing batch rolls back and is retried after a backoff, one event at a time, so
  that the events before the failing one commit and the failing one is known. An event
  that fails `attempts` times in a row stops the projection with `ProjectionFailed`,
  naming the event: a projection never skips an event, as its view would then be wrong
  for good. A store out of reach is waited for, however long.
- `rebuild()` runs the projection's reset hook (`@projection.reset`) in the transaction
  that sets the checkpoint back to 0; the events are then applied to an empty view.
- The lag (the log's head minus the checkpoint) is logged while behind, every
  `report_every` seconds, and once caught up.

On the memory store, exactly once holds for what handlers write through the session's
repository (a `StateRepository` on the same `MemoryStore` commits with the checkpoint).
What a handler does to objects of its own happens when it runs: a batch that fails and
is retried does it again, unless it is done in `session.on_commit(...)`. And the whole
store lives only as long as the process.
"""

from typing import TYPE_CHECKING

from pybondi import _lazy

if TYPE_CHECKING:  # what __getattr__ imports on first use, for type checkers
    from pybondi.exceptions import ProjectionFailed as ProjectionFailed
    from pybondi.exceptions import ProjectionHeld as ProjectionHeld
    from pybondi.projection.base import Projection as Projection
    from pybondi.projection.base import ProjectionReset as ProjectionReset
    from pybondi.projection.base import stored_event as stored_event
    from pybondi.projection.runner import ProjectionRunner as ProjectionRunner

__all__ = [
    "Projection",
    "ProjectionFailed",
    "ProjectionHeld",
    "ProjectionReset",
    "ProjectionRunner",
    "stored_event",
]

_MODULES = {
    "pybondi.projection.base": ["Projection", "ProjectionReset", "stored_event"],
    "pybondi.exceptions": ["ProjectionFailed", "ProjectionHeld"],
    "pybondi.projection.runner": ["ProjectionRunner"],
}
_LAZY: _lazy.Lazy = {name: (module, None) for module, names in _MODULES.items() for name in names}

if not TYPE_CHECKING:
    __getattr__, __dir__ = _lazy.exports(__name__, globals(), _LAZY)

del TYPE_CHECKING
