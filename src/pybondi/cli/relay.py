"""`pybondi relay`: send the outbox's committed messages to a broker, until SIGTERM."""

from __future__ import annotations

import argparse
import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pybondi.cli.options import (
    above_0,
    at_least_0,
    broker_arguments,
    positive,
    service_arguments,
    store_arguments,
)
from pybondi.cli.running import serve

if TYPE_CHECKING:
    from pybondi.messaging.relay import Relay
    from pybondi.persistence.sql import SQLStore

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
    service_arguments(
        relay, grace=10.0, stops="within which a stop is over, the batch under way included"
    )


async def run(arguments: argparse.Namespace) -> int:
    """Relay until SIGTERM or Ctrl-C; return the exit status."""

    def relay(store: SQLStore) -> Relay:
        from pybondi.messaging.brokers import connect  # noqa: PLC0415 - each needs its extra
        from pybondi.messaging.relay import Relay  # noqa: PLC0415

        return Relay(
            store,
            connect(arguments.broker, **dict(arguments.broker_option)),
            batch_size=arguments.batch_size,
            idle=arguments.idle,
            lease=arguments.lease,
            retention=timedelta(hours=arguments.retention),
            grace=arguments.grace,
        )

    def stopped(relay: Relay) -> str:
        return f"Relay {relay.name} stopped after sending {relay.sent} message(s)"

    return await serve(arguments, relay, stopped)
