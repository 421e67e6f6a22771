"""Repositories on a store: state-stored, in your own table, or event-sourced; sync and async.

    registry = Registry()
    registry.register(Account, name="accounts.Account")
    registry.register(Deposited, name="accounts.Deposited")

    store = SQLStore("sqlite:///bank.db")
    store.create_tables()
    with Session(messagebus, StateRepository(store, Account, registry), publisher) as session:
        account = session.repository.get("acc-1")     # NotFound if there is none
        session.execute(Deposit(account.id, 10))      # committed as one transaction

`StateRepository` keeps each aggregate's state as a JSON document beside its version,
and its events in the log. `TableRepository` keeps it as a row of a SQL table of yours.
`EventSourcedRepository` keeps only events, rebuilds each aggregate from its stream (from
a snapshot, if it has one), and calls its `apply(event)`.

All three open one store transaction per unit of work: `commit()` writes every changed
aggregate, with its version checked, and every event its aggregates published, then
commits; a stale version raises `ConcurrencyError` and nothing is written. Each step is
a sync function of the transaction's records, which async stores run without blocking:
the logic is written once. On `rollback()` the identity map is emptied, so that the next
`get` reads the stored state again.
"""

from pybondi.persistence.repositories.base import StoreRepository
from pybondi.persistence.repositories.eventsourced import EventSourcedRepository
from pybondi.persistence.repositories.state import StateRepository
from pybondi.persistence.repositories.table import TableRepository

__all__ = ["EventSourcedRepository", "StateRepository", "StoreRepository", "TableRepository"]
