"""`pybondi worker` and `pybondi dead-letters`, as processes, on Redis and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi.messaging.envelope import Envelope
from pybondi.publisher import Message
from tests.backends import Backend
from tests.brokers import RedisKit
from tests.outboxes import aoutbox_rows
from tests.workers import Counted, WorkerRig, registry

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).parent.parent
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/test"  # nothing listens on port 1


@pytest.fixture
def rig(backends: dict[str, Backend]) -> Iterator[WorkerRig]:
    kit = RedisKit()
    kit.start()
    rig = WorkerRig(backends["postgres"], kit)
    try:
        yield rig
    finally:
        try:
            rig.close()
        finally:
            kit.close()


def pybondi(rig: WorkerRig, *arguments: str, topic: str = "") -> subprocess.Popen[str]:
    """`python -m pybondi ...` on the rig's store, from the repository's root."""
    store = rig.store
    command = [sys.executable, "-m", "pybondi", *arguments]
    command += ["--store", rig.backend.url, "--schema", str(rig.backend.namespace)]
    command += ["--prefix", store.prefix]
    environment = {**os.environ, "PYBONDI_TEST_TOPIC": topic or "tests.counted"}
    return subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def worker(rig: WorkerRig, topic: str, *options: str) -> subprocess.Popen[str]:
    broker = ["--broker", rig.kit.url, "--broker-option", f"prefix={rig.kit.prefix}"]
    return pybondi(rig, "worker", "tests.worker_app:consumer", *broker, *options, topic=topic)


def wait_for(rig: WorkerRig, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(len(n) for n in rig.run(rig.numbers()).values()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} messages not handled within {timeout} s")


def test_the_worker_handles_messages_until_sigterm_then_exits_0(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    sent = rig.run(rig.send(topic, *(Counted("k", n) for n in range(10))))
    process = worker(rig, topic)
    try:
        wait_for(rig, 10)
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert sorted(rig.run(rig.numbers())["k"]) == list(range(10))
    # Each line a handler logs names the message it handles, and its chain (a message
    # may be counted more than once: sessions on one tally conflict, and run again).
    lines = [line for line in errors.splitlines() if "tests.worker_app" in line]
    assert {line.split("[")[1].split()[0] for line in lines} == {e.id for e in sent}
    assert "10 handled" in errors


def test_workers_share_the_messages_and_a_killed_one_is_restarted(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    rig.run(rig.send(topic, *(Counted(f"k{n % 5}", n) for n in range(50))))
    supervisor = worker(rig, topic, "--workers", "2", "--redeliver-after", "2")
    try:
        wait_for(rig, 50)
        children = _children(supervisor.pid)
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while set(_children(supervisor.pid)) & {children[0]} or len(_children(supervisor.pid)) < 2:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.1)
        rig.run(rig.send(topic, *(Counted("k0", n) for n in range(50, 60))))
        wait_for(rig, 60)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        _, errors = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, errors
    numbers = rig.run(rig.numbers())
    assert sorted(n for values in numbers.values() for n in values) == list(range(60))


def _children(pid: int) -> list[int]:
    """The processes `pid` started and that are still there (Linux's /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in children.split()]


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (
            "tests.worker_app:not_a_consumer",
            "object is neither a pybondi.messaging.Consumer",
        ),
        ("tests.worker_app:bus", "a Messagebus needs the topics"),
        ("tests.worker_app:nothing", "AttributeError"),
        ("tests.no_such_module:consumer", "cannot load tests.no_such_module:consumer"),
        ("tests.worker_app", "expected module:name"),
    ],
)
def test_the_worker_refuses_what_is_not_a_consumer(
    rig: WorkerRig, target: str, problem: str
) -> None:
    broker = ["--broker", rig.kit.url]
    process = pybondi(rig, "worker", target, *broker)
    _, errors = process.communicate(timeout=30)
    assert process.returncode == 2
    assert problem in errors


def test_the_worker_refuses_a_batch_below_one(rig: WorkerRig) -> None:
    process = worker(rig, rig.kit.topic(), "--batch", "0")
    _, errors = process.communicate(timeout=30)
    assert process.returncode == 2
    assert "--batch: must be at least 1, got 0" in errors


