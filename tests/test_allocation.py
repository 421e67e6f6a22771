"""The allocation domain (tests/allocation.py), as written, through every repository and store.

Each test runs on memory, SQLite, PostgreSQL and MariaDB, sync and async.
"""

from __future__ import annotations

from datetime import date

import pytest

from pybondi import Messagebus, Session
from pybondi.persistence import MemoryStore, Records, Store
from pybondi.persistence.repositories import EventSourcedRepository, StateRepository
from pybondi.persistence.serialization import Registry
from tests.allocation import (
    Batch,
    OrderLine,
    Product,
    batch_state,
    build_batch,
    fields,
    registry,
    stocked,
)
from tests.conftest import Driver


def test_a_product_round_trips_through_a_state_repository(driver: Driver, store: Store) -> None:
    product = stocked()
    expected = fields(product)
    with driver.session(Session(Messagebus(), StateRepository(store, Product, registry()))) as s:
        s.add(product)

    repository = StateRepository(store, Product, registry())
    with driver.session(Session(Messagebus(), repository)):
        loaded = driver.io(repository, "get", "LAMP")
        assert fields(loaded) == expected
        assert [b.available_quantity for b in loaded.batches] == [5, 30, 25]
        assert {type(line) for b in loaded.batches for line in b._allocations} == {OrderLine}
        assert repository.versions == {"LAMP": 8}  # one per event the product published

    def stored(records: Records) -> object:
        return records.read("allocation.Product-LAMP")

    before = driver.io(store, "transact", stored)
    repository = StateRepository(store, Product, registry())
    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "LAMP")  # and change nothing
    assert driver.io(store, "transact", stored) == before  # not written: still version 8

    with driver.session(Session(Messagebus(), repository)):
        driver.io(repository, "get", "LAMP").allocate(OrderLine("order-9", "LAMP", 2))
    again = StateRepository(store, Product, registry())
    with driver.session(Session(Messagebus(), again)):
        changed = driver.io(again, "get", "LAMP")
        assert OrderLine("order-9", "LAMP", 2) in changed.batches[0]._allocations
        assert again.versions == {"LAMP": 9}


def test_a_product_round_trips_through_an_event_sourced_snapshot(
    driver: Driver, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def products() -> EventSourcedRepository[Product]:
        return EventSourcedRepository(
            store, Product, registry(), create=lambda sku: Product(sku, []), snapshot_every=4
        )

    product = stocked("DESK")
    with driver.session(Session(Messagebus(), products())) as session:
        session.add(product)  # 3 batches and 5 allocations: 8 events, a snapshot at 8
    expected = fields(product)

    snapshot = driver.io(store, "transact", lambda r: r.read_snapshot("allocation.Product-DESK"))
    assert snapshot.version == 8  # no event after it: loading builds from the snapshot alone
    loaded = registry().loads("allocation.Product", snapshot.schema, snapshot.data, id="DESK")
    assert fields(loaded) == expected

    repository = products()
    with driver.session(Session(Messagebus(), repository)):
        assert fields(driver.io(repository, "get", "DESK")) == expected
        assert repository.versions == {"DESK": 8}
    assert "snapshot" not in caplog.text  # neither skipped nor ignored


def test_a_batch_keeps_what_its_init_would_not_take() -> None:
    batch = Batch("b-1", "CHAIR", 10, date(2026, 1, 31))
    batch.allocate(OrderLine("o-1", "CHAIR", 4))
    types = registry()

    stored = types.dumps(batch)
    loaded = types.loads(*stored)

    assert stored.data == (
        '{"ref":"b-1","sku":"CHAIR","qty":10,"eta":"2026-01-31",'
        '"allocations":[{"orderid":"o-1","sku":"CHAIR","qty":4}]}'
    )
    assert vars(loaded) == vars(batch)
    assert loaded.available_quantity == 6


def test_an_event_sourced_product_needs_create_since_its_init_needs_batches() -> None:
    with pytest.raises(
        TypeError,
        match=r"made with Product\(id\) unless create= says otherwise; Product\(id\) cannot be "
        r"called \(missing a required argument: 'batches'\)\. Pass create=, a function of the id",
    ):
        EventSourcedRepository(MemoryStore(), Product, registry())


def lowered(id: str, sku: str, batches: list[Batch], version_number: int) -> Product:
    return Product(id.lower(), batches, version_number)  # not the id it is loaded with


def test_a_product_built_under_another_id_is_refused(driver: Driver, store: Store) -> None:
    with driver.session(Session(Messagebus(), StateRepository(store, Product, registry()))) as s:
        s.add(stocked())
    types = Registry()
    types.register(Product, name="allocation.Product", state=vars, build=lowered)
    types.register(Batch, name="allocation.Batch", state=batch_state, build=build_batch)

    repository = StateRepository(store, Product, types)
    with (
        pytest.raises(
            ValueError,
            match=r"get\('LAMP'\) loaded allocation.Product-LAMP, whose root id is 'lamp'.*check "
            r"that Product makes its root of the id it is loaded with \(the first parameter",
        ),
        driver.session(Session(Messagebus(), repository)),
    ):
        driver.io(repository, "get", "LAMP")
