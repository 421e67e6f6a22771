"""pybondi: event-driven systems with domain-driven design, sync and async.

Commands and events go through a `Messagebus` to handlers that receive dependencies
with `Depends`; aggregates collect domain events on their `Root`; a `Repository` stores
and restores them; a `Session` runs one unit of work and a `Publisher` sends messages
out when it commits.
"""

from pybondi.aggregate import Aggregate, Entity, Factory, Root
from pybondi.callbacks import Callback, Callbacks
from pybondi.depends import Depends
from pybondi.events import Added, Commited, Committed, RolledBack
from pybondi.exceptions import (
    AsyncRequired,
    DeliveryError,
    DuplicateHandler,
    HandlerNotFound,
    InvalidHandler,
    MessageLimitExceeded,
    NotFound,
    PybondiError,
    SessionError,
)
from pybondi.messagebus import Command, Event, Messagebus
from pybondi.publisher import BasePublisher, Message, Publisher
from pybondi.repository import Repository
from pybondi.session import Session

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
    "NotFound",
    "Publisher",
    "PybondiError",
    "Repository",
    "RolledBack",
    "Root",
    "Session",
    "SessionError",
]

# Show public names as `pybondi.Session`, not `pybondi.session.Session`, in reprs and docs.
for _name in __all__:
    _value = globals()[_name]
    if getattr(_value, "__module__", "").startswith("pybondi.") and _name != "Depends":
        _value.__module__ = "pybondi"
del _name, _value
