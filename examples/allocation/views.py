"""The read model: tables that answer queries, written in each unit of work's transaction.

The handlers in `service.py` write `batches_view` and `allocations_view` through
`current_connection`, the connection whose transaction commits the aggregates: a row is
there exactly when its allocation committed. `allocated_view` is the projection's
(`projection.py`): it follows the event log, a little behind. The queries take any
`AsyncConnection`: the session's (a handler looking an order up) or a plain one of the
store's engine (a GET).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pybondi.persistence import SQLStore

metadata = sa.MetaData()

batches = sa.Table(
    "batches_view",
    metadata,
    sa.Column("reference", sa.String(50), primary_key=True),
    sa.Column("sku", sa.String(50), nullable=False, index=True),
    sa.Column("purchased", sa.Integer, nullable=False),
)

allocations = sa.Table(
    "allocations_view",
    metadata,
    sa.Column("orderid", sa.String(50), primary_key=True),
    sa.Column("sku", sa.String(50), nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
    sa.Column("batchref", sa.String(50), nullable=False, index=True),
)

allocated = sa.Table(  # kept by projection.py, from the event log
    "allocated_view",
    metadata,
    sa.Column("sku", sa.String(50), primary_key=True),
    sa.Column("qty", sa.Integer, nullable=False),
)

stock_cache: dict[str, dict[str, int]] = {}
"""What `stock(sku)` answered, per sku, in this process; emptied for a sku once a unit
of work that changed its product has committed (`service.forget_stock`)."""


def engine(store: SQLStore) -> AsyncEngine:
    """The store's engine, for connections of our own (queries, the views' tables)."""
    if not isinstance(store.engine, AsyncEngine):
        raise TypeError(
            f"The service's handlers await their store: give it SQLStore(url, "
            f"asynchronous=True), not {store!r}."
        )
    return store.engine


async def create_tables(store: SQLStore) -> None:
    """The store's tables (aggregates, events, outbox, inbox) and the views'."""
    await store.acreate_tables()
    async with engine(store).begin() as connection:
        await connection.run_sync(metadata.create_all)


async def allocation(
    connection: AsyncConnection, orderid: str
) -> sa.Row[tuple[str, str, int, str]] | None:
    """Where order `orderid` was allocated: (orderid, sku, qty, batchref), or None."""
    query = sa.select(allocations).where(allocations.c.orderid == orderid)
    return (await connection.execute(query)).one_or_none()


async def batch(connection: AsyncConnection, reference: str) -> sa.Row[tuple[str, str, int]] | None:
    """The batch `reference`, and so the product that holds it: (reference, sku, purchased)."""
    query = sa.select(batches).where(batches.c.reference == reference)
    return (await connection.execute(query)).one_or_none()


async def stock(connection: AsyncConnection, sku: str) -> dict[str, int]:
    """What each batch of `sku` has left, by reference."""
    allocated = sa.func.coalesce(sa.func.sum(allocations.c.qty), 0)
    query = (
        sa.select(batches.c.reference, batches.c.purchased - allocated)
        .join(allocations, allocations.c.batchref == batches.c.reference, isouter=True)
        .where(batches.c.sku == sku)
        .group_by(batches.c.reference, batches.c.purchased)
        .order_by(batches.c.reference)
    )
    return {reference: left for reference, left in await connection.execute(query)}


async def allocated_quantity(connection: AsyncConnection, sku: str) -> int:
    """How much of `sku` is allocated, as far as the projection has come."""
    query = sa.select(allocated.c.qty).where(allocated.c.sku == sku)
    return (await connection.execute(query)).scalar_one_or_none() or 0
