"""`pybondi project`: keep projections up to date from the store's log, until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pybondi.cli.options import (
    above_0,
    at_least_0,
    positive,
    service_arguments,
    store_arguments,
    target,
)
from pybondi.cli.running import refuse, serve

if TYPE_CHECKING:
    from pybondi.persistence.sql import SQLStore
    from pybondi.projection import Projection, ProjectionRunner

__all__ = ["Projections", "add_parser", "run"]

logger = logging.getLogger("pybondi.cli")


def add_parser(commands: Any) -> None:
    """Add `project` and its options to the command line's subcommands."""
    project = commands.add_parser(
        "project", help="keep projections up to date from the store's log, until SIGTERM"
    )
    project.add_argument(
        "projections",
        nargs="+",
        type=target,
        metavar="module:projection",
        help="the Projection(s) to run, each with a lease of its own",
    )
    store_arguments(project)
    project.add_argument(
        "--rebuild",
        action="store_true",
        help="first empty each view (its reset hook) and start over from the log's first "
        "event; for a deploy step, not for a service's restarts",
    )
    project.add_argument(
        "--sync",
        action="store_true",
        help="a sync store, each batch in a thread: for sync handlers that use "
        "Depends(current_connection) as a Connection",
    )
    project.add_argument("--batch-size", type=positive, default=100, help="events per batch")
    project.add_argument(
        "--lease",
        type=above_0,
        default=30.0,
        help="seconds a projection's lease lasts before another instance may take over "
        "(default 30)",
    )
    project.add_argument(
        "--idle",
        type=above_0,
        default=0.2,
        help="seconds between looks at the log once caught up (default 0.2)",
    )
    project.add_argument(
        "--attempts",
        type=positive,
        default=5,
        help="failures in a row on one event after which the command stops (default 5)",
    )
    project.add_argument(
        "--report-every",
        type=at_least_0,
        default=10.0,
        help="seconds between the lag's log lines while behind (default 10)",
    )
    service_arguments(
        project, grace=10.0, stops="within which a stop is over, the batches under way included"
    )


def run(arguments: argparse.Namespace) -> int:
    """Run the projections until SIGTERM or Ctrl-C; return the exit status."""
    from pybondi.projection import Projection, ProjectionFailed  # noqa: PLC0415

    projections: list[Projection] = arguments.projections
    for found in projections:
        if not isinstance(found, Projection):
            return refuse(f"{type(found).__name__} is not a pybondi.projection.Projection")
    names = [projection.name for projection in projections]
    if len(set(names)) != len(names):
        return refuse(f"each projection runs once: the names {names} repeat")

    def several(store: SQLStore) -> Projections:
        return Projections(
            [_runner(arguments, projection, store) for projection in projections], arguments.rebuild
        )

    def stopped(service: Projections) -> str:
        return "Projections stopped: " + ", ".join(
            f"{runner.projection.name} at {runner.reached} ({runner.handled} handled)"
            for runner in service.runners
        )

    try:
        return int(
            asyncio.run(
                serve(
                    arguments,
                    several,
                    stopped,
                    asynchronous=not arguments.sync,
                    connections=len(projections) + 2,
                )
            )
        )
    except ProjectionFailed as failed:
        logger.error("%s", failed)
        return 1


def _runner(
    arguments: argparse.Namespace, projection: Projection, store: SQLStore
) -> ProjectionRunner:
    from pybondi.projection import ProjectionRunner  # noqa: PLC0415

    return ProjectionRunner(
        projection,
        store,
        batch_size=arguments.batch_size,
        lease=arguments.lease,
        idle=arguments.idle,
        attempts=arguments.attempts,
        report_every=arguments.report_every,
        grace=arguments.grace,
    )


class Projections:
    """Several projection runners as one service: run together, stopped together.

    One that fails (`ProjectionFailed`) stops the others, within their grace, and its
    error ends `run`: a process with a projection stopped inside it would look alive.
    """

    def __init__(self, runners: list[ProjectionRunner], rebuild: bool) -> None:
        self.runners = runners
        self.rebuild = rebuild

    def __repr__(self) -> str:
        return f"<Projections {', '.join(repr(runner) for runner in self.runners)}>"

    async def run(self) -> None:
        """Run every runner until `stop()`, or until one fails."""
        tasks = [asyncio.ensure_future(runner.run(rebuild=self.rebuild)) for runner in self.runners]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self.stop()
            await asyncio.wait(tasks)
        for task in tasks:
            task.result()  # the first failure, if any

    def stop(self) -> None:
        """Ask every runner to stop within its grace."""
        for runner in self.runners:
            runner.stop()
