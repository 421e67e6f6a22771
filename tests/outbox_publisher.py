"""Publishes numbered messages through the outbox, session after session, until SIGTERM.

    python tests/outbox_publisher.py --store URL --schema S --prefix P --topics a,b,c

Message n carries `{"n": n}` and goes to topic `topics[n % len(topics)]`; each session
publishes the next 1 to `--most` numbers and commits, so numbers are committed in order.
While more than `--backlog` rows wait for the relay, it pauses: whenever a relay runs, it
has work, but the outbox does not grow without bound while none does. It prints `ready`
once it is publishing, and on SIGTERM finishes its session and prints `published N`:
numbers 0..N-1 are committed, no other.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from types import FrameType

import sqlalchemy as sa

from pybondi import Message, Messagebus, Session
from pybondi.messaging.outbox import Outbox
from pybondi.persistence import SQLStore


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--schema")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--topics", required=True, help="comma-separated")
    parser.add_argument("--most", type=int, default=10, help="messages per session, at most")
    parser.add_argument("--backlog", type=int, default=3000, help="unsent rows to pause at")
    arguments = parser.parse_args()
    topics = arguments.topics.split(",")

    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    store = SQLStore(arguments.store, schema=arguments.schema, prefix=arguments.prefix)
    assert isinstance(store.engine, sa.Engine)
    tables = store.statements.outbox
    backlog = sa.select(
        sa.func.coalesce(sa.func.sum(tables.topics.c.head), 0)
        - sa.func.coalesce(sa.func.sum(tables.relay.c.sent), 0)
    ).select_from(tables.topics.join(tables.relay, tables.relay.c.topic == tables.topics.c.topic))
    outbox = Outbox(store)
    published = 0
    print("ready", flush=True)
    try:
        while not stopping:
            with store.engine.connect() as connection:
                waiting = connection.execute(backlog).scalar_one()
            if waiting >= arguments.backlog:
                time.sleep(0.01)
                continue
            count = random.randint(1, arguments.most)
            with Session(Messagebus(), None, outbox):
                for n in range(published, published + count):
                    outbox.publish(topics[n % len(topics)], Message({"n": n}))
            published += count
    finally:
        store.dispose()
    print(f"published {published}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
