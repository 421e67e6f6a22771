"""The relay killed with SIGKILL at random moments, 200 times: no message is lost.

A publisher process (tests/outbox_publisher.py) commits numbered messages through the
outbox on PostgreSQL, session after session, to three topics. Meanwhile the test starts
a relay process (`pybondi relay`'s `main()`, from tests/relay_cli.py) and kills it with
SIGKILL 0.02 to 0.6 s later, 200 times over, each relay starting as soon as the last one
is dead. The relays are forked by a server that has done the imports once: a relay
started the usual way spends its first half second importing, where a kill tests
nothing. The publisher keeps up to a few thousand rows waiting, so every relay has work
and kills land while it reads, sends or confirms a batch. A last relay then drains the
outbox and stops on SIGTERM, and the broker's own client reads every topic back.

What the assertions prove:

- nothing is lost and nothing invented: each topic holds exactly its numbers, each at
  least once;
- order per topic is commit order, apart from redelivery: the first occurrences of the
  numbers are in publish order;
- a duplicate is a redelivery of the same row, never a second commit: every copy of a
  number has the same `message-id`.

The note (printed with `pytest -s`, kept in the test's user properties and written to
relay_crash.json under the test's tmp_path) gives the kills, how many relays were killed
after starting up or after confirming a batch, the duplicates, how many batches a kill
interrupted (each shows as the topic's numbers going back), and the time taken. NATS
JetStream drops a message whose `Nats-Msg-Id` it saw within its duplicate window, so
there redelivered copies may never reach a consumer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import nats.js.api
import pytest
import sqlalchemy as sa

from pybondi.messaging.envelope import Envelope
from pybondi.persistence import SQLStore
from tests.backends import Backend
from tests.brokers import BrokerKit, NATSKit, RabbitMQKit

pytestmark = [pytest.mark.stress, pytest.mark.postgres]

KILLS = int(os.environ.get("PYBONDI_RELAY_KILLS", "200"))  # fewer for a quick look
KILL_AFTER = (0.02, 0.6)  # seconds after the relay is told to start
BATCH_SIZE = 20
LEASE = 0.1  # seconds: the next relay need not wait long for a killed one's topics
TOPICS = 3
BACKLOG = 3000  # rows the publisher keeps waiting at most
DRAIN_TIMEOUT = 120.0  # seconds for the last relay to send what is left

HERE = Path(__file__).parent


def test_the_relay_killed_200_times_loses_nothing(
    broker: BrokerKit,
    backends: dict[str, Backend],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    record_property: Any,
) -> None:
    backend, prefix = backends["postgres"], f"c{uuid.uuid4().hex[:8]}_"
    store = backend.store(prefix=prefix)
    assert isinstance(store, SQLStore)
    store.create_tables()
    topics = [broker.topic(f"numbers{index}") for index in range(TOPICS)]
    relay_log = tmp_path / "relays.log"
    started = time.monotonic()
    publisher: subprocess.Popen[str] | None = None
    relays: Relays | None = None
    try:
        with relay_log.open("ab") as log:
            publisher = _start_publisher(backend, prefix, topics)
            relays = Relays(broker, backend, prefix, log)
            kills, lives_that_sent = 0, 0
            for life in range(KILLS):
                sent_before = _sent(store)
                went = relays.start(f"life {life}")
                status = relays.exited(went + random.uniform(*KILL_AFTER) - time.monotonic())
                if status is not None:
                    pytest.fail(f"relay {life} exited by itself, status {status}; see "
                                f"{relay_log}:\n{_tail(relay_log)}")  # fmt: skip
                relays.signal(signal.SIGKILL)
                assert relays.exited(10) == -signal.SIGKILL
                kills += 1
                lives_that_sent += _sent(store) > sent_before
            published = _stop_publisher(publisher)
            drain_started = time.monotonic()
            relays.start("the last relay")
            _wait_until_drained(store, published, relays, relay_log)
            relays.signal(signal.SIGTERM)
            assert relays.exited(30) == 0, _tail(relay_log)
            drained = time.monotonic() - drain_started
        expected = {
            topic: list(range(index, published, TOPICS)) for index, topic in enumerate(topics)
        }
        read_started = time.monotonic()
        received = {topic: _numbers(broker, topic, len(expected[topic])) for topic in topics}
        read = time.monotonic() - read_started
    finally:
        if relays is not None:
            relays.close()
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
            publisher.communicate()
        store.dispose()

    duplicates, interrupted = 0, 0
    for topic in topics:
        numbers, wanted = [n for n, _ in received[topic]], expected[topic]
        assert set(numbers) == set(wanted), (
            f"{topic}: missing {sorted(set(wanted) - set(numbers))[:20]}, "
            f"unexpected {sorted(set(numbers) - set(wanted))[:20]}"
        )
        assert list(dict.fromkeys(numbers)) == wanted, f"{topic}: out of commit order"
        ids: dict[int, str] = {}
        for n, message_id in received[topic]:
            assert ids.setdefault(n, message_id) == message_id, f"{n} was committed twice"
        duplicates += len(numbers) - len(wanted)
        interrupted += sum(1 for a, b in itertools.pairwise(numbers) if b <= a)

    log_text = relay_log.read_text(errors="replace")
    note = {
        "broker": broker.name,
        "kills": kills,
        "killed_after_start_up": log_text.count(" started: ") - 1,  # not the last relay
        "killed_after_confirming": lives_that_sent,
        "published": published,
        "received": published + duplicates,
        "duplicates": duplicates,
        "interrupted_batches": interrupted,
        "relay_warnings": log_text.count(" WARNING "),
        "last_relay_drained_s": round(drained, 2),
        "read_back_s": round(read, 2),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    (tmp_path / "relay_crash.json").write_text(json.dumps(note, indent=2))
    for key, value in note.items():
        record_property(key, value)
    with capsys.disabled():
        print(f"\nrelay crash test: {json.dumps(note)}")
    assert "Traceback" not in log_text, _tail(relay_log)


# The processes ---------------------------------------------------------------------------


def _store_options(backend: Backend, prefix: str) -> list[str]:
    """The command-line options that name the test's store."""
    schema = ["--schema", backend.namespace] if backend.namespace else []
    return ["--store", backend.url, *schema, "--prefix", prefix]


