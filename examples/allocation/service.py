"""The service layer: commands, their handlers, and what the events cause.

Every handler reaches its unit of work through `Depends(current_session)` (the session
the web request, the worker or the script opened) and writes the read model through
`Depends(current_connection)`, in that session's transaction. Nothing is set on the bus
per request, so concurrent requests never see each other's repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from functools import partial

from sqlalchemy.ext.asyncio import AsyncConnection

from examples.allocation import views
from examples.allocation.domain import (
    Allocated,
    BatchAdded,
    Deallocated,
    OrderLine,
    Product,
)
from pybondi import (
    Command,
    Depends,
    Message,
    Messagebus,
    NotFound,
    Root,
    Session,
    current_connection,
    current_session,
)
from pybondi.messaging import Outbox
from pybondi.persistence import Registry, SQLStore, StateRepository

ALLOCATED = "allocation.allocated"
"""The topic of the integration event `Allocated`, for other services (`worker.py`)."""

registry = Registry()
registry.register(Product, name="allocation.Product")
for event_type in (BatchAdded, Allocated, Deallocated):
    registry.register(event_type, name=f"allocation.{event_type.__name__}")

bus = Messagebus()


@dataclass
class AddBatch(Command):
    reference: str
    sku: str
    qty: int
    eta: date | None = None


@dataclass
class Allocate(Command):
    orderid: str
    sku: str
    qty: int


@dataclass
class Deallocate(Command):
    orderid: str


class AlreadyAllocated(Exception):
    def __init__(self, orderid: str, batchref: str) -> None:
        super().__init__(f"Order {orderid} is allocated already, to batch {batchref}.")


class NotAllocated(LookupError):
    def __init__(self, orderid: str) -> None:
        super().__init__(f"Order {orderid} is not allocated.")


def unit_of_work(store: SQLStore) -> Session:
    """A session over the products of `store`, publishing through its outbox."""
    return Session(bus, StateRepository(store, Product, registry), Outbox(store, registry))


# Commands answer with their result: `await session.aexecute(command)` returns it.


@bus.register
async def add_batch(command: AddBatch, session: Session = Depends(current_session)) -> str:
    try:
        product = await session.repository.aget(command.sku)
    except NotFound:
        product = Product(Root(command.sku))
        session.add(product)
    product.add_batch(command.reference, command.qty, command.eta)
    return command.reference


@bus.register
async def allocate(
    command: Allocate,
    session: Session = Depends(current_session),
    connection: AsyncConnection = Depends(current_connection),
) -> str:
    if (known := await views.allocation(connection, command.orderid)) is not None:
        raise AlreadyAllocated(command.orderid, known.batchref)
    product: Product = await session.repository.aget(command.sku)
    return product.allocate(OrderLine(command.orderid, command.sku, command.qty))


@bus.register
async def deallocate(
    command: Deallocate,
    session: Session = Depends(current_session),
    connection: AsyncConnection = Depends(current_connection),
) -> str:
    # The read model knows which product holds the order: the order id is no product's id.
    allocation = await views.allocation(connection, command.orderid)
    if allocation is None:
        raise NotAllocated(command.orderid)
    product: Product = await session.repository.aget(allocation.sku)
    return product.deallocate(command.orderid)


# What the events cause: the read model, in the same transaction as the aggregate ...


@bus.on(BatchAdded)
async def record_batch(
    event: BatchAdded, connection: AsyncConnection = Depends(current_connection)
) -> None:
    row = {"reference": event.reference, "sku": event.sku, "purchased": event.qty}
    await connection.execute(views.batches.insert().values(row))


@bus.on(Allocated)
async def record_allocation(
    event: Allocated, connection: AsyncConnection = Depends(current_connection)
) -> None:
    row = {"orderid": event.orderid, "sku": event.sku, "qty": event.qty, "batchref": event.batchref}
    await connection.execute(views.allocations.insert().values(row))


@bus.on(Deallocated)
async def forget_allocation(
    event: Deallocated, connection: AsyncConnection = Depends(current_connection)
) -> None:
    table = views.allocations
    await connection.execute(table.delete().where(table.c.orderid == event.orderid))


# ... a message to other services, through the outbox, in that transaction too ...


@bus.on(Allocated)
def announce(event: Allocated, session: Session = Depends(current_session)) -> None:
    session.publisher.publish(ALLOCATED, Message(event))


# ... and, in this process only, what must wait until the unit of work committed.


@bus.on(BatchAdded, Allocated, Deallocated)
def forget_stock(
    event: BatchAdded | Allocated | Deallocated, session: Session = Depends(current_session)
) -> None:
    session.on_commit(partial(views.stock_cache.pop, event.sku, None))
