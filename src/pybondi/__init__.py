"""pybondi: event-driven systems with domain-driven design, sync and async.

Commands and events go through a `Messagebus` to handlers that receive dependencies
with `Depends`; aggregates collect domain events on their `Root`; a `Repository` stores
and restores them; a `Session` runs one unit of work and a `Publisher` sends messages
out when it commits.

The main classes of persistence and messaging are here too (`SQLStore`, `Outbox`,
`Worker`...), imported on first use: `import pybondi` loads no database driver or broker
client, and a class whose extra is missing raises `MissingDependency` naming it. They
are not in `__all__`, so that `from pybondi import *` stays as light.

Classes keep the module that defines them as `__module__` (`pybondi.session.Session`,
a public module too), so that `inspect.getsource` and tools built on it find them.
"""

from typing import TYPE_CHECKING, Any

from pybondi.aggregate import Aggregate, Entity, Factory, Root
from pybondi.callbacks import Callback, Callbacks
from pybondi.depends import Depends
from pybondi.events import Added, Commited, Committed, RolledBack
from pybondi.exceptions import (
    AsyncRequired,
    ConcurrencyError,
    DeliveryError,
    DuplicateHandler,
    HandlerNotFound,
    InvalidHandler,
    MessageLimitExceeded,
    MissingDependency,
    NotFound,
    PublishError,
    PybondiError,
    SerializationError,
    SessionError,
    UnknownMessageType,
)
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, Message, Publisher
from pybondi.repository import Repository
from pybondi.session import Session

if TYPE_CHECKING:  # what __getattr__ imports on first use, for type checkers
    from pybondi.consumer import Consumer as Consumer
    from pybondi.consumer import Retry as Retry
    from pybondi.outbox import Outbox as Outbox
    from pybondi.relay import Relay as Relay
    from pybondi.repositories import EventSourcedRepository as EventSourcedRepository
    from pybondi.repositories import StateRepository as StateRepository
    from pybondi.repositories import TableRepository as TableRepository
    from pybondi.serialization import Registry as Registry
    from pybondi.stores.memory import MemoryStore as MemoryStore
    from pybondi.stores.sql import SQLStore as SQLStore
    from pybondi.worker import Worker as Worker

__version__ = "2.0.0.dev0"

__all__ = [
    "Added",
    "Aggregate",
    "AsyncRequired",
    "BasePublisher",
    "Callback",
    "Callbacks",
    "Command",
    "Commited",
    "Committed",
    "ConcurrencyError",
    "DeliveryError",
    "Depends",
    "DuplicateHandler",
    "Entity",
    "Event",
    "Factory",
    "HandlerNotFound",
    "InvalidHandler",
    "Message",
    "MessageLimitExceeded",
    "Messagebus",
    "MissingDependency",
    "NotFound",
    "PublishError",
    "Publisher",
    "PybondiError",
    "Repository",
    "RolledBack",
    "Root",
    "SerializationError",
    "Session",
    "SessionError",
    "UnknownMessageType",
]

# name -> (the module that defines it, the package its extra installs, if it needs one)
_LAZY: dict[str, tuple[str, str | None]] = {
    "Consumer": ("pybondi.consumer", None),
    "EventSourcedRepository": ("pybondi.repositories", None),
    "MemoryStore": ("pybondi.stores.memory", None),
    "Outbox": ("pybondi.outbox", None),
    "Registry": ("pybondi.serialization", None),
    "Relay": ("pybondi.relay", None),
    "Retry": ("pybondi.consumer", None),
    "SQLStore": ("pybondi.stores.sql", "sqlalchemy"),
    "StateRepository": ("pybondi.repositories", None),
    "TableRepository": ("pybondi.repositories", None),
    "Worker": ("pybondi.worker", None),
}

if not TYPE_CHECKING:  # hidden from type checkers, which would type any name as Any

    def __getattr__(name: str) -> Any:
        """Import a lazy name's module on first use (its module raises MissingDependency)."""
        if name not in _LAZY:
            raise AttributeError(f"module 'pybondi' has no attribute {name!r}")
        import importlib  # noqa: PLC0415 - only lazy names need it

        value = getattr(importlib.import_module(_LAZY[name][0]), name)
        globals()[name] = value  # later lookups find it without __getattr__
        return value


def __dir__() -> list[str]:
    """The module's names and the lazy ones, but those whose extra is missing.

    `help(pybondi)` and `inspect.getmembers` get every name `dir` lists: leaving those
    out keeps both working on an installation without the extras.
    """
    from importlib.util import find_spec  # noqa: PLC0415

    lazy = {name for name, (_, needs) in _LAZY.items() if needs is None or find_spec(needs)}
    return sorted(set(globals()) | lazy)


del TYPE_CHECKING, Any  # dir(pybondi) lists pybondi's names only