def _start_publisher(backend: Backend, prefix: str, topics: list[str]) -> subprocess.Popen[str]:
    publisher = subprocess.Popen(
        [sys.executable, str(HERE / "outbox_publisher.py"), *_store_options(backend, prefix),
         "--topics", ",".join(topics), "--backlog", str(BACKLOG)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert publisher.stdout is not None
    if publisher.stdout.readline().strip() != "ready":
        publisher.kill()
        pytest.fail(f"the publisher did not start: status {publisher.wait()}")
    return publisher


def _stop_publisher(publisher: subprocess.Popen[str]) -> int:
    """SIGTERM the publisher; return how many numbers it committed."""
    publisher.send_signal(signal.SIGTERM)
    out, _ = publisher.communicate(timeout=30)
    assert publisher.returncode == 0, out
    word, count = out.split()
    assert word == "published", out
    return int(count)


class Relays:
    """Relay processes, forked one at a time by tests/relay_cli.py's fork server."""

    def __init__(self, broker: BrokerKit, backend: Backend, prefix: str, log: IO[bytes]) -> None:
        self.log = log
        self.pid: int | None = None  # the relay running, if any
        self.server = subprocess.Popen(
            [sys.executable, str(HERE / "relay_cli.py"), json.dumps(broker.options()), "--fork",
             "relay", *_store_options(backend, prefix), "--broker", broker.url,
             "--batch-size", str(BATCH_SIZE), "--lease", str(LEASE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            bufsize=0,
        )  # fmt: skip
        self._read = b""
        assert self._line(30) == "ready", "the fork server did not start"

    def start(self, title: str) -> float:
        """Start a relay; return the moment it started."""
        assert self.pid is None, "a relay is running"
        self.log.write(f"== {title}\n".encode())
        self.log.flush()
        started = time.monotonic()
        self._write("start\n")
        line = self._line(10)
        if line is None or not line.isdigit() or int(line) <= 1:
            pytest.fail(f"the fork server started no relay, but said {line!r}")
        self.pid = int(line)  # never 0 or -1, which os.kill reads as "every process"
        return started

    def exited(self, timeout: float) -> int | None:
        """The relay's exit status (-N for signal N) once it ended, or None after `timeout`."""
        line = self._line(timeout)
        if line is None:
            return None
        word, status = line.split()
        assert word == "exited", line
        self.pid = None
        return int(status)

    def signal(self, number: int) -> None:
        """Send a signal to the relay running; the fork server reaps it only once it ended."""
        assert self.pid is not None, "no relay is running"
        os.kill(self.pid, number)

    def close(self) -> None:
        """Kill the relay running, if any, and end the fork server."""
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
        """The fork server's next line, or None if it writes none within `timeout`."""
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


def _wait_until_drained(store: SQLStore, published: int, relays: Relays, relay_log: Path) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while _sent(store) < published:
        status = relays.exited(0)
        if status is not None:
            pytest.fail(f"the last relay exited, status {status}:\n{_tail(relay_log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"the last relay sent {_sent(store)} of {published} in {DRAIN_TIMEOUT} s")
        time.sleep(0.05)


# Reading the outbox and the broker ------------------------------------------------------------


def _sent(store: SQLStore) -> int:
    """How many rows the relays have had confirmed, all topics together."""
    assert isinstance(store.engine, sa.Engine)
    relay = store.statements.outbox.relay
    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.sum(relay.c.sent))).scalar() or 0)


def _numbers(broker: BrokerKit, topic: str, at_least: int) -> list[tuple[int, str]]:
    """Every message on the topic, in broker order: its number and message id."""
    if isinstance(broker, RabbitMQKit):
        envelopes = broker.run(_consume(broker, topic))
    elif isinstance(broker, NATSKit):
        envelopes = broker.run(_fetch(broker, topic))
    else:
        envelopes = broker.run(broker.read(topic, at_least, timeout=30))
    return [(json.loads(envelope.body)["n"], envelope.id) for envelope in envelopes]


# The kits' `take` reads a few messages well, and the thousands this test leaves slowly:
# RabbitMQ's with a round trip per message (basic_get), NATS's in one fetch that a pull
# consumer serves 1,000 messages at a time (its unacknowledged limit), with a 5 s
# timeout in between. Here, a consumer takes a topic in seconds.


async def _consume(kit: RabbitMQKit, topic: str) -> list[Envelope]:
    """Every message in the topic's queue, consumed with no acknowledgements."""
    assert kit.connection is not None, "the kit is not started"
    envelopes: list[Envelope] = []
    async with await kit.connection.channel() as channel:
        queue = await channel.declare_queue(kit.prefix + topic, passive=True)
        count = queue.declaration_result.message_count or 0
        if not count:
            return envelopes
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                assert message.routing_key == topic, (message.routing_key, topic)
                envelopes.append(Envelope(topic, message.message_id or "", {}, message.body))
                if len(envelopes) == count:
                    break
    return envelopes


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _fetch(kit: NATSKit, topic: str) -> list[Envelope]:
    """Every message in the topic's stream, fetched by a consumer that wants no acks."""
    assert kit.client is not None, "the kit is not started"
    jetstream, stream = kit.client.jetstream(), kit.stream(topic)
    count = (await jetstream.stream_info(stream)).state.messages
    config = nats.js.api.ConsumerConfig(ack_policy=nats.js.api.AckPolicy.NONE)
    subscription = await jetstream.pull_subscribe(topic, stream=stream, config=config)
    envelopes: list[Envelope] = []
    try:
        while len(envelopes) < count:
            for message in await subscription.fetch(min(count - len(envelopes), 1000), 10):
                assert message.subject == topic, (message.subject, topic)
                message_id = (message.headers or {}).get("Nats-Msg-Id", "")
                envelopes.append(Envelope(topic, message_id, {}, message.data))
    finally:
        await subscription.unsubscribe()
    return envelopes