def test_the_worker_dispatches_topics_to_a_messagebus(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    rig.run(rig.send(topic, *(Counted("k", n) for n in range(3))))
    broker = ["--broker", rig.kit.url, "--broker-option", f"prefix={rig.kit.prefix}"]
    bus = ["tests.worker_app:bus", "--topic", topic, "--registry", "tests.workers:registry"]
    process = pybondi(rig, "worker", *bus, *broker, "--group", "audit")
    try:
        deadline = time.monotonic() + 30
        while len(rig.run(rig.inbox())) < 3:
            assert time.monotonic() < deadline, "3 messages not handled within 30 s"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert {group for group, _ in rig.run(rig.inbox())} == {"audit"}
    assert sorted(
        line.split("dispatched ")[1] for line in errors.splitlines() if "dispatched" in line
    ) == [
        "0 for k",
        "1 for k",
        "2 for k",
    ]


def test_the_dead_letters_command_lists_shows_replays_and_discards(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    envelopes = [
        Envelope.seal(topic, Message(Counted("k", n), headers={"tenant": "acme"}), registry)
        for n in range(3)
    ]
    for n, envelope in enumerate(envelopes):
        error = f"RuntimeError: failure {n}\n\ntraceback"
        rig.run(rig.store.atransact(partial(dead_letter, envelope, error, n + 1)))
    ids = [letter.id for letter in rig.run(rig.dead_letters())]

    def run(*arguments: str) -> tuple[int, str, str]:
        process = pybondi(rig, "dead-letters", *arguments)
        out, errors = process.communicate(timeout=30)
        return process.returncode, out, errors

    code, out, _ = run("list", "--group", "billing")
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(id) for id in ids]
    assert out.splitlines()[1].endswith("RuntimeError: failure 1")
    code, out, _ = run("show", str(ids[0]))
    assert code == 0
    assert envelopes[0].id in out and "tenant: acme" in out and "traceback" in out
    code, out, _ = run("replay", str(ids[0]))
    assert code == 0 and f"replayed {ids[0]}" in out
    code, out, _ = run("discard", "--all", "--group", "billing")
    assert code == 0 and "discarded 2" in out
    assert rig.run(rig.dead_letters()) == []
    code, _, errors = run("show", str(ids[0]))
    assert code == 1 and f"no dead letter {ids[0]}" in errors
    code, _, errors = run("replay")
    assert code == 2 and "give the ids" in errors
    code, _, errors = run("replay", str(ids[1]), "--group", "billing")
    assert code == 2 and "not both" in errors


def test_each_replay_stands_alone_and_says_what_failed(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    long_id = "x" * 100  # over the 64 characters the outbox once kept for an id
    envelope = Envelope.seal(topic, Message(Counted("k", 1)), registry)
    envelope = Envelope(topic, long_id, {**envelope.headers, "message-id": long_id}, envelope.body)
    good = rig.run(rig.store.atransact(partial(dead_letter, envelope, "RuntimeError: bug", 5)))
    refused = rig.run(
        rig.store.atransact(partial(dead_letter, envelope_of(topic, "y"), "RuntimeError: bug", 5))
    )
    # The database refuses that one's outbox row, as a constraint of its own might.
    schema, outbox = rig.backend.namespace, rig.store.statements.outbox.outbox.name
    rig.run(execute(rig, f"""
        CREATE FUNCTION {schema}.{outbox}_refuse() RETURNS trigger AS $$ BEGIN
            IF NEW.message_id = 'y' THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER refuse BEFORE INSERT ON {schema}.{outbox}
            FOR EACH ROW EXECUTE FUNCTION {schema}.{outbox}_refuse();
    """))  # fmt: skip

    process = pybondi(rig, "dead-letters", "replay", "--all")
    out, errors = process.communicate(timeout=30)
    assert process.returncode == 1, errors
    assert out.splitlines() == [f"replayed {good}: {long_id} to {topic}"], errors
    [error] = errors.splitlines()
    assert error.startswith(f"pybondi dead-letters: cannot replay {refused}: ")
    assert error.endswith("refused by a trigger")
    assert [letter.id for letter in rig.run(rig.dead_letters())] == [refused]
    assert [row.message_id for row in rig.run(aoutbox_rows(rig.store))] == [long_id]


async def execute(rig: WorkerRig, sql: str) -> None:
    engine = rig.store.engine
    assert isinstance(engine, AsyncEngine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(sql)


def envelope_of(topic: str, id: str) -> Envelope:
    sealed = Envelope.seal(topic, Message(Counted("k", 2)), registry)
    return Envelope(topic, id, {**sealed.headers, "message-id": id}, sealed.body)


def dead_letter(envelope: Envelope, error: str, attempts: int, records: Any) -> int:
    """What a worker writes when it gives up on a message of the group `billing`."""
    return int(records.dead_letters.add("billing", envelope, error, attempts))


def test_the_dead_letters_command_refuses_a_store_it_cannot_reach_at_once() -> None:
    started = time.monotonic()
    found = subprocess.run(
        [sys.executable, "-m", "pybondi", "dead-letters", "list", "--store", UNREACHABLE],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert found.returncode == 2 and "cannot reach" in found.stderr
    assert time.monotonic() - started < 30


def test_workers_that_cannot_start_stop_the_supervisor_with_2(rig: WorkerRig) -> None:
    topic = rig.kit.topic()
    supervisor = worker(rig, topic, "--workers", "2", "--broker-option", "no_such_option=1")
    _, errors = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 2, errors
    assert "no_such_option" in errors
