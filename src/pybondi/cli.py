"""The `pybondi` command.

    pybondi relay --store postgresql://localhost/bank --broker amqp://guest:guest@localhost/
    pybondi worker myapp.consumers:consumer --store postgresql://localhost/bank \
        --broker amqp://guest:guest@localhost/ --workers 4
    pybondi dead-letters list --store postgresql://localhost/bank

`relay` sends the outbox's committed rows to the broker until SIGTERM or Ctrl-C, then
finishes the batch under way, gives its leases back and exits 0.

`worker` handles the messages of a `pybondi.consumer.Consumer` (see `pybondi.worker`),
or those of `--topic`s dispatched to a `Messagebus`, until SIGTERM or Ctrl-C, then
finishes the messages under way and exits 0. With `--workers N` it starts N worker
processes, restarts one that dies, and passes them SIGTERM.

`dead-letters` lists, shows, replays (through the outbox: run a relay) or discards the
messages workers gave up on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from pybondi._redact import redact, scrub
from pybondi.brokers.base import DEFAULT_GROUP
from pybondi.tracing import TracingFilter

if TYPE_CHECKING:
    from pybondi.consumer import Consumer
    from pybondi.stores.sql import SQLStore

__all__ = ["BROKER_URL", "STORE_URL", "main"]

logger = logging.getLogger("pybondi.cli")

STORE_URL = "PYBONDI_STORE_URL"
"""The environment variable `--store` defaults to."""
BROKER_URL = "PYBONDI_BROKER_URL"
"""The environment variable `--broker` defaults to."""


T = TypeVar("T")

_running = ["pybondi"]  # the command under way, for error messages
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(message_id)s %(correlation_id)s]: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pybondi` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = _parser().parse_args(argv)
    _running.append(arguments.command)
    logging.basicConfig(level=arguments.log_level.upper(), format=_LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(TracingFilter())  # the ids of the message being handled
    try:
        if arguments.command == "relay":
            return int(asyncio.run(_relay(arguments)))
        if arguments.command == "worker":
            return _workers(arguments, argv)
        return int(asyncio.run(_dead_letters(arguments)))
    except KeyboardInterrupt:  # a second Ctrl-C, during shutdown
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pybondi", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser(
        "relay", help="send the outbox's committed messages to a broker, until SIGTERM"
    )
    _store_arguments(relay)
    _broker_arguments(relay)
    relay.add_argument("--batch-size", type=_positive, default=100, help="rows per batch")
    relay.add_argument(
        "--lease", type=_above_0, default=30.0, help="seconds a topic's lease lasts (default 30)"
    )
    relay.add_argument(
        "--idle",
        type=_above_0,
        default=0.2,
        help="seconds between looks at an outbox with nothing to send (default 0.2)",
    )
    relay.add_argument(
        "--retention", type=_at_least_0, default=24.0, help="hours to keep sent rows (default 24)"
    )
    relay.add_argument(
        "--grace",
        type=_at_least_0,
        default=10.0,
        help="seconds a stop waits for the batch under way (default 10)",
    )
    relay.add_argument(
        "--create-tables", action="store_true", help="create the store's tables if missing"
    )
    _log_level(relay)
    _worker_parser(commands)
    _dead_letters_parser(commands)
    return parser


def _worker_parser(commands: Any) -> None:
    worker = commands.add_parser(
        "worker", help="handle a consumer's messages from a broker, until SIGTERM"
    )
    worker.add_argument(
        "consumer",
        type=_target,
        help="the Consumer to run (or a Messagebus, with --topic), as module:name",
    )
    worker.add_argument(
        "--topic",
        action="append",
        default=[],
        help="a topic whose commands and events go to the messagebus; repeatable",
    )
    worker.add_argument("--registry", type=_target, help="the Registry of their types")
    worker.add_argument("--group", help="the consumer group (default: the consumer's)")
    _store_arguments(worker)
    _broker_arguments(worker)
    worker.add_argument(
        "--workers", type=_positive, default=1, help="worker processes to run (default 1)"
    )
    worker.add_argument(
        "--sync",
        action="store_true",
        help="sync sessions, each in a thread (for sync handlers that use repository.get)",
    )
    worker.add_argument(
        "--grace",
        type=_at_least_0,
        default=30.0,
        help="seconds a stop waits for the messages under way (default 30)",
    )
    worker.add_argument(
        "--redeliver-after",
        type=_above_0,
        default=60.0,
        help="seconds after which the messages of a silent worker go to another (default 60)",
    )
    worker.add_argument(
        "--create-tables", action="store_true", help="create the store's tables if missing"
    )
    _log_level(worker)


def _dead_letters_parser(commands: Any) -> None:
    letters = commands.add_parser(
        "dead-letters", help="list, show, replay or discard the messages workers gave up on"
    )
    actions = letters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="one line per dead letter, oldest first")
    show = actions.add_parser("show", help="a dead letter in full: headers, body, error")
    show.add_argument("ids", type=_id, nargs="+", metavar="ID")
    replay = actions.add_parser(
        "replay", help="send dead letters to their topic again, through the outbox"
    )
    discard = actions.add_parser("discard", help="delete dead letters for good")
    for action in (replay, discard):
        action.add_argument("ids", type=_id, nargs="*", metavar="ID")
        action.add_argument(
            "--all", action="store_true", help="every dead letter (of --group/--topic)"
        )
    for action in (listing, replay, discard):
        action.add_argument("--group", help="only those of this consumer group")
        action.add_argument("--topic", help="only those of this topic")
    listing.add_argument("--limit", type=_positive, default=100, help="at most (default 100)")
    listing.add_argument("--after", type=int, default=0, help="ids above this one")
    for action in (listing, show, replay, discard):
        _store_arguments(action)
        _log_level(action)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        **_from_environment(STORE_URL),
        help=f"database URL of the SQLStore (default: ${STORE_URL}, which keeps a password "
        f"out of the process list)",
    )
    parser.add_argument("--schema", help="the tables' schema (PostgreSQL) or database (MariaDB)")
    parser.add_argument("--prefix", default="pybondi_", help="the tables' name prefix")


def _broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        type=_broker_url,
        **_from_environment(BROKER_URL),
        help=f"redis://, amqp:// or nats:// URL (default: ${BROKER_URL})",
    )
    parser.add_argument(
        "--broker-option",
        action="append",
        default=[],
        type=_option,
        metavar="NAME=VALUE",
        help="an option of the broker adapter, such as prefix=app_ or exchange=app "
        "(RabbitMQ); VALUE is read as JSON if it is JSON, else as text; repeatable",
    )


def _from_environment(variable: str) -> dict[str, Any]:
    """An option's default from an environment variable; required when that is unset."""
    value = os.environ.get(variable)
    return {"default": value} if value else {"required": True}


