"""The allocation service's domain, written as cosmicpython wrote it, stored with pybondi.

Products hold batches, batches hold order lines. `Product` is a plain aggregate whose id
is a domain field (`sku`, with `self.root = Root(sku)`); `Batch` is a plain entity whose
`__init__(ref, sku, qty, eta)` parameters are not its attribute names, with private
attributes (`_purchased_quantity`, `_allocations`, a set of `OrderLine`) and computed
properties; `OrderLine` is a frozen dataclass. Only what pybondi needs was changed: the
aggregate's root, and events published through it (with `apply`, so that the same
aggregate can be event-sourced).

`registry()` registers the domain the way the README documents: `Product` as it is, and
`Batch` with `state=` and `build=`, since its `__init__` does not take its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Optional

from pybondi import Aggregate, Event, Root
from pybondi.persistence.serialization import Registry


@dataclass(frozen=True)
class OrderLine:
    orderid: str
    sku: str
    qty: int


class Batch:
    def __init__(self, ref: str, sku: str, qty: int, eta: Optional[date]):  # noqa: UP045
        self.reference = ref
        self.sku = sku
        self.eta = eta
        self._purchased_quantity = qty
        self._allocations: set[OrderLine] = set()

    def __repr__(self) -> str:
        return f"<Batch {self.reference}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return False
        return other.reference == self.reference

    def __hash__(self) -> int:
        return hash(self.reference)

    def __gt__(self, other: Batch) -> bool:
        if self.eta is None:
            return False
        if other.eta is None:
            return True
        return self.eta > other.eta

    def allocate(self, line: OrderLine) -> None:
        if self.can_allocate(line):
            self._allocations.add(line)

    def deallocate(self, line: OrderLine) -> None:
        if line in self._allocations:
            self._allocations.remove(line)

    @property
    def allocated_quantity(self) -> int:
        return sum(line.qty for line in self._allocations)

    @property
    def available_quantity(self) -> int:
        return self._purchased_quantity - self.allocated_quantity

    def can_allocate(self, line: OrderLine) -> bool:
        return self.sku == line.sku and self.available_quantity >= line.qty


@dataclass
class BatchCreated(Event):
    ref: str
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
class OutOfStock(Event):
    sku: str


class Product(Aggregate):
    def __init__(self, sku: str, batches: list[Batch], version_number: int = 0):
        self.root = Root(sku)
        self.sku = sku
        self.batches = batches
        self.version_number = version_number

    def add_batch(self, ref: str, qty: int, eta: date | None) -> None:
        self._publish(BatchCreated(ref, self.sku, qty, eta))

    def allocate(self, line: OrderLine) -> str | None:
        batch = next((b for b in sorted(self.batches) if b.can_allocate(line)), None)
        if batch is None:
            self.root.publish(OutOfStock(line.sku))
            return None
        self._publish(Allocated(line.orderid, line.sku, line.qty, batch.reference))
        return batch.reference

    def _publish(self, event: Event) -> None:
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        if isinstance(event, BatchCreated):
            self.batches.append(Batch(event.ref, event.sku, event.qty, event.eta))
        elif isinstance(event, Allocated):
            batch = next(b for b in self.batches if b.reference == event.batchref)
            batch.allocate(OrderLine(event.orderid, event.sku, event.qty))
            self.version_number += 1


# How a Batch is stored and rebuilt: its __init__ takes ref and qty, not its attributes.


def batch_state(batch: Batch) -> dict[str, Any]:
    return {
        "ref": batch.reference,
        "sku": batch.sku,
        "qty": batch._purchased_quantity,
        "eta": batch.eta,
        "allocations": batch._allocations,
    }


def build_batch(
    ref: str, sku: str, qty: int, eta: date | None, allocations: set[OrderLine]
) -> Batch:
    batch = Batch(ref, sku, qty, eta)
    batch._allocations = allocations
    return batch


def registry() -> Registry:
    made = Registry()
    made.register(Product, name="allocation.Product")  # its first parameter takes the id
    made.register(Batch, name="allocation.Batch", state=batch_state, build=build_batch)
    for event in (BatchCreated, Allocated, OutOfStock):
        made.register(event, name=f"allocation.{event.__name__}")
    return made


def stocked(sku: str = "LAMP") -> Product:
    """A product with batches in stock and on their way, some of them allocated."""
    product = Product(sku, [])
    product.add_batch("in-stock", 20, None)
    product.add_batch("shipment-1", 30, date(2026, 3, 1))
    product.add_batch("shipment-2", 50, date(2026, 2, 1))
    for number, qty in enumerate([3, 25, 1, 7, 4]):
        product.allocate(OrderLine(f"order-{number}", sku, qty))
    return product


def fields(product: Product) -> dict[str, Any]:
    """Everything a product holds, its batches' private attributes included."""
    return {
        "id": product.id,
        **{name: value for name, value in vars(product).items() if name not in ("root", "batches")},
        "batches": [(type(batch), vars(batch)) for batch in product.batches],
    }
