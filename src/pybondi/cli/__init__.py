"""The `pybondi` command.

    pybondi relay --store postgresql://localhost/bank --broker amqp://guest:guest@localhost/
    pybondi worker myapp.consumers:consumer --store postgresql://localhost/bank \
        --broker amqp://guest:guest@localhost/ --workers 4
    pybondi dead-letters list --store postgresql://localhost/bank
    pybondi project myapp.views:balances --store postgresql://localhost/bank

`relay` sends the outbox's committed rows to the broker until SIGTERM or Ctrl-C, then
finishes the batch under way, gives its leases back and exits 0.

`worker` handles the messages of a `pybondi.messaging.Consumer` (see
`pybondi.messaging.worker`), or those of `--topic`s dispatched to a `Messagebus`, until
SIGTERM or Ctrl-C, then finishes the messages under way and exits 0. With `--workers N`
it starts N worker processes, restarts one that dies, and passes them SIGTERM.

`project` keeps projections (`pybondi.projection`) up to date from the store's log, each
from its checkpoint and with a lease of its own, until SIGTERM or Ctrl-C; it logs their
lag, and exits 1 if one of them stops on an event that keeps failing.

`dead-letters` lists, shows, replays (through the outbox: run a relay) or discards the
messages workers gave up on.

Each command is a module of this package (`relay`, `worker`, `project`, `deadletters`) with its
options and its run; `supervisor` runs several workers; `options` and `running` hold
what they share. `--store` and `--broker` default to `$PYBONDI_STORE_URL` and
`$PYBONDI_BROKER_URL`, which keep passwords out of the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pybondi.cli import deadletters, project, relay, worker
from pybondi.cli.options import BROKER_URL, STORE_URL
from pybondi.cli.running import running
from pybondi.tracing import TracingFilter

__all__ = ["BROKER_URL", "STORE_URL", "main"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(message_id)s %(correlation_id)s]: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `pybondi` command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = _parser().parse_args(argv)
    running.append(arguments.command)
    logging.basicConfig(level=arguments.log_level.upper(), format=_LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(TracingFilter())  # the ids of the message being handled
    try:
        if arguments.command == "relay":
            return int(asyncio.run(relay.run(arguments)))
        if arguments.command == "worker":
            return worker.run(arguments, argv)
        if arguments.command == "project":
            return project.run(arguments)
        return int(asyncio.run(deadletters.run(arguments)))
    except KeyboardInterrupt:  # a second Ctrl-C, during shutdown
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pybondi", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (relay, worker, project, deadletters):
        command.add_parser(commands)
    return parser
