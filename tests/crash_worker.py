"""The worker crash test's consumer, and a fork server that starts its workers.

    PYBONDI_CRASH_TOPIC=counted.ab12 python -m tests.crash_worker --fork \
        worker tests.crash_worker:consumer --store ... --broker ...

`consumer` handles the `Counted` messages of the topic named by `PYBONDI_CRASH_TOPIC`
(read at import). Each message appends its number to its key's `Tally` and inserts a row
into the test's effects table, `<prefix>effects` next to the store's own tables, which
has no unique constraint: a message handled twice shows there as two rows, and in the
tallies as a number twice. Both writes are in the message's session, in the database
transaction that also records the message in the inbox. Messages of one key are handled
one after the other within a worker (`key=`); two workers updating one tally at once
make one of them fail with a `ConcurrencyError` at commit, which the worker retries in a
new session.

With `--fork`, the module does what tests/relay_cli.py does for relays: it imports what
a worker needs (this consumer, the worker, the store's driver, the broker's client),
prints `ready`, and then, for each `start` line on stdin, forks a process that runs the
rest of the command line with `pybondi.cli.main`, prints its pid, waits for it to end and
prints `exited STATUS` (the negated signal number if a signal ended it). So a worker
killed a few hundred milliseconds after it started was killed at work, not in its
imports. Each worker is a process of its own from `main()` on: its own event loop,
engine, connections and worker name.
"""

from __future__ import annotations

import importlib
import os
import random
import sys
import traceback
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from pybondi import Depends, Message, Root, Session, current_connection
from pybondi.cli import main
from pybondi.exceptions import NotFound
from pybondi.messaging.consumer import Consumer, Retry, current_session
from pybondi.persistence import SQLStore
from pybondi.persistence.repositories import StoreRepository
from tests.workers import Counted, Tally, registry, tallies

TOPIC = os.environ.get("PYBONDI_CRASH_TOPIC", "counted.unset")

# Any failure is retried rather than dead-lettered: a dead letter would be a number missing
# from the tallies, which the test reports (and fails on) as a dead letter.
RETRY = Retry(attempts=1_000, delay=0.05, factor=2.0, max_delay=0.4)

consumer = Consumer(
    None,
    registry,
    repository=tallies,
    retry=RETRY,
    key=lambda message: message.payload.key,
)


def effects_table(store: SQLStore) -> str:
    """The effects table's qualified name, next to the store's tables."""
    schema = store.metadata.schema
    name = f"{store.prefix}effects"
    return f'"{schema}"."{name}"' if schema else f'"{name}"'


@consumer.subscribe(TOPIC)
async def count(
    message: Message[Counted],
    session: Session = Depends(current_session),
    connection: AsyncConnection = Depends(current_connection),
) -> None:
    """Append the number to the key's tally and insert an effect row, in the session."""
    repository = cast(StoreRepository[Tally], session.repository)
    key, n = message.payload.key, message.payload.n
    try:
        tally = await repository.aget(key)
    except NotFound:
        tally = Tally(Root(key))
        repository.add(tally)
    tally.numbers.append(n)
    store = repository.transaction.store if repository.transaction else None
    assert isinstance(store, SQLStore)
    insert = f"INSERT INTO {effects_table(store)} (n, key, message_id, pid) VALUES (%s, %s, %s, %s)"
    await connection.exec_driver_sql(insert, (n, key, message.id, os.getpid()))


# The fork server --------------------------------------------------------------------------


def fork_workers(arguments: list[str]) -> int:
    """Serve `start` lines on stdin: see the module docstring."""
    _load(arguments)
    print("ready", flush=True)
    for line in sys.stdin:
        assert line.strip() == "start", line
        pid = os.fork()
        if pid == 0:
            _worker(arguments)  # never returns
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exited {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _load(arguments: list[str]) -> None:
    """Import what the command will: the consumer, the worker, the driver, the client."""
    import pybondi.messaging.worker  # noqa: F401
    from pybondi.messaging.brokers import connect

    importlib.import_module(__spec__.name if __spec__ else "tests.crash_worker")

    def option(name: str) -> str:
        return arguments[arguments.index(name) + 1]

    SQLStore(option("--store"), asynchronous=True)  # an engine connects only when used
    connect(option("--broker"))  # nor does an adapter


def _worker(arguments: list[str]) -> None:
    """In the forked process: run the command, and exit with its status."""
    status = 1
    try:
        random.seed()  # not the sequence of the worker before
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(2, 1)  # stdout is the fork server's line to the test
        status = main(arguments)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(status)


def _main(argv: list[str]) -> Any:
    if argv[:1] == ["--fork"]:
        return fork_workers(argv[1:])
    return main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
