"""The domain: products hold batches of stock, and order lines are allocated to them.

An order line goes to the batch that can take it and arrives first: those in the
warehouse (no `eta`) before shipments, shipments by their date. A product that cannot
take the line raises `OutOfStock`, changing nothing. Nothing here knows about the web,
the database or the broker: the events say what happened, the handlers do the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from pybondi import Aggregate, Event, Root


@dataclass(frozen=True)
class OrderLine:
    orderid: str
    sku: str
    qty: int


@dataclass
class Batch:
    reference: str
    sku: str
    purchased: int
    eta: date | None = None
    allocations: set[OrderLine] = field(default_factory=set)

    @property
    def available(self) -> int:
        return self.purchased - sum(line.qty for line in self.allocations)

    def arrives(self) -> tuple[bool, date]:
        """Sorts the warehouse's stock (no eta) first, then shipments by date."""
        return (self.eta is not None, self.eta or date.min)


@dataclass
class BatchAdded(Event):
    reference: str
    sku: str
    qty: int
    eta: date | None = None


@dataclass
class Allocated(Event):
    orderid: str
    sku: str
    qty: int
    batchref: str


@dataclass
class Deallocated(Event):
    orderid: str
    sku: str
    qty: int
    batchref: str


class OutOfStock(Exception):
    """No batch of the product can take the order line."""

    def __init__(self, line: OrderLine) -> None:
        super().__init__(
            f"No batch of {line.sku} has {line.qty} left for order {line.orderid}: "
            f"add a batch, or order less."
        )
        self.line = line


@dataclass(eq=False)  # an aggregate is equal to another by id, not field by field
class Product(Aggregate):
    """A product, by sku (the root's id), and its batches."""

    root: Root
    batches: list[Batch] = field(default_factory=list)

    def add_batch(self, reference: str, qty: int, eta: date | None = None) -> None:
        self.batches.append(Batch(reference, self.id, qty, eta))
        self.root.publish(BatchAdded(reference, self.id, qty, eta))

    def allocate(self, line: OrderLine) -> str:
        """Allocate the line to the first batch to arrive that can take it; its reference."""
        candidates = [batch for batch in self.batches if batch.available >= line.qty]
        if not candidates:
            raise OutOfStock(line)
        batch = min(candidates, key=Batch.arrives)
        batch.allocations.add(line)
        self.root.publish(Allocated(line.orderid, line.sku, line.qty, batch.reference))
        return batch.reference

    def deallocate(self, orderid: str) -> str:
        """Take the order's line off its batch; the batch's reference."""
        for batch in self.batches:
            for line in batch.allocations:
                if line.orderid == orderid:
                    batch.allocations.remove(line)
                    self.root.publish(Deallocated(orderid, line.sku, line.qty, batch.reference))
                    return batch.reference
        raise LookupError(f"Order {orderid} is allocated to no batch of {self.id}.")
