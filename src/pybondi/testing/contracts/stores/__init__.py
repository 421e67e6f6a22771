"""The store contract, as a pytest suite that your own store can run.

Every store of pybondi passes it (memory, SQLite, PostgreSQL, MariaDB), sync and async:
what `pybondi.persistence.records` and `pybondi.persistence.store` promise, checked
through `Transaction.run`/`commit` and through `arun`/`acommit`. To run it on yours,
describe your store in a `StoreTarget` and subclass `StoreContract` with a fixture
`store_target` that gives one:

    import pytest
    from pybondi.testing.contracts.stores import StoreContract, StoreTarget

    class MyTarget(StoreTarget):
        concurrent_claims_wait = True        # what your store does: see StoreTarget

        async def store(self, asynchronous: bool) -> Store:
            store = MyStore(URL, asynchronous=asynchronous, prefix=unique_prefix())
            await store.acreate_tables() if asynchronous else store.create_tables()
            return store

        async def dispose(self, store: Store) -> None:
            await store.adrop_tables()

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store_target(self) -> MyTarget:
            return MyTarget()

Each test runs twice, on the sync driver and on the async one (the fixture
`store_driver`), with a store of its own, made and disposed of on an event loop of the
test's own; its body is sync, and `Case` awaits each step on that loop for the async
driver. What a store cannot do is a capability flag of the target: a test of something
the target says it cannot do is skipped, with the reason; where stores differ in how
they keep a promise (two claims of one message at once), the flag says which way.

The parts, each a class of its own for a store that keeps only some: `RecordsContract`
(aggregates: records, events, snapshots, transactions, table rows), `OutboxContract`,
`InboxContract` and `DeadLetterContract` (a `MessagingStore`'s). The suite waits only
where the contract is about waiting: a transaction that must wait for another is given
`WAITING` seconds to show that it does.
"""

from __future__ import annotations

import pytest

# So that a failing check shows the values it compared, as in your own test modules.
pytest.register_assert_rewrite(
    *(f"{__name__}.{part}" for part in ("deadletters", "inbox", "outbox", "records", "target"))
)

from pybondi.testing.contracts.stores.deadletters import DeadLetterContract  # noqa: E402
from pybondi.testing.contracts.stores.inbox import InboxContract  # noqa: E402
from pybondi.testing.contracts.stores.outbox import OutboxContract  # noqa: E402
from pybondi.testing.contracts.stores.records import RecordsContract  # noqa: E402
from pybondi.testing.contracts.stores.target import WAITING, Case, StoreTarget  # noqa: E402

__all__ = [
    "WAITING",
    "Case",
    "DeadLetterContract",
    "InboxContract",
    "OutboxContract",
    "RecordsContract",
    "StoreContract",
    "StoreTarget",
]


class StoreContract(RecordsContract, OutboxContract, InboxContract, DeadLetterContract):
    """The suite: subclass it as `TestYourStore` with a fixture `store_target`."""
