"""Projections follow the log from a checkpoint, each event's effect once, on every store.

Each behaviour runs on the memory store, SQLite, PostgreSQL and MariaDB, through the
sync driver (`catch_up`, `rebuild`) and the async one (`acatch_up`, `arebuild`, `run`).
The view is kept as aggregates in a `StateRepository` on the same store (see
tests/projections.py); tests/test_projection_views.py writes SQL tables instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from pybondi import Depends, Event
from pybondi.exceptions import InvalidHandler, SessionError
from pybondi.persistence import Store, StoredEvent
from pybondi.projection import (
    Projection,
    ProjectionFailed,
    ProjectionHeld,
    ProjectionRunner,
    stored_event,
)
from tests.backends import AggregatesOnly
from tests.conftest import Driver
from tests.projections import (
    Deposited,
    Renamed,
    append,
    balances,
    checkpoint,
    deposits,
    expected,
    read_balances,
    registry,
)

T = TypeVar("T")


def runner(
    driver: Driver, store: Store, projection: Projection | None = None, **options: Any
) -> ProjectionRunner:
    options.setdefault("max_backoff", 0.01)
    made = projection or balances(driver.name == "async")
    return ProjectionRunner(made, store, **options)  # type: ignore[arg-type]


def catch_up(driver: Driver, projection_runner: ProjectionRunner) -> int:
    return driver.io(projection_runner, "catch_up")  # type: ignore[no-any-return]


def on_loop(driver: Driver, work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the driver's loop (a fresh one for the sync driver)."""
    if driver.name == "async":
        return driver.runner.run(work)  # type: ignore[union-attr]
    return asyncio.run(work)


def test_each_event_is_applied_once_and_the_checkpoint_follows_the_log(
    driver: Driver, store: Store
) -> None:
    first = deposits(250)
    append(driver, store, *first[:120])
    append(driver, store, Renamed("ada", "Ada"), *first[120:])
    projector = runner(driver, store, batch_size=100)
    assert catch_up(driver, projector) == 251
    assert read_balances(driver, store) == expected(first)
    assert checkpoint(driver, store).position == 251
    assert catch_up(driver, projector) == 0  # nothing new: nothing applied twice
    more = deposits(10, start=250)
    append(driver, store, *more)
    assert catch_up(driver, projector) == 10
    assert read_balances(driver, store) == expected(first + more)
    assert projector.handled == 260


def test_a_new_runner_goes_on_from_the_checkpoint(driver: Driver, store: Store) -> None:
    append(driver, store, *deposits(30))
    first = runner(driver, store, batch_size=7)
    assert catch_up(driver, first) == 30
    driver.io(first, "release")
    append(driver, store, *deposits(5, start=30))
    assert catch_up(driver, runner(driver, store)) == 5
    assert read_balances(driver, store) == expected(deposits(35))


def test_the_stored_event_reaches_the_handlers(driver: Driver, store: Store) -> None:
    seen: list[tuple[int, str]] = []
    projection = Projection("positions", registry)

    @projection.on
    def note(event: Deposited, at: StoredEvent = Depends(stored_event)) -> None:
        seen.append((at.position, at.stream))

    append(driver, store, *deposits(3))
    catch_up(driver, runner(driver, store, projection))
    assert seen == [(1, "bank"), (2, "bank"), (3, "bank")]
    with pytest.raises(SessionError, match="stored_event"):
        stored_event()


def test_events_the_projection_does_not_handle_are_skipped_undecoded(
    driver: Driver, store: Store
) -> None:
    unreadable = "{not json"
    append(
        driver,
        store,
        StoredEvent("renamed", 1, "tests.Renamed", 1, unreadable),  # registered, not handled
        StoredEvent("elsewhere", 1, "elsewhere.Thing", 1, unreadable),  # not even registered
        Deposited("ada", 5),
    )
    projector = runner(driver, store)
    assert catch_up(driver, projector) == 3
    assert read_balances(driver, store) == {"ada": (5, 1)}
    assert projector.handled == 1


def test_a_failing_batch_rolls_back_and_the_events_before_the_culprit_commit(
    driver: Driver, store: Store
) -> None:
    failures = {"left": 2}

    def flaky(event: Deposited) -> None:
        if event.amount == 7 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the view is busy")

    events = deposits(20)
    append(driver, store, *events)
    projector = runner(driver, store, balances(driver.name == "async", fail=flaky), batch_size=10)
    assert catch_up(driver, projector) == 20
    assert failures["left"] == 0
    assert read_balances(driver, store) == expected(events)  # the failed tries left nothing


def test_an_event_failing_every_time_stops_the_projection_naming_it(
    driver: Driver, store: Store
) -> None:
    def broken(event: Deposited) -> None:
        if event.amount == 5:
            raise ZeroDivisionError("the handler has a bug")

    events = deposits(9)
    append(driver, store, *events)
    projector = runner(
        driver, store, balances(driver.name == "async", fail=broken), batch_size=4, attempts=3
    )
    with pytest.raises(ProjectionFailed) as failed:
        catch_up(driver, projector)
    assert failed.value.event.position == 5
    assert failed.value.attempts == 3
    message = str(failed.value)
    assert "on the event at position 5 (tests.Deposited version 1 of bank" in message
    assert "ZeroDivisionError: the handler has a bug" in message
    assert "does not skip events" in message
    assert isinstance(failed.value.__cause__, ZeroDivisionError)
    # The events before it committed; it and those after it wait for a fix.
    assert read_balances(driver, store) == expected(events[:4])
    assert checkpoint(driver, store).position == 4


