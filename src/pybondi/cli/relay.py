"""`pybondi relay`: send the outbox's committed messages to a broker, until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from typing import Any

from pybondi.cli.options import (
    above_0,
    at_least_0,
    broker_arguments,
    log_level,
    positive,
    store_arguments,
)
from pybondi.cli.running import Signals, open_store, tables_ready

__all__ = ["add_parser", "run"]

logger = logging.getLogger("pybondi.cli")


def add_parser(commands: Any) -> None:
    """Add `relay` and its options to the command line's subcommands."""
    relay = commands.add_parser(
        "relay", help="send the outbox's committed messages to a broker, until SIGTERM"
    )
    store_arguments(relay)
    broker_arguments(relay)
    relay.add_argument("--batch-size", type=positive, default=100, help="rows per batch")
    relay.add_argument(
        "--lease", type=above_0, default=30.0, help="seconds a topic's lease lasts (default 30)"
    )
    relay.add_argument(
        "--idle",
        type=above_0,
        default=0.2,
        help="seconds between looks at an outbox with nothing to send (default 0.2)",
    )
    relay.add_argument(
        "--retention", type=at_least_0, default=24.0, help="hours to keep sent rows (default 24)"
    )
    relay.add_argument(
        "--grace",
        type=at_least_0,
        default=10.0,
        help="seconds within which a stop is over, the batch under way included (default 10)",
    )
    relay.add_argument(
        "--create-tables", action="store_true", help="create the store's tables if missing"
    )
    log_level(relay)


async def run(arguments: argparse.Namespace) -> int:
    """Relay until SIGTERM or Ctrl-C; return the exit status."""
    signals = Signals()  # first: a SIGTERM while the store is awaited ends the wait
    from pybondi.messaging.brokers import connect  # noqa: PLC0415 - each needs its extra
    from pybondi.messaging.relay import Relay  # noqa: PLC0415

    store = open_store(arguments)
    if store is None:
        return 2
    try:
        if not await signals.unless_stopped(tables_ready(store, arguments.create_tables)):
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
