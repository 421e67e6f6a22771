"""The projections' checkpoints and leases (`ProjectionRecords`), on every store.

Each behaviour runs on the memory store, SQLite, PostgreSQL and MariaDB, through the
sync and the async drivers (`records.projections` inside `transact` / `atransact`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from pybondi.exceptions import ConcurrencyError
from pybondi.persistence import MessagingRecords, Store, StoredEvent
from pybondi.persistence.records import Checkpoint, ProjectionRecords
from tests.backends import Backend
from tests.conftest import Driver

T = TypeVar("T")

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)


def on(store: Store, driver: Driver, work: Callable[[ProjectionRecords], T]) -> T:
    """Run `work` on the store's projection records, in a transaction of its own."""

    def projections(records: Any) -> T:
        assert isinstance(records, MessagingRecords)
        return work(records.projections)

    result: T = driver.io(store, "transact", projections)
    return result


def test_a_projection_never_run_has_no_checkpoint_and_starts_at_0(
    store: Store, driver: Driver
) -> None:
    assert on(store, driver, lambda p: p.get("balances")) is None
    assert on(store, driver, lambda p: p.claim("balances", "a", now=NOW, until=LATER)) == 0
    assert on(store, driver, lambda p: p.get("balances")) == Checkpoint("balances", 0, "a", LATER)


def test_a_lease_is_one_runners_until_it_expires_or_is_released(
    store: Store, driver: Driver
) -> None:
    assert on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=LATER)) == 0
    # Another runner waits while the lease holds; its holder renews it at will.
    assert on(store, driver, lambda p: p.claim("view", "b", now=NOW, until=LATER)) is None
    assert on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=LATER)) == 0
    # Expired: another takes it over.
    after = LATER + timedelta(seconds=1)
    assert on(store, driver, lambda p: p.claim("view", "b", now=after, until=after)) == 0
    assert on(store, driver, lambda p: p.renew("view", "a", until=after)) is False
    assert on(store, driver, lambda p: p.renew("view", "b", until=LATER + LATER.resolution))
    # Released: free at once, for anyone.
    on(store, driver, lambda p: p.release("view", "a"))  # not its holder: nothing changes
    assert on(store, driver, lambda p: p.claim("view", "c", now=NOW, until=LATER)) is None
    on(store, driver, lambda p: p.release("view", "b"))
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 0, None, None)
    assert on(store, driver, lambda p: p.claim("view", "c", now=NOW, until=LATER)) == 0


def test_the_checkpoint_moves_only_for_its_holder_and_only_from_where_it_is(
    store: Store, driver: Driver
) -> None:
    on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=NOW))
    assert on(store, driver, lambda p: p.advance("view", "a", after=0, to=5, until=LATER))
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 5, "a", LATER)
    assert not on(store, driver, lambda p: p.advance("view", "a", after=0, to=9, until=LATER))
    assert not on(store, driver, lambda p: p.advance("view", "b", after=5, to=9, until=LATER))
    assert not on(store, driver, lambda p: p.advance("other", "a", after=0, to=9, until=LATER))
    # A claim gives the checkpoint back; another runner's claim too, once the lease ended.
    assert on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=LATER)) == 5
    after = LATER + timedelta(seconds=1)
    assert on(store, driver, lambda p: p.claim("view", "b", now=after, until=after)) == 5
    assert not on(store, driver, lambda p: p.advance("view", "a", after=5, to=9, until=LATER))
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 5, "b", after)


def test_a_reset_sets_the_checkpoint_back_to_0_for_the_holder_only(
    store: Store, driver: Driver
) -> None:
    on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=LATER))
    on(store, driver, lambda p: p.advance("view", "a", after=0, to=7, until=LATER))
    assert not on(store, driver, lambda p: p.reset("view", "b"))
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 7, "a", LATER)
    assert on(store, driver, lambda p: p.reset("view", "a"))
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 0, "a", LATER)


def test_projections_are_kept_apart_by_name(store: Store, driver: Driver) -> None:
    on(store, driver, lambda p: p.claim("one", "a", now=NOW, until=LATER))
    assert on(store, driver, lambda p: p.claim("two", "b", now=NOW, until=LATER)) == 0
    on(store, driver, lambda p: p.advance("one", "a", after=0, to=3, until=LATER))
    assert on(store, driver, lambda p: p.get("two")) == Checkpoint("two", 0, "b", LATER)
    # Names compare exactly: no collation folds case or trailing spaces together.
    assert on(store, driver, lambda p: p.get("ONE")) is None
    assert on(store, driver, lambda p: p.get("one ")) is None


def test_the_head_is_the_position_of_the_last_committed_event(store: Store, driver: Driver) -> None:
    assert on(store, driver, lambda p: p.head()) == 0

    def append(records: Any) -> None:
        records.append([StoredEvent(f"s-{n}", 1, "tests.Counted", 1, "{}") for n in range(3)])

    driver.io(store, "transact", append)
    assert on(store, driver, lambda p: p.head()) == 3


def test_a_transaction_reads_its_own_writes(store: Store, driver: Driver) -> None:
    def work(projections: ProjectionRecords) -> list[Any]:
        return [
            projections.claim("view", "a", now=NOW, until=LATER),
            projections.claim("view", "b", now=NOW, until=LATER),
            projections.advance("view", "a", after=0, to=4, until=LATER),
            projections.get("view"),
            projections.reset("view", "a"),
            projections.get("view"),
        ]

    assert on(store, driver, work) == [
        0,
        None,
        True,
        Checkpoint("view", 4, "a", LATER),
        True,
        Checkpoint("view", 0, "a", LATER),
    ]


def test_a_rolled_back_transaction_changes_nothing(store: Store, driver: Driver) -> None:
    on(store, driver, lambda p: p.claim("view", "a", now=NOW, until=LATER))

    def advance_then_fail(records: Any) -> None:
        records.projections.advance("view", "a", after=0, to=9, until=LATER)
        raise RuntimeError("the view's write failed")

    with pytest.raises(RuntimeError, match="the view's write failed"):
        driver.io(store, "transact", advance_then_fail)
    assert on(store, driver, lambda p: p.get("view")) == Checkpoint("view", 0, "a", LATER)


def test_two_transactions_advancing_from_one_checkpoint_never_both_commit(
    backend: Backend,
) -> None:
    store: Any = backend.store()  # a sync one: the second transaction runs in a thread
    if backend.name != "memory":
        store.create_tables()
    try:
        store.transact(lambda r: r.projections.claim("view", "a", now=NOW, until=LATER))
        first = store.begin()
        assert first.run(lambda r: r.projections.advance("view", "a", after=0, to=5, until=LATER))
        outcome: list[Any] = []

        def second() -> None:
            # A SQL store makes this wait for the first, then match nothing; the memory
            # store lets it go on, and fails its commit.
            transaction = store.begin()
            try:
                outcome.append(
                    transaction.run(
                        lambda r: r.projections.advance("view", "a", after=0, to=8, until=LATER)
                    )
                )
                transaction.commit()
            except ConcurrencyError as error:
                outcome.append(error)
            finally:
                transaction.close()

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(timeout=0.3)  # the SQL stores' second waits for the first
        try:
            first.commit()
            committed = [5]
        except ConcurrencyError:  # the memory store's second committed first
            committed = []
        first.close()
        thread.join()
        if outcome[0] is True and not isinstance(outcome[-1], ConcurrencyError):
            committed.append(8)
        assert len(committed) == 1, outcome
        assert store.transact(lambda r: r.projections.get("view")) == Checkpoint(
            "view", committed[0], "a", LATER
        )
    finally:
        if backend.name != "memory":
            store.dispose()