def test_a_rebuild_empties_the_view_and_starts_over_from_0(driver: Driver, store: Store) -> None:
    events = deposits(12)
    append(driver, store, *events)
    projector = runner(driver, store)
    catch_up(driver, projector)
    driver.io(projector, "rebuild")
    assert checkpoint(driver, store).position == 0
    assert read_balances(driver, store) == {account: (0, 0) for account in expected(events)}
    assert catch_up(driver, projector) == 12
    assert read_balances(driver, store) == expected(events)


def test_a_rebuild_without_a_reset_hook_is_refused(driver: Driver, store: Store) -> None:
    projection = Projection("no-reset", registry)
    projection.on(Deposited)(lambda event: None)
    with pytest.raises(ValueError, match=r"no reset hook.*@projection.reset"):
        driver.io(runner(driver, store, projection), "rebuild")


def test_one_runner_at_a_time_the_next_takes_over_once_the_lease_is_free(
    driver: Driver, store: Store
) -> None:
    append(driver, store, *deposits(10))
    first, second = runner(driver, store, lease=30), runner(driver, store, lease=30)
    catch_up(driver, first)
    with pytest.raises(ProjectionHeld):
        catch_up(driver, second)
    append(driver, store, *deposits(5, start=10))
    driver.io(first, "release")
    assert catch_up(driver, second) == 5  # from the first's checkpoint on
    assert read_balances(driver, store) == expected(deposits(15))


def test_an_expired_lease_is_taken_over(driver: Driver, store: Store) -> None:
    append(driver, store, *deposits(4))
    first = runner(driver, store, lease=0.2)
    catch_up(driver, first)
    time.sleep(0.5)  # the first runner went silent: its lease expires
    append(driver, store, *deposits(2, start=4))
    second = runner(driver, store, lease=30)
    assert catch_up(driver, second) == 2
    # The first, back, finds it lost the projection and moves nothing.
    with pytest.raises(ProjectionHeld):
        catch_up(driver, first)
    assert read_balances(driver, store) == expected(deposits(6))


def test_run_follows_the_log_logs_its_lag_and_stops_giving_the_lease_back(
    driver: Driver, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pybondi.projection")
    events = deposits(30)
    append(driver, store, *events)
    projector = runner(driver, store, batch_size=10, report_every=0.0, idle=0.01, grace=5)

    async def follow() -> None:
        task = asyncio.ensure_future(projector.run())
        for _ in range(2000):  # until it says it caught up (20 s at most)
            if projector.lag == 0 and not projector.progress.behind:
                break
            await asyncio.sleep(0.01)
        projector.stop()
        await task

    on_loop(driver, follow())
    assert read_balances(driver, store) == expected(events)
    assert checkpoint(driver, store).owner is None  # given back at the stop
    messages = [record.getMessage() for record in caplog.records]
    assert "Projection balances at position 10 of 30: lag 20 event(s)" in "\n".join(messages)
    assert "Projection balances caught up at position 30 (lag 0)" in messages


def test_run_with_rebuild_starts_over(driver: Driver, store: Store) -> None:
    events = deposits(6)
    append(driver, store, *events)
    projector = runner(driver, store, idle=0.01)
    catch_up(driver, projector)

    async def rebuild_then_follow() -> None:
        task = asyncio.ensure_future(projector.run(rebuild=True))
        for _ in range(2000):
            if projector.handled == 12:  # 6 before, 6 again after the reset
                break
            await asyncio.sleep(0.01)
        projector.stop()
        await task

    on_loop(driver, rebuild_then_follow())
    assert read_balances(driver, store) == expected(events)


def test_run_ends_with_projection_failed(driver: Driver, store: Store) -> None:
    def broken(event: Deposited) -> None:
        raise RuntimeError("never works")

    append(driver, store, *deposits(2))
    projector = runner(driver, store, balances(driver.name == "async", fail=broken), attempts=2)
    with pytest.raises(ProjectionFailed, match="at position 1"):
        on_loop(driver, projector.run())
    assert checkpoint(driver, store).owner is None


def test_a_handler_of_an_unregistered_event_is_refused_when_registered() -> None:
    class Unknown(Event):
        pass

    projection = Projection("strict", registry)
    with pytest.raises(InvalidHandler, match=r"cannot handle Unknown.*registry does not know"):

        @projection.on(Unknown)
        def handle(event: Event) -> None: ...

    assert not projection.messagebus.event_handlers


def test_a_bad_name_or_store_is_refused() -> None:
    with pytest.raises(ValueError, match="Cannot name a projection ''"):
        Projection("", registry)
    with pytest.raises(ValueError, match="Cannot name a projection"):
        Projection("x" * 300, registry)
    with pytest.raises(TypeError, match="has none"):
        ProjectionRunner(Projection("p", registry), AggregatesOnly())  # type: ignore[arg-type]
