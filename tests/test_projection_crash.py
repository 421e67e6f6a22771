"""A projection process killed with SIGKILL 50 times while 5,000 events come in.

A writer thread appends numbered events to the log on PostgreSQL, a few per transaction,
at a pace that spreads them over the kills. Meanwhile the test starts `pybondi project`
on tests/projection_app.py's projection (one row in an unconstrained `effects` table per
event handled, written through `Depends(current_connection)`), waits until it logs that
it started, and kills it with SIGKILL 0 to 0.6 s later, 50 times over; each process
waits for the last one's lease (0.3 s) and goes on from the checkpoint. A last process
then catches up and stops on SIGTERM.

The independent count, with plain SQL on the effects table: exactly 5,000 rows, one per
log position 1..5,000 and one per event number: no event's effect is lost, and none
happened twice, however the kills fell (while reading, handling, or committing).

The note (printed with `pytest -s`, and kept in the test's user properties) gives the
kills, the checkpoints at which they landed and the time taken.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from subprocess import Popen
from typing import IO, Any

import pytest
import sqlalchemy as sa

from tests.backends import Backend
from tests.projection_cli import WAIT, Setup

pytestmark = [pytest.mark.stress, pytest.mark.postgres]

KILLS = int(os.environ.get("PYBONDI_PROJECTION_KILLS", "50"))
EVENTS = 5_000
KILL_AFTER = (0.0, 0.6)  # seconds after the process said it started
PER_TRANSACTION = 5
WRITE_FOR = KILLS * 1.0  # seconds over which the writer spreads the events


def test_a_projection_killed_50_times_applies_each_event_exactly_once(
    backends: dict[str, Backend], tmp_path: Path, record_property: Any
) -> None:
    setup = Setup(backends["postgres"])
    log = tmp_path / "projections.log"
    started = time.monotonic()
    writer = threading.Thread(target=write, args=(setup,), daemon=True)
    writer.start()
    landed: list[int] = []
    try:
        with log.open("a") as stderr:
            for _ in range(KILLS):
                process = started_in(setup, log, stderr, "--batch-size", "50")
                time.sleep(random.uniform(*KILL_AFTER))
                process.send_signal(signal.SIGKILL)
                process.communicate()  # and its pipes closed
                landed.append(setup.checkpoint().position if setup.checkpoint() else 0)
            writer.join()
            last = started_in(setup, log, stderr)
            setup.wait_for(EVENTS, last)
            last.send_signal(signal.SIGTERM)
            last.communicate(timeout=30)
            assert last.returncode == 0, log.read_text()[-3000:]
        with setup.store.engine.connect() as connection:  # type: ignore[union-attr]
            select = sa.select(setup.effects.c.position, setup.effects.c.n)
            rows = list(connection.execute(select))
    finally:
        setup.store.dispose()
    positions = Counter(position for position, _ in rows)
    numbers = Counter(n for _, n in rows)
    assert len(rows) == EVENTS
    assert sorted(positions) == list(range(1, EVENTS + 1))
    assert set(positions.values()) == {1}, [p for p, count in positions.items() if count > 1]
    assert sorted(numbers) == list(range(EVENTS)) and set(numbers.values()) == {1}
    note = (
        f"{KILLS} kills (checkpoints when they landed: {landed}); {EVENTS} events, each "
        f"applied once; {time.monotonic() - started:.1f} s"
    )
    print(note)
    record_property("projection_crash", note)


def started_in(setup: Setup, log: Path, stderr: IO[str], *options: str) -> Popen[str]:
    """Start `pybondi project`, logging to `log`, and return once it says it started."""
    before = log.read_text().count(" started: ")
    process = setup.start(
        "tests.projection_app:projection", "--lease", "0.3", *options, stderr=stderr
    )
    deadline = time.monotonic() + WAIT
    while log.read_text().count(" started: ") == before:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the command did not start"
        time.sleep(0.01)
    return process


def write(setup: Setup) -> None:
    """Append the events, a few per transaction, spread over `WRITE_FOR` seconds."""
    pause = WRITE_FOR / (EVENTS / PER_TRANSACTION)
    for start in range(0, EVENTS, PER_TRANSACTION):
        setup.append(PER_TRANSACTION, start=start)
        time.sleep(pause)
