"""What every command does around its work: signals, the store, refusals."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pybondi._redact import redact, scrub
from pybondi.messaging.backoff import backoff

if TYPE_CHECKING:
    import argparse

    from pybondi.persistence.sql import SQLStore

__all__ = ["Service", "Signals", "open_store", "refuse", "running", "serve", "tables_ready"]

logger = logging.getLogger("pybondi.cli")

T = TypeVar("T")


class Service(Protocol):
    """What a long-running command runs: a relay, a worker, a projection."""

    async def run(self) -> None:
        """Work until `stop()`."""

    def stop(self) -> None:
        """Finish what is under way (within a grace), then return from `run`."""


S = TypeVar("S", bound=Service)


async def serve(
    arguments: argparse.Namespace,
    build: Callable[[SQLStore], S],
    stopped: Callable[[S], str],
    *,
    asynchronous: bool = True,
    connections: int | None = None,
) -> int:
    """Run the service `build` makes on the store of `--store`, until SIGTERM or Ctrl-C.

    The store is waited for (and its tables made with `--create-tables`) first; a wrong
    option or name (a TypeError or ValueError) is refused. `stopped` says what the
    service did, for the log. Returns the exit status.
    """
    signals = Signals()  # first: a SIGTERM while the store is awaited ends the wait
    store = open_store(arguments, asynchronous=asynchronous, connections=connections)
    if store is None:
        return 2
    try:
        if not await signals.unless_stopped(tables_ready(store, arguments.create_tables)):
            return 0 if signals.received else 2
        try:
            service = build(store)
            signals.forward(service.stop)
            logger.info("%s started: %r", type(service).__name__, service)
            await service.run()
        except (TypeError, ValueError) as error:  # a wrong option, group or topic name
            return refuse(f"{type(error).__name__}: {error}")
        logger.info("%s", stopped(service))
        return 0
    finally:
        await store.adispose()


running = ["pybondi"]
"""The command under way, last, for error messages."""


def open_store(
    arguments: argparse.Namespace, asynchronous: bool = True, connections: int | None = None
) -> SQLStore | None:
    """The store of `--store`, or None after saying why it cannot be used.

    `connections`: how many the store's pool keeps open (PostgreSQL, MariaDB), and no
    more, for a worker's sessions at once: the default five would open and close the
    others all the time.
    """
    import sqlalchemy as sa  # noqa: PLC0415 - the store brings it
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from pybondi.persistence.sql import SQLStore  # noqa: PLC0415

    try:
        url = sa.make_url(arguments.store)
        # A SQLite file's engine pools its connections as a server's does (each async one
        # is a thread of its own); an in-memory database keeps one, and takes no size.
        in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
        pooled = connections and not in_memory
        pool: dict[str, Any] = {"pool_size": connections, "max_overflow": 0} if pooled else {}
        return SQLStore(
            arguments.store,
            asynchronous=asynchronous,
            schema=arguments.schema,
            prefix=arguments.prefix,
            **pool,
        )
    except (ImportError, ValueError, SQLAlchemyError) as error:  # MissingDependency, a bad URL
        driver = "an async driver" if asynchronous else "a driver"
        refuse(
            f"cannot use --store {redact(arguments.store)}: "
            f"{scrub(str(error), arguments.store).rstrip('.')}. This needs {driver}: give the "
            f"URL without one (postgresql://, mariadb://, sqlite:///file.db) and pybondi picks it."
        )
        return None


async def tables_ready(store: SQLStore, create: bool, wait: bool = True) -> bool:
    """Create the tables, or check that they exist; False (with a message) if missing.

    A store that cannot be reached is waited for (a service starting with its database),
    unless not `wait` (a command run once): then it is refused.
    """
    from sqlalchemy.exc import DBAPIError  # noqa: PLC0415

    url = store.engine.url.render_as_string(hide_password=False)
    for attempt in itertools.count():
        try:
            if create:
                await store.acreate_tables()
                return True
            missing = await store.amissing_tables()
            break
        except DBAPIError as error:  # unreachable, most likely: wait until it answers
            first_line = scrub(str(error.orig or error).splitlines()[0], url)
            if not wait:
                refuse(f"cannot reach {store!r}: {first_line}")
                return False
            delay = backoff(attempt + 1, first=0.5, longest=30.0)
            logger.warning("Cannot reach the store (%s); retrying in %.1f s", first_line, delay)
            await asyncio.sleep(delay)
    if missing:
        refuse(
            f"{store!r} lacks the tables {', '.join(missing)}: create them with "
            f"--create-tables here, or store.create_tables() in your application."
        )
    return not missing


class Signals:
    """SIGTERM and Ctrl-C, caught from the command's first moment.

    Before the relay or worker runs (while the command waits for its store, say), they
    end the wait and the command exits 0; once it runs, they go to its `stop()`. A
    second Ctrl-C interrupts.
    """

    def __init__(self) -> None:
        self.received = False
        self._stopped = asyncio.Event()
        self._stop: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._signalled)

        def interrupted() -> None:
            self._signalled()
            loop.remove_signal_handler(signal.SIGINT)  # the next one raises KeyboardInterrupt

        loop.add_signal_handler(signal.SIGINT, interrupted)

    def forward(self, stop: Callable[[], None]) -> None:
        """Send the signals to `stop` from now on (and now, if one came already)."""
        self._stop = stop
        if self.received:
            stop()

    async def unless_stopped(self, work: Awaitable[T]) -> T | None:
        """What `work` returns, or None if a signal came first (then `work` is cancelled)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait((task,))
        return None if task.cancelled() else task.result()

    def _signalled(self) -> None:
        self.received = True
        self._stopped.set()
        if self._stop is not None:
            self._stop()


def refuse(problem: str) -> int:
    """Say on stderr why the command cannot go on; return 2, its exit status."""
    print(f"pybondi {running[-1]}: {problem}", file=sys.stderr)
    return 2