def _log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def _target(text: str) -> Any:
    """The object named `module:attribute`, imported from the current directory too."""
    module_name, colon, attribute = text.partition(":")
    if not colon or not module_name or not attribute:
        raise argparse.ArgumentTypeError(
            f"expected module:name, as in myapp.consumers:app, got {text!r}"
        )
    if os.getcwd() not in sys.path:  # as `python -m` would: the application is here
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as error:  # whatever importing the application raises, say it in a line
        raise argparse.ArgumentTypeError(
            f"cannot load {text}: {type(error).__name__}: {error}"
        ) from None
    return found


def _consumer(arguments: argparse.Namespace) -> Consumer:
    """The consumer to run: the target, or one that dispatches `--topic`s to a bus."""
    from pybondi.consumer import Consumer  # noqa: PLC0415
    from pybondi.messagebus import Messagebus  # noqa: PLC0415
    from pybondi.serialization import Registry  # noqa: PLC0415

    target, registry = arguments.consumer, arguments.registry
    if registry is not None and not isinstance(registry, Registry):
        raise ValueError(f"--registry is a {type(registry).__name__}, not a Registry")
    if isinstance(target, Messagebus):
        if not arguments.topic:
            raise ValueError(
                "a Messagebus needs the topics whose commands and events it handles: "
                "--topic NAME (repeatable), and --registry module:name for their types"
            )
        target = Consumer(target, registry, group=arguments.group or DEFAULT_GROUP)
    elif isinstance(target, Consumer):
        target.group = arguments.group or target.group
        target.registry = registry or target.registry
    else:
        raise ValueError(
            f"{type(target).__name__} is neither a pybondi.consumer.Consumer nor a Messagebus"
        )
    if arguments.topic:
        target.dispatch(*arguments.topic)
    return target


