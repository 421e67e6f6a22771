"""The `pybondi` command.

    pybondi relay --store postgresql://localhost/bank --broker amqp://guest:guest@localhost/

`relay` sends the outbox's committed rows to the broker until SIGTERM or Ctrl-C, then
finishes the batch under way, gives its leases back and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pybondi.relay import Relay
    from pybondi.stores.sql import SQLStore

__all__ = ["main"]

logger = logging.getLogger("pybondi.relay")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pybondi` command line; return the exit status."""
    parser = _parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(asyncio.run(_relay(arguments)))
    except KeyboardInterrupt:  # a second Ctrl-C, during shutdown
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pybondi", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser(
        "relay", help="send the outbox's committed messages to a broker, until SIGTERM"
    )
    relay.add_argument("--store", required=True, help="database URL of the outbox's SQLStore")
    relay.add_argument(
        "--broker", required=True, type=_broker_url, help="redis://, amqp:// or nats:// URL"
    )
    relay.add_argument(
        "--broker-option",
        action="append",
        default=[],
        type=_option,
        metavar="NAME=VALUE",
        help="an option of the broker adapter, such as prefix=app_ or exchange=app "
        "(RabbitMQ); VALUE is read as JSON if it is JSON, else as text; repeatable",
    )
    relay.add_argument("--schema", help="the tables' schema (PostgreSQL) or database (MariaDB)")
    relay.add_argument("--prefix", default="pybondi_", help="the tables' name prefix")
    relay.add_argument("--batch-size", type=_positive, default=100, help="rows per batch")
    relay.add_argument(
        "--lease", type=_above_0, default=30.0, help="seconds a topic's lease lasts (default 30)"
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
    relay.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


async def _relay(arguments: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 - the store brings it

    from pybondi.brokers import connect  # noqa: PLC0415 - each needs its extra
    from pybondi.relay import Relay  # noqa: PLC0415
    from pybondi.stores.sql import SQLStore  # noqa: PLC0415

    try:
        store = SQLStore(
            arguments.store, asynchronous=True, schema=arguments.schema, prefix=arguments.prefix
        )
    except (ImportError, ValueError, SQLAlchemyError) as error:  # MissingDependency, a bad URL
        return _refuse(
            f"cannot use --store {arguments.store}: {str(error).rstrip('.')}. The relay needs "
            f"an async driver: give the URL without one (postgresql://, mariadb://, "
            f"sqlite:///file.db) and pybondi picks it."
        )
    try:
        if not await _tables_ready(store, arguments.create_tables):
            return 2
        relay = Relay(
            store,
            connect(arguments.broker, **dict(arguments.broker_option)),
            batch_size=arguments.batch_size,
            lease=arguments.lease,
            retention=timedelta(hours=arguments.retention),
            grace=arguments.grace,
        )
        _stop_on_signals(relay)
        logger.info("Relay %s started: %r", relay.name, relay)
        await relay.run()
        logger.info("Relay %s stopped after sending %d message(s)", relay.name, relay.sent)
        return 0
    finally:
        await store.adispose()


async def _tables_ready(store: SQLStore, create: bool) -> bool:
    """Create the tables, or check that they exist; False (with a message) if missing."""
    from sqlalchemy.exc import DBAPIError  # noqa: PLC0415

    for attempt in itertools.count():
        try:
            if create:
                await store.acreate_tables()
                return True
            missing = await store.amissing_tables()
            break
        except DBAPIError as error:  # unreachable, most likely: wait until it answers
            delay = min(30.0, 0.5 * 2**attempt)
            first_line = str(error.orig or error).splitlines()[0]
            logger.warning("Cannot reach the store (%s); retrying in %.1f s", first_line, delay)
            await asyncio.sleep(delay)
    if missing:
        _refuse(
            f"{store!r} lacks the tables {', '.join(missing)}: create them with "
            f"--create-tables here, or store.create_tables() in your application."
        )
    return not missing


def _stop_on_signals(relay: Relay) -> None:
    """SIGTERM and Ctrl-C stop the relay gracefully; a second Ctrl-C interrupts it."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, relay.stop)

    def interrupted() -> None:
        relay.stop()
        loop.remove_signal_handler(signal.SIGINT)  # the next one raises KeyboardInterrupt

    loop.add_signal_handler(signal.SIGINT, interrupted)


def _refuse(problem: str) -> int:
    print(f"pybondi relay: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
