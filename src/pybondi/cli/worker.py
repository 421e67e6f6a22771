"""`pybondi worker`: handle a consumer's messages from a broker, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

from pybondi.cli.options import (
    above_0,
    broker_arguments,
    positive,
    service_arguments,
    store_arguments,
    target,
)
from pybondi.cli.running import refuse, serve
from pybondi.cli.supervisor import Supervisor
from pybondi.messaging.brokers.base import DEFAULT_GROUP

if TYPE_CHECKING:
    from pybondi.messaging.consumer import Consumer
    from pybondi.messaging.worker import Worker
    from pybondi.persistence.sql import SQLStore

__all__ = ["add_parser", "run"]

logger = logging.getLogger("pybondi.cli")


def add_parser(commands: Any) -> None:
    """Add `worker` and its options to the command line's subcommands."""
    worker = commands.add_parser(
        "worker", help="handle a consumer's messages from a broker, until SIGTERM"
    )
    worker.add_argument(
        "consumer",
        type=target,
        help="the Consumer to run (or a Messagebus, with --topic), as module:name",
    )
    worker.add_argument(
        "--topic",
        action="append",
        default=[],
        help="a topic whose commands and events go to the messagebus; repeatable",
    )
    worker.add_argument("--registry", type=target, help="the Registry of their types")
    worker.add_argument("--group", help="the consumer group (default: the consumer's)")
    store_arguments(worker)
    broker_arguments(worker)
    worker.add_argument(
        "--workers", type=positive, default=1, help="worker processes to run (default 1)"
    )
    worker.add_argument(
        "--sync",
        action="store_true",
        help="sync sessions, each in a thread (for sync handlers that use repository.get)",
    )
    worker.add_argument(
        "--redeliver-after",
        type=above_0,
        default=60.0,
        help="seconds after which the messages of a silent worker go to another (default 60)",
    )
    worker.add_argument(
        "--batch",
        type=positive,
        default=1,
        help="messages of different keys one transaction may commit together; a failed "
        "batch goes on one transaction per message (default 1: each its own)",
    )
    service_arguments(worker, grace=30.0, stops="a stop waits for the messages under way")


def run(arguments: argparse.Namespace, argv: list[str]) -> int:
    """Run one worker here, or supervise `--workers` worker processes."""
    try:
        consumer = _consumer(arguments)  # refused here once, not in every process
    except (TypeError, ValueError) as error:
        return refuse(str(error))
    if arguments.workers == 1:
        return int(asyncio.run(_worker(arguments, consumer)))
    return Supervisor([sys.executable, "-m", "pybondi", *argv, "--workers", "1"]).run(
        arguments.workers
    )


async def _worker(arguments: argparse.Namespace, consumer: Consumer) -> int:
    def worker(store: SQLStore) -> Worker:
        from pybondi.messaging.brokers import connect  # noqa: PLC0415 - each needs its extra
        from pybondi.messaging.worker import Worker  # noqa: PLC0415

        return Worker(
            consumer,
            connect(arguments.broker, **dict(arguments.broker_option)),
            store,
            redeliver_after=arguments.redeliver_after,
            grace=arguments.grace,
            batch=arguments.batch,
        )

    def stopped(worker: Worker) -> str:
        return (
            f"Worker {worker.name} stopped: {worker.handled} handled, {worker.skipped} skipped "
            f"(handled already), {worker.retried} retried, {worker.dead_lettered} dead-lettered"
        )

    # A connection per message under way, one for the bookkeeping, one to spare.
    connections = consumer.in_flight + 2
    return await serve(
        arguments, worker, stopped, asynchronous=not arguments.sync, connections=connections
    )


def _consumer(arguments: argparse.Namespace) -> Consumer:
    """The consumer to run: the target, or one that dispatches `--topic`s to a bus."""
    from pybondi.messagebus import Messagebus  # noqa: PLC0415
    from pybondi.messaging.consumer import Consumer  # noqa: PLC0415
    from pybondi.persistence.serialization import Registry  # noqa: PLC0415

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
            f"{type(target).__name__} is neither a pybondi.messaging.Consumer nor a Messagebus"
        )
    if arguments.topic:
        target.dispatch(*arguments.topic)
    return target
