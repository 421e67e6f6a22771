"""pybondi: event-driven systems with domain-driven design, sync and async.

Commands and events go through a `Messagebus` to handlers that receive dependencies
with `Depends`; aggregates collect domain events on their `Root`; a `Repository` stores
and restores them; a `Session` runs one unit of work and a `Publisher` sends messages
out when it commits.

The main classes of persistence, messaging and projections are here too (`SQLStore`,
`Outbox`, `Worker`, `Projection`...), imported on first use: `import pybondi` loads no
database driver or broker client, and a class whose extra is missing raises
`MissingDependency` naming it. They are not in `__all__`, so that `from pybondi import *`
stays as light.

Classes keep the module that defines them as `__module__` (`pybondi.session.Session`,
a public module too), so that `inspect.getsource` and tools built on it find them.
"""

from typing import TYPE_CHECKING

from pybondi import _lazy
from pybondi.aggregate import Aggregate, Entity, Factory, Root
from pybondi.callbacks import Callback, Callbacks
from pybondi.current import current_connection, current_session
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
    ProjectionFailed,
    ProjectionHeld,
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
    from pybondi.messaging.consumer import Consumer as Consumer
    from pybondi.messaging.consumer import Retry as Retry
    from pybondi.messaging.outbox import Outbox as Outbox
    from pybondi.messaging.relay import Relay as Relay
    from pybondi.messaging.worker import Worker as Worker
    from pybondi.persistence.memory import MemoryStore as MemoryStore
    from pybondi.persistence.repositories import EventSourcedRepository as EventSourcedRepository
    from pybondi.persistence.repositories import StateRepository as StateRepository
    from pybondi.persistence.repositories import TableRepository as TableRepository
    from pybondi.persistence.serialization import Registry as Registry
    from pybondi.persistence.sql import SQLStore as SQLStore
    from pybondi.projection.base import Projection as Projection
    from pybondi.projection.runner import ProjectionRunner as ProjectionRunner

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
    "ProjectionFailed",
    "ProjectionHeld",
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
    "current_connection",
    "current_session",
]

_LAZY: _lazy.Lazy = {
    "Consumer": ("pybondi.messaging.consumer", None),
    "EventSourcedRepository": ("pybondi.persistence.repositories", None),
    "MemoryStore": ("pybondi.persistence.memory", None),
    "Outbox": ("pybondi.messaging.outbox", None),
    "Projection": ("pybondi.projection.base", None),
    "ProjectionRunner": ("pybondi.projection.runner", None),
    "Registry": ("pybondi.persistence.serialization", None),
    "Relay": ("pybondi.messaging.relay", None),
    "Retry": ("pybondi.messaging.consumer", None),
    "SQLStore": ("pybondi.persistence.sql", "sqlalchemy"),
    "StateRepository": ("pybondi.persistence.repositories", None),
    "TableRepository": ("pybondi.persistence.repositories", None),
    "Worker": ("pybondi.messaging.worker", None),
}

if not TYPE_CHECKING:  # hidden from type checkers, which would type any name as Any
    __getattr__, __dir__ = _lazy.exports(__name__, globals(), _LAZY)

del TYPE_CHECKING  # dir(pybondi) lists pybondi's names only
