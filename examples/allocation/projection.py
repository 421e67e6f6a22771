"""A projection: how much of each product is allocated, built from the event log.

The app's sessions append `Allocated` and `Deallocated` to the store's log as they
commit. This projection follows the log from its checkpoint and keeps `allocated_view`
(`views.allocated`): each batch of events commits with the checkpoint, in one
transaction, so each event counts exactly once, even across crashes. It runs beside
the app (which creates the table), one instance at a time (others wait for its lease):

    pybondi project examples.allocation.projection:projection     # PYBONDI_STORE_URL
    pybondi project examples.allocation.projection:projection --rebuild   # start over

Unlike the views the app writes in each request's transaction, this one lags the log
by what the runner has not projected yet; in exchange, it can be added, changed and
rebuilt at any time from the events already stored.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from examples.allocation.domain import Allocated, Deallocated
from examples.allocation.service import registry
from examples.allocation.views import allocated
from pybondi import Depends, current_connection
from pybondi.projection import Projection, ProjectionReset

projection = Projection("allocation.allocated", registry)


@projection.on
async def count_allocated(
    event: Allocated, connection: AsyncConnection = Depends(current_connection)
) -> None:
    await add(connection, event.sku, event.qty)


@projection.on
async def count_deallocated(
    event: Deallocated, connection: AsyncConnection = Depends(current_connection)
) -> None:
    await add(connection, event.sku, -event.qty)


@projection.reset
async def forget_all(
    reset: ProjectionReset, connection: AsyncConnection = Depends(current_connection)
) -> None:
    await connection.execute(allocated.delete())


async def add(connection: AsyncConnection, sku: str, qty: int) -> None:
    # Only the runner holding the lease writes the view: update, or insert the first row.
    update = allocated.update().where(allocated.c.sku == sku).values(qty=allocated.c.qty + qty)
    if (await connection.execute(update)).rowcount == 0:
        await connection.execute(allocated.insert().values(sku=sku, qty=qty))
