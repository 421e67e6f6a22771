"""`pybondi project`: runs projections from the log until SIGTERM, then exits 0.

Each test runs the command as a user would (`python -m pybondi project ...`), on a store
of its own, with tests/projection_app.py's projection, which writes one row per event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.backends import Backend
from tests.projection_cli import WAIT, Setup, stop


@pytest.fixture
def setup(sql_backend: Backend) -> Iterator[Setup]:
    made = Setup(sql_backend)
    yield made
    made.store.dispose()


def test_the_command_follows_the_log_and_stops_on_sigterm(setup: Setup) -> None:
    setup.append(40)
    process = setup.start("tests.projection_app:projection")
    setup.wait_for(40, process)
    setup.append(10, start=40)
    setup.wait_for(50, process)
    status, stderr = stop(process)
    assert status == 0, stderr
    assert "Projection effects caught up at position 50 (lag 0)" in stderr
    assert "Projections stopped: effects at 50 (50 handled)" in stderr
    assert sorted(row[0] for row in setup.rows()) == list(range(1, 51))
    assert setup.checkpoint().owner is None  # the lease was given back


def test_rebuild_empties_the_view_and_starts_over(setup: Setup) -> None:
    setup.append(20)
    first = setup.start("tests.projection_app:projection")
    setup.wait_for(20, first)
    assert stop(first)[0] == 0
    again = setup.start("tests.projection_app:projection", "--rebuild")
    deadline = time.monotonic() + WAIT
    while "reset by" not in (again.stderr.readline() if again.stderr else ""):
        assert time.monotonic() < deadline and again.poll() is None, again.communicate()
    setup.wait_for(20, again)
    status, stderr = stop(again)
    assert status == 0, stderr
    assert sorted(row[0] for row in setup.rows()) == list(range(1, 21))  # not twice


@pytest.mark.parametrize("sql_backend", ["sqlite"], indirect=True)
def test_a_sync_store_runs_sync_handlers(setup: Setup) -> None:
    setup.append(15)
    process = setup.start("tests.projection_app:sync_projection", "--sync")
    setup.wait_for(15, process)
    assert stop(process)[0] == 0


@pytest.mark.parametrize("sql_backend", ["sqlite"], indirect=True)
def test_an_event_that_keeps_failing_stops_the_command_with_status_1(setup: Setup) -> None:
    setup.append(3)
    process = setup.start("tests.projection_app:broken", "--attempts", "2")
    _, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 1, stderr
    assert "Projection 'broken' stopped at position 0" in stderr
    assert "RuntimeError: cannot handle 0" in stderr
    assert setup.checkpoint("broken").position == 0


@pytest.mark.parametrize("sql_backend", ["sqlite"], indirect=True)
def test_a_target_that_is_not_a_projection_is_refused(setup: Setup) -> None:
    process = setup.start("tests.projection_app:not_a_projection")
    _, stderr = process.communicate(timeout=WAIT)
    assert process.returncode == 2
    assert "pybondi project: object is not a pybondi.projection.Projection" in stderr