def _broker_url(url: str) -> str:
    from pybondi.brokers import check_url  # noqa: PLC0415 - only the relay needs it

    try:
        check_url(url)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return url


def _option(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, as in prefix=app_, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def _above_0(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _at_least_0(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _id(text: str) -> int:
    value = _positive(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"no dead letter has an id that large: {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _open_store(
    arguments: argparse.Namespace, asynchronous: bool = True, connections: int | None = None
) -> SQLStore | None:
    """The store of `--store`, or None after saying why it cannot be used.

    `connections`: how many the store's pool keeps open (PostgreSQL, MariaDB), and no
    more, for a worker's sessions at once: the default five would open and close the
    others all the time.
    """
    import sqlalchemy as sa  # noqa: PLC0415 - the store brings it
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from pybondi.stores.sql import SQLStore  # noqa: PLC0415

    try:
        pooled = connections and sa.make_url(arguments.store).get_backend_name() != "sqlite"
        return SQLStore(
            arguments.store,
            asynchronous=asynchronous,
            schema=arguments.schema,
            prefix=arguments.prefix,
            **({"pool_size": connections, "max_overflow": 0} if pooled else {}),
        )
    except (ImportError, ValueError, SQLAlchemyError) as error:  # MissingDependency, a bad URL
        driver = "an async driver" if asynchronous else "a driver"
        _refuse(
            f"cannot use --store {redact(arguments.store)}: "
            f"{scrub(str(error), arguments.store).rstrip('.')}. This needs {driver}: give the "
            f"URL without one (postgresql://, mariadb://, sqlite:///file.db) and pybondi picks it."
        )
        return None


async def _relay(arguments: argparse.Namespace) -> int:
    signals = _Signals()  # first: a SIGTERM while the store is awaited ends the wait
    from pybondi.brokers import connect  # noqa: PLC0415 - each needs its extra
    from pybondi.relay import Relay  # noqa: PLC0415

    store = _open_store(arguments)
    if store is None:
        return 2
    try:
        if not await signals.unless_stopped(_tables_ready(store, arguments.create_tables)):
            return 0 if signals.received else 2
        relay = Relay(
            store,
            connect(arguments.broker, **dict(arguments.broker_option)),
            batch_size=arguments.batch_size,
            idle=arguments.idle,
            lease=arguments.lease,
            retention=timedelta(hours=arguments.retention),
            grace=arguments.grace,
        )
        signals.forward(relay.stop)
        logger.info("Relay %s started: %r", relay.name, relay)
        await relay.run()
        logger.info("Relay %s stopped after sending %d message(s)", relay.name, relay.sent)
        return 0
    finally:
        await store.adispose()


async def _tables_ready(store: SQLStore, create: bool, wait: bool = True) -> bool:
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
                _refuse(f"cannot reach {store!r}: {first_line}")
                return False
            delay = min(30.0, 0.5 * 2**attempt)
            logger.warning("Cannot reach the store (%s); retrying in %.1f s", first_line, delay)
            await asyncio.sleep(delay)
    if missing:
        _refuse(
            f"{store!r} lacks the tables {', '.join(missing)}: create them with "
            f"--create-tables here, or store.create_tables() in your application."
        )
    return not missing


class _Signals:
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


def _refuse(problem: str) -> int:
    print(f"pybondi {_running[-1]}: {problem}", file=sys.stderr)
    return 2


# The worker -----------------------------------------------------------------------------


def _workers(arguments: argparse.Namespace, argv: list[str]) -> int:
    """Run one worker here, or supervise `--workers` worker processes."""
    try:
        consumer = _consumer(arguments)  # refused here once, not in every process
    except (TypeError, ValueError) as error:
        return _refuse(str(error))
    if arguments.workers == 1:
        return int(asyncio.run(_worker(arguments, consumer)))
    return _Supervisor([sys.executable, "-m", "pybondi", *argv, "--workers", "1"]).run(
        arguments.workers
    )


async def _worker(arguments: argparse.Namespace, consumer: Consumer) -> int:
    signals = _Signals()  # first: a SIGTERM while the store is awaited ends the wait
    from pybondi.brokers import connect  # noqa: PLC0415 - each needs its extra
    from pybondi.worker import Worker  # noqa: PLC0415

    # A connection per message under way, one for the bookkeeping, one to spare.
    connections = consumer.in_flight + 2
    store = _open_store(arguments, asynchronous=not arguments.sync, connections=connections)
    if store is None:
        return 2
    try:
        if not await signals.unless_stopped(_tables_ready(store, arguments.create_tables)):
            return 0 if signals.received else 2
        try:
            worker = Worker(
                consumer,
                connect(arguments.broker, **dict(arguments.broker_option)),
                store,
                redeliver_after=arguments.redeliver_after,
                grace=arguments.grace,
            )
        except (TypeError, ValueError) as error:
            return _refuse(str(error))
        signals.forward(worker.stop)
        logger.info("Worker started: %r", worker)
        try:
            await worker.run()
        except (TypeError, ValueError) as error:  # a wrong option, group or topic name
            return _refuse(f"{type(error).__name__}: {error}")
        logger.info(
            "Worker %s stopped: %d handled, %d skipped (handled already), %d retried, "
            "%d dead-lettered",
            worker.name, worker.handled, worker.skipped, worker.retried, worker.dead_lettered,
        )  # fmt: skip
        return 0
    finally:
        await store.adispose()


class _Supervisor:
    """Runs N worker processes: restarts one that dies, passes SIGTERM and Ctrl-C on.

    A worker that exits 2 (a wrong argument) stops them all: every restart would fail.
    A second SIGTERM or Ctrl-C kills the workers at once; their messages come back to
    the group.
    """

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.signals = 0  # SIGTERM and SIGINT received

    def run(self, count: int) -> int:
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGINT, self._signalled)
        children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # and when started
        due = dict.fromkeys(range(count), 0.0)  # when to start each missing worker
        failures = dict.fromkeys(range(count), 0)  # deaths in a row, each soon after start
        status, passed_on = 0, 0
        while children or (due and not self.signals):
            if self.signals > passed_on:
                passed_on = self.signals
                due.clear()
                for child, _ in children.values():
                    child.send_signal(signal.SIGTERM if passed_on == 1 else signal.SIGKILL)
            now = time.monotonic()
            for index, at in list(due.items()):
                if at <= now:
                    del due[index]
                    children[index] = (self._spawn(index), now)
            time.sleep(0.1)
            for index, (child, started) in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                del children[index]
                if self.signals:
                    # A worker still starting dies of the SIGTERM passed on: no failure.
                    stopped = code == -signal.SIGTERM and passed_on
                    status = max(status, 0 if stopped else code if code >= 0 else 128 - code)
                elif code == 2:
                    status, self.signals = 2, 1  # the others stop too
                else:
                    lived = time.monotonic() - started
                    failures[index] = 0 if lived > _STABLE else failures[index] + 1
                    delay = min(30.0, 0.5 * 2 ** min(failures[index], 10))
                    delay = delay if failures[index] else 0.0
                    logger.warning(
                        "Worker process %d exited with %d; restarting it in %.1f s",
                        child.pid, code, delay,
                    )  # fmt: skip
                    due[index] = time.monotonic() + delay
        return 130 if passed_on > 1 else status

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(self.command, env={**os.environ, "PYBONDI_WORKER": str(index)})
        logger.info("Worker process %d started (%d)", child.pid, index)
        return child

    def _signalled(self, *_: object) -> None:
        self.signals += 1


_STABLE = 60.0  # seconds a worker process must live for its restart to be immediate


# Dead letters ---------------------------------------------------------------------------


async def _dead_letters(arguments: argparse.Namespace) -> int:
    from pybondi.deadletters import DeadLetters  # noqa: PLC0415

    store = _open_store(arguments)
    if store is None:
        return 2
    try:
        if not await _tables_ready(store, create=False, wait=False):
            return 2
        letters = DeadLetters(store)
        action: Callable[[DeadLetters, argparse.Namespace], Any] = _ACTIONS[arguments.action]
        return int(await action(letters, arguments))
    finally:
        await store.adispose()


async def _list(letters: Any, arguments: argparse.Namespace) -> int:
    found = await letters.list(
        group=arguments.group, topic=arguments.topic, after=arguments.after, limit=arguments.limit
    )
    for letter in found:
        reason = letter.error.splitlines()[0] if letter.error else ""
        print(
            f"{letter.id}\t{letter.failed_at:%Y-%m-%d %H:%M:%S}\t{letter.group}\t{letter.topic}"
            f"\t{letter.message_id}\t{letter.attempts}\t{reason}"
        )
    return 0


async def _show(letters: Any, arguments: argparse.Namespace) -> int:
    status = 0
    for id in arguments.ids:
        letter = await letters.get(id)
        if letter is None:
            print(f"pybondi dead-letters: no dead letter {id}", file=sys.stderr)
            status = 1
            continue
        print(f"Dead letter {letter.id}, failed at {letter.failed_at.isoformat()}")
        print(f"  group: {letter.group}\n  topic: {letter.topic}\n  id: {letter.message_id}")
        print(f"  attempts: {letter.attempts}\n  headers:")
        for name, value in letter.headers.items():
            print(f"    {name}: {value}")
        print(f"  body: {letter.body}\n  error:")
        print("    " + letter.error.replace("\n", "\n    "))
    return status


async def _selected(letters: Any, arguments: argparse.Namespace) -> list[int] | None:
    """The ids given, or every id of --group/--topic with --all; None if neither."""
    if arguments.ids and (arguments.all or arguments.group or arguments.topic):
        _refuse("give ids, or --all (with --group, --topic): not both")
        return None
    if arguments.ids:
        return sorted(set(arguments.ids))
    if not arguments.all:
        _refuse("give the ids of the dead letters, or --all (with --group, --topic)")
        return None
    ids: list[int] = []
    while batch := await letters.list(
        group=arguments.group, topic=arguments.topic, after=ids[-1] if ids else 0, limit=1000
    ):
        ids += [letter.id for letter in batch]
    return ids


async def _replay(letters: Any, arguments: argparse.Namespace) -> int:
    ids = await _selected(letters, arguments)
    if ids is None:
        return 2
    result = await letters.replay(ids)
    for letter in result.replayed:
        print(f"replayed {letter.id}: {letter.message_id} to {letter.topic}")
    if result.missing:
        missing = ", ".join(map(str, result.missing))
        print(f"pybondi dead-letters: no dead letter {missing}", file=sys.stderr)
    for id, reason in result.failed.items():
        print(f"pybondi dead-letters: cannot replay {id}: {reason}", file=sys.stderr)
    return 1 if result.missing or result.failed else 0


async def _discard(letters: Any, arguments: argparse.Namespace) -> int:
    ids = await _selected(letters, arguments)
    if ids is None:
        return 2
    discarded = await letters.discard(ids)
    print(f"discarded {discarded} dead letter(s)")
    return 0 if discarded == len(ids) else 1


_ACTIONS: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "list": _list,
    "show": _show,
    "replay": _replay,
    "discard": _discard,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
