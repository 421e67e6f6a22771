"""The options the commands share: URLs (also from the environment), names, numbers."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

__all__ = [
    "BROKER_URL",
    "STORE_URL",
    "above_0",
    "at_least_0",
    "broker_arguments",
    "log_level",
    "positive",
    "store_arguments",
    "target",
]

STORE_URL = "PYBONDI_STORE_URL"
"""The environment variable `--store` defaults to."""
BROKER_URL = "PYBONDI_BROKER_URL"
"""The environment variable `--broker` defaults to."""


def store_arguments(parser: argparse.ArgumentParser) -> None:
    """`--store` (or `$PYBONDI_STORE_URL`), `--schema` and `--prefix`."""
    parser.add_argument(
        "--store",
        **from_environment(STORE_URL),
        help=f"database URL of the SQLStore (default: ${STORE_URL}, which keeps a password "
        f"out of the process list)",
    )
    parser.add_argument("--schema", help="the tables' schema (PostgreSQL) or database (MariaDB)")
    parser.add_argument("--prefix", default="pybondi_", help="the tables' name prefix")


def broker_arguments(parser: argparse.ArgumentParser) -> None:
    """`--broker` (or `$PYBONDI_BROKER_URL`) and `--broker-option`."""
    parser.add_argument(
        "--broker",
        type=broker_url,
        **from_environment(BROKER_URL),
        help=f"redis://, amqp:// or nats:// URL (default: ${BROKER_URL})",
    )
    parser.add_argument(
        "--broker-option",
        action="append",
        default=[],
        type=option,
        metavar="NAME=VALUE",
        help="an option of the broker adapter, such as prefix=app_ or exchange=app "
        "(RabbitMQ); VALUE is read as JSON if it is JSON, else as text; repeatable",
    )


def from_environment(variable: str) -> dict[str, Any]:
    """An option's default from an environment variable; required when that is unset."""
    value = os.environ.get(variable)
    return {"default": value} if value else {"required": True}


def log_level(parser: argparse.ArgumentParser) -> None:
    """`--log-level`."""
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def service_arguments(parser: argparse.ArgumentParser, *, grace: float, stops: str) -> None:
    """What every long-running command takes: `--grace`, `--create-tables`, `--log-level`.

    `stops` says what a stop waits for, within the grace.
    """
    parser.add_argument(
        "--grace",
        type=at_least_0,
        default=grace,
        help=f"seconds {stops} (default {grace:g})",
    )
    parser.add_argument(
        "--create-tables", action="store_true", help="create the store's tables if missing"
    )
    log_level(parser)


def target(text: str) -> Any:
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


def broker_url(url: str) -> str:
    from pybondi.messaging.brokers import check_url  # noqa: PLC0415 - only the relay needs it

    try:
        check_url(url)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return url


def option(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, as in prefix=app_, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def above_0(text: str) -> float:
    """A number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def at_least_0(text: str) -> float:
    """A number of at least 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def positive(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
