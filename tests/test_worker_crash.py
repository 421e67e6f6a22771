"""Two workers killed with SIGKILL at random moments: each message is handled exactly once.

The test sends 5,000 numbered `Counted` messages (over 50 keys) straight to the broker
with an adapter's `asend`, 100 per batch, ten batches a second, while two worker
processes (`pybondi worker tests.crash_worker:consumer --redeliver-after 2`, forked by
tests/crash_worker.py's fork server after the imports) handle them. Every 0.3 to 1.5 s
one of the two, chosen at random, is killed with SIGKILL and started again at once, until
the producer is done and the database holds 90 % of the effects (or `KILL_PHASE` s
passed). Then both are killed a last time, and a last worker drains the rest, and waits
past `--redeliver-after` for anything still to come back, and stops on SIGTERM. The
workers run alone (a transaction per message) or in batches of up to 16 (`--batch 16`:
a kill mid-batch rolls back all of its messages).

Each message's handler (tests/crash_worker.py) appends the number to its key's tally and
inserts a row into an effects table without a unique constraint, in the message's
session, whose transaction also records the message id in the inbox; the worker acks
after the commit. A kill between the commit and the ack makes the broker deliver the
message again: the inbox must skip it. A kill before the commit rolls the transaction
back: the message must come back and be handled.

What the assertions prove, against the producer's own list of what it sent:

- nothing is lost and nothing done twice: each number appears exactly once across the
  tallies, under its key, and once in the effects table, which has 5,000 rows;
- the inbox holds exactly the 5,000 message ids sent, and there is no dead letter.

The note (printed with `pytest -s`, kept in the test's user properties and written to
worker_crash.json under the test's tmp_path) gives the kills, the duplicates the inbox
skipped (the workers' "Skipped" log lines), the attempts retried through the broker
(none expected: a worker retries a conflict on a tally itself, at once), how many worker
lives committed something, and the times.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa

from pybondi import Message
from pybondi.messaging.brokers.base import DEFAULT_GROUP
from pybondi.messaging.envelope import Envelope
from pybondi.persistence import SQLStore
from tests.backends import Backend
from tests.brokers import BrokerKit, RabbitMQKit
from tests.crash_worker import RETRY, effects_table
from tests.workers import Counted, registry

pytestmark = [pytest.mark.stress, pytest.mark.postgres]

MESSAGES = 5_000
KEYS = 50
BATCH = 100  # messages per asend
BATCH_EVERY = 0.1  # seconds between batches
KILL_EVERY = (0.3, 1.5)  # seconds between kills
KILL_PHASE = float(os.environ.get("PYBONDI_WORKER_KILL_PHASE", "45"))  # seconds at most
KILL_UNTIL = 0.9  # share of the effects in the database when the kills stop
REDELIVER_AFTER = 2.0
DRAIN_TIMEOUT = 60.0
ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("batch_size", [1, 16], ids=["alone", "batch16"])
def test_workers_killed_at_random_handle_each_message_exactly_once(
    batch_size: int,
    broker: BrokerKit,
    backends: dict[str, Backend],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    backend, prefix = backends["postgres"], f"w{uuid.uuid4().hex[:8]}_"
    store = backend.store(prefix=prefix)
    assert isinstance(store, SQLStore)
    store.create_tables()
    effects = effects_table(store)
    _execute(
        store,
        f"CREATE TABLE {effects} (n integer NOT NULL, key text NOT NULL, "
        f"message_id text NOT NULL, pid integer NOT NULL)",
    )
    topic = broker.topic("counted")
    if isinstance(broker, RabbitMQKit):  # the delay queues of the retries, if any
        queue = broker.prefix + topic
        delays = {round(RETRY.backoff(attempt) * 1000) for attempt in range(1, 20)}
        broker.other_queues += [f"{queue}#retry#{ms}" for ms in sorted(delays)]
    envelopes = [
        Envelope.seal(topic, Message(Counted(f"k{n % KEYS}", n)), registry) for n in range(MESSAGES)
    ]
    sender = broker.make()
    log_path = tmp_path / "workers.log"
    slots: list[Workers] = []
    started = time.monotonic()
    try:
        with log_path.open("ab") as log:
            command = _command(broker, backend, prefix, batch_size)
            slots = [Workers(index, command, topic, log) for index in range(2)]
            for slot in slots:
                slot.start("first life")
            sent, kills = 0, 0
            next_batch = next_kill = next_count = time.monotonic()
            next_kill += random.uniform(*KILL_EVERY)
            handled, produced = 0, 0.0
            while True:
                now = time.monotonic()
                if sent < MESSAGES and now >= next_batch:
                    batch = envelopes[sent : sent + BATCH]
                    broker.run(sender.asend(batch))  # confirmed: it is the broker's now
                    sent += len(batch)
                    next_batch += BATCH_EVERY
                    produced = time.monotonic() - started
                if now >= next_kill:
                    slot = random.choice(slots)
                    slot.kill(log_path)
                    kills += 1
                    slot.start(f"life {kills + 2}")
                    next_kill = time.monotonic() + random.uniform(*KILL_EVERY)
                for slot in slots:
                    slot.check(log_path)
                if now >= next_count:
                    handled = _count(store, f"SELECT count(*) FROM {effects}")
                    next_count = now + 0.5
                if sent == MESSAGES and (
                    handled >= MESSAGES * KILL_UNTIL or now - started > KILL_PHASE
                ):
                    break
                time.sleep(max(0.0, min(next_batch, next_kill, next_count) - time.monotonic()))
            for slot in slots:  # the last kills: whatever they held comes back
                slot.kill(log_path)
                kills += 1
            kill_phase = time.monotonic() - started
            handled_when_killing_stopped = _count(store, f"SELECT count(*) FROM {effects}")
            drain_started = time.monotonic()
            last = slots[0]
            last.start("the last worker")
            deadline = drain_started + DRAIN_TIMEOUT
            while (handled := _count(store, f"SELECT count(*) FROM {effects}")) < MESSAGES:
                last.check(log_path)
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the last worker left {MESSAGES - handled} message(s) unhandled "
                        f"after {DRAIN_TIMEOUT} s:\n{_tail(log_path)}"
                    )
                time.sleep(0.05)
            drained = time.monotonic() - drain_started
            # Past redeliver_after, anything a killed worker held has come back: it must
            # be skipped, and nothing more handled.
            time.sleep(REDELIVER_AFTER * 1.5)
            last.check(log_path)
            last.signal(signal.SIGTERM)
            assert last.exited(30) == 0, _tail(log_path)
        elapsed = time.monotonic() - started

        numbers = _tallies(store)
        effect_rows = _rows(store, f"SELECT n, key, message_id, pid FROM {effects}")
        inbox = store.statements.inbox.inbox
        inbox_rows = _rows(store, sa.select(inbox.c.consumer_group, inbox.c.message_id))
        dead = store.statements.dead_letters.dead_letters
        dead_letters = _rows(store, sa.select(dead.c.message_id, dead.c.error))
    finally:
        for slot in slots:
            slot.close()
        with contextlib.suppress(Exception):
            _execute(store, f"DROP TABLE IF EXISTS {effects}")
        store.drop_tables()
        store.dispose()

    expected = list(range(MESSAGES))
    assert not dead_letters, f"{len(dead_letters)} dead letter(s), e.g. {dead_letters[:3]}"
    counted = sorted(n for values in numbers.values() for n in values)
    missing = sorted(set(expected) - set(counted))
    twice = sorted(n for n, times in Counter(counted).items() if times > 1)
    assert counted == expected, (
        f"tallies: {len(counted)} numbers for {MESSAGES} sent; missing {missing[:20]}, "
        f"counted more than once {twice[:20]}"
    )
    for key, values in numbers.items():
        assert all(f"k{n % KEYS}" == key for n in values), f"{key} has another key's numbers"
    assert len(effect_rows) == MESSAGES, f"{len(effect_rows)} effect rows for {MESSAGES}"
    assert sorted(n for n, *_ in effect_rows) == expected
    ids = {envelope.id for envelope in envelopes}
    assert {message_id for _, _, message_id, _ in effect_rows} == ids
    assert sorted(inbox_rows) == sorted((DEFAULT_GROUP, message_id) for message_id in ids)

    log_text = log_path.read_text(errors="replace")
    note = {
        "broker": broker.name,
        "batch": batch_size,
        "messages": MESSAGES,
        "kills": kills,
        "worker_lives": kills + 1,
        "lives_that_committed": len({pid for *_, pid in effect_rows}),
        "duplicates_skipped": log_text.count(" Skipped <"),
        "retries": log_text.count(" failed for <"),
        "batches_failed": log_text.count("A batch of "),
        "worker_warnings": log_text.count(" WARNING "),
        "produced_s": round(produced, 1),
        "kill_phase_s": round(kill_phase, 1),
        "handled_when_kills_stopped": handled_when_killing_stopped,
        "last_worker_drained_s": round(drained, 1),
        "elapsed_s": round(elapsed, 1),
    }
    (tmp_path / "worker_crash.json").write_text(json.dumps(note, indent=2))
    for key, value in note.items():
        record_property(key, value)
    with capsys.disabled():
        print(f"\nworker crash test: {json.dumps(note)}")
    assert "Traceback" not in log_text, _tail(log_path)


# The processes ---------------------------------------------------------------------------


def _command(broker: BrokerKit, backend: Backend, prefix: str, batch: int) -> list[str]:
    """`pybondi worker`'s command line for the test's consumer, store and broker."""
    schema = ["--schema", backend.namespace] if backend.namespace else []
    options = [
        argument
        for name, value in broker.options().items()
        for argument in ("--broker-option", f"{name}={json.dumps(value)}")
    ]
    return [
        "worker", "tests.crash_worker:consumer",
        "--store", backend.url, *schema, "--prefix", prefix,
        "--broker", broker.url, *options,
        "--redeliver-after", str(REDELIVER_AFTER), "--grace", "5", "--log-level", "info",
        "--batch", str(batch),
    ]  # fmt: skip


class Workers:
    """One worker at a time, forked by a fork server of tests/crash_worker.py."""

    def __init__(self, index: int, command: list[str], topic: str, log: IO[bytes]) -> None:
        self.index = index
        self.log = log
        self.pid: int | None = None  # the worker running, if any
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_worker", "--fork", *command],
            cwd=ROOT,
            env={**os.environ, "PYBONDI_CRASH_TOPIC": topic},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
        )
        self._read = b""
        assert self._line(30) == "ready", "the fork server did not start"

    def start(self, title: str) -> None:
        assert self.pid is None, "a worker is running"
        self.log.write(f"== worker {self.index}: {title}\n".encode())
        self.log.flush()
        self._write("start\n")
        line = self._line(10)
        if line is None or not line.isdigit() or int(line) <= 1:
            pytest.fail(f"the fork server started no worker, but said {line!r}")
        self.pid = int(line)  # never 0 or -1, which os.kill reads as "every process"

    def kill(self, log_path: Path) -> None:
        self.check(log_path)
        self.signal(signal.SIGKILL)
        assert self.exited(10) == -signal.SIGKILL

    def check(self, log_path: Path) -> None:
        """Fail if the worker exited by itself."""
        status = self.exited(0)
        if status is not None:
            pytest.fail(
                f"worker {self.index} exited by itself, status {status}:\n{_tail(log_path)}"
            )

    def exited(self, timeout: float) -> int | None:
        """The worker's exit status (-N for signal N) once it ended, or None."""
        line = self._line(timeout)
        if line is None:
            return None
        word, status = line.split()
        assert word == "exited", line
        self.pid = None
        return int(status)

    def signal(self, number: int) -> None:
        assert self.pid is not None, "no worker is running"
        os.kill(self.pid, number)

    def close(self) -> None:
        """Kill the worker running, if any, and end the fork server."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        assert self.server.stdin is not None
        self.server.stdin.close()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        assert self.server.stdout is not None
        self.server.stdout.close()

    def _write(self, text: str) -> None:
        assert self.server.stdin is not None
        self.server.stdin.write(text.encode())

    def _line(self, timeout: float) -> str | None:
        assert self.server.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._read:
            remaining = deadline - time.monotonic()
            if not select.select([self.server.stdout], [], [], max(remaining, 0))[0]:
                return None
            chunk = os.read(self.server.stdout.fileno(), 4096)
            if not chunk:
                pytest.fail(f"the fork server ended, status {self.server.wait()}")
            self._read += chunk
        line, _, self._read = self._read.partition(b"\n")
        return line.decode()


# The database ----------------------------------------------------------------------------


def _engine(store: SQLStore) -> sa.Engine:
    assert isinstance(store.engine, sa.Engine)
    return store.engine


def _execute(store: SQLStore, statement: str) -> None:
    with _engine(store).begin() as connection:
        connection.exec_driver_sql(statement)


def _count(store: SQLStore, query: str) -> int:
    with _engine(store).connect() as connection:
        return int(connection.exec_driver_sql(query).scalar() or 0)


def _rows(store: SQLStore, query: str | sa.Select[Any]) -> list[tuple[Any, ...]]:
    with _engine(store).connect() as connection:
        if isinstance(query, str):
            return [tuple(row) for row in connection.exec_driver_sql(query)]
        return [tuple(row) for row in connection.execute(query)]


def _tallies(store: SQLStore) -> dict[str, list[int]]:
    """Each tally's numbers, as the database holds them."""
    table = store.statements.aggregates
    return {
        stream.removeprefix("tests.Tally-"): json.loads(data)["numbers"]
        for stream, data in _rows(store, sa.select(table.c.stream, table.c.data))
    }


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
