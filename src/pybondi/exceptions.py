"""Every error pybondi raises, under one root.

    PybondiError
    ├── HandlerNotFound (LookupError)       a command has no handler and no execute()
    ├── DuplicateHandler (ValueError)       a second handler registered for one command
    ├── InvalidHandler (TypeError)          a handler or dependency pybondi cannot call
    ├── AsyncRequired (TypeError)           an async handler reached through a sync call
    ├── MessageLimitExceeded (RuntimeError) a chain of events that does not end
    ├── SessionError (RuntimeError)         a session used in the wrong state
    ├── NotFound (LookupError)              a repository holds no aggregate with that id
    ├── ConcurrencyError (RuntimeError)     a write based on a stale version of an aggregate
    ├── SerializationError (ValueError)     data that does not fit its registered type
    │   └── UnknownMessageType (LookupError) a type name or class nobody registered
    ├── MissingDependency (ImportError)     a backend whose optional extra is not installed
    ├── DeliveryError                       a subscriber failed while a publisher committed
    └── PublishError (ConnectionError)      a broker did not confirm a message

Builtins are kept as second bases so that `except TypeError` and friends keep working.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pybondi.persistence.records import StoredEvent

__all__ = [
    "AsyncRequired",
    "ConcurrencyError",
    "DeliveryError",
    "DuplicateHandler",
    "HandlerNotFound",
    "InvalidHandler",
    "MessageLimitExceeded",
    "MissingDependency",
    "NotFound",
    "ProjectionFailed",
    "ProjectionHeld",
    "PublishError",
    "PybondiError",
    "SerializationError",
    "SessionError",
    "UnknownMessageType",
]


class PybondiError(Exception):
    """Base class of every error raised by pybondi."""


class HandlerNotFound(PybondiError, LookupError):
    """A command has neither a registered handler nor an `execute()` method."""

    def __init__(self, command_type: type) -> None:
        name = command_type.__name__
        super().__init__(
            f"No handler is registered for command {name}; register one with "
            f"@messagebus.register({name}), or give {name} an execute() method."
        )
        self.command_type = command_type


class DuplicateHandler(PybondiError, ValueError):
    """A command type already has its one handler."""

    def __init__(self, command_type: type, existing: object, new: object) -> None:
        super().__init__(
            f"Command {command_type.__name__} already has a handler, {callable_name(existing)}; "
            f"cannot also register {callable_name(new)}. A command has exactly one handler: "
            f"remove one of them, or use an event and @messagebus.on(...) for many."
        )
        self.command_type = command_type


class InvalidHandler(PybondiError, TypeError):
    """A handler, subscriber or dependency cannot be called the way pybondi calls it."""


class AsyncRequired(PybondiError, TypeError):
    """An async handler, subscriber or dependency was reached through a sync call."""

    def __init__(self, what: str, culprit: object, instead: str) -> None:
        super().__init__(
            f"Cannot run {what} synchronously: {callable_name(culprit)} is async. "
            f"Use {instead} instead."
        )


class MessageLimitExceeded(PybondiError, RuntimeError):
    """A session dispatched more messages in one run than its limit allows."""

    def __init__(self, limit: int, last: object) -> None:
        super().__init__(
            f"The session dispatched {limit} messages in one run and the queue is still not "
            f"empty (the last one was {short_repr(last)}). An event handler probably publishes "
            f"an event that leads back to itself; if the chain is legitimate, raise the limit "
            f"with Session(..., max_messages=N)."
        )
        self.limit = limit


class SessionError(PybondiError, RuntimeError):
    """A session was used in a state that does not allow it (for instance after close)."""


class NotFound(PybondiError, LookupError):
    """A repository has no aggregate with the requested id."""

    def __init__(self, repository: object, id: object, kind: str = "aggregate") -> None:
        super().__init__(f"{type(repository).__name__} has no {kind} with id {id!r}.")
        self.id = id


class ConcurrencyError(PybondiError, RuntimeError):
    """Another unit of work changed an aggregate after this one read it.

    Nothing of the failing session was written; load the aggregate again and retry.
    """

    def __init__(self, stream: str, expected: int, actual: int | None) -> None:
        if expected == 0:
            problem = (
                f"{stream} was added as a new aggregate, but one with that id already "
                f"exists (version {actual}). Nothing of this session was written; get the "
                f"stored one with repository.get(id) instead of adding a new one."
            )
        else:
            found = "no longer exists" if actual is None else f"is now at version {actual}"
            problem = (
                f"{stream} was read at version {expected} but {found}: another session "
                f"committed a change in between. Nothing of this session was written; load "
                f"the aggregate again and retry."
            )
        super().__init__(problem)
        self.stream = stream
        self.expected = expected
        self.actual = actual


class SerializationError(PybondiError, ValueError):
    """Data that cannot be turned into (or made from) its registered type."""


class UnknownMessageType(SerializationError, LookupError):
    """A type name, or a class, that nobody registered."""


class MissingDependency(PybondiError, ImportError):
    """A backend needs a package that is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str | None, purpose: str) -> None:
        install = f"'pybondi[{extra}]'" if extra else package
        super().__init__(
            f"{purpose} needs the {package!r} package, which is not installed. "
            f"Install it with: pip install {install}"
        )
        self.package = package
        self.extra = extra


class DeliveryError(PybondiError):
    """A subscriber raised while the publisher delivered committed messages.

    Delivery stops at the failing message. `undelivered` holds that message and every one
    behind it as `(topic, message)` pairs, so none is lost silently: the publisher keeps them
    and a later `commit()` resumes with the subscriber that failed, or `rollback()` drops them.
    """

    def __init__(self, topic: str, message: Any, subscriber: str, undelivered: list[Any]):
        super().__init__(
            f"Subscriber {subscriber} failed on message {message.id} of topic "
            f"{topic!r}; {len(undelivered)} message(s) are still undelivered. Call commit() "
            f"again to resume with that subscriber, or rollback() to drop them."
        )
        self.topic = topic
        self.message = message
        self.undelivered = undelivered


class PublishError(PybondiError, ConnectionError):
    """A broker did not confirm that it took a message: it may not have it.

    `unconfirmed` holds the envelopes the broker may lack, the failed one first, in
    the order they were sent. A broker publisher keeps them buffered (commit again to
    resend, or roll back); the outbox's relay retries them. Resending may deliver a
    message twice, never lose one: consumers recognise repeats by `message-id`.
    """

    def __init__(self, broker: str, topic: str, reason: str, unconfirmed: list[Any]) -> None:
        super().__init__(
            f"{broker} did not confirm message {unconfirmed[0].id if unconfirmed else '?'} "
            f"on {topic!r}: {reason}. {len(unconfirmed)} message(s) may not have reached "
            f"it; commit again to resend them, or roll back."
        )
        self.broker = broker
        self.topic = topic
        self.reason = reason
        self.unconfirmed = unconfirmed


def callable_name(call: object) -> str:
    """Name a handler or dependency the way a user would find it in their code."""
    name = getattr(call, "__qualname__", None) or type(call).__qualname__
    module = getattr(call, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def short_repr(value: object, limit: int = 120) -> str:
    """A repr short enough to sit inside an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report_failures(failures: list[BaseException], cause: BaseException | None = None) -> None:
    """Report what went wrong while cleaning up, without losing any of it.

    With a `cause` (the error that made us roll back or close), each failure is logged
    and noted on it, since the cause is what must propagate. Without one, the first
    failure is raised with the others logged and noted on it.
    """
    if not failures:
        return
    first, *others = failures if cause is None else (cause, *failures)
    for other in others:
        _cleanup_logger.error("While handling %r, another error occurred", first, exc_info=other)
        first.add_note(f"While cleaning up, another error occurred: {other!r}")
    if cause is None:
        raise first


_cleanup_logger = logging.getLogger("pybondi")


class ProjectionFailed(PybondiError, RuntimeError):
    """A projection's handler failed on one event too many times in a row: it stopped.

    A projection never skips an event: its checkpoint stays before the event, which is
    handled again when the projection is started again, after a fix.

    Attributes:
        projection: the projection's name.
        event: the stored event it failed on.
        attempts: how many times in a row it failed.
    """

    def __init__(self, projection: str, event: StoredEvent, attempts: int, error: BaseException):
        super().__init__(
            f"Projection {projection!r} stopped at position {event.position - 1}: its handlers "
            f"failed {attempts} times in a row on the event at position {event.position} "
            f"({event.type} version {event.schema} of {event.stream}, version "
            f"{event.version}): {type(error).__name__}: {str(error)[:200]}. A "
            f"projection does not skip events: fix the handler (or the data, or the "
            f"registry's upcaster) and start it again; it goes on from position "
            f"{event.position - 1}."
        )
        self.projection = projection
        self.event = event
        self.attempts = attempts


class ProjectionHeld(PybondiError, RuntimeError):
    """Another runner holds the projection's lease: one runner works on a projection."""

    def __init__(self, projection: str) -> None:
        super().__init__(
            f"Another runner holds projection {projection!r}: one runner at a time works on "
            f"a projection. Stop it, or wait until its lease expires (a runner that stops "
            f"gives its lease back at once); ProjectionRunner.run() waits by itself."
        )
        self.projection = projection
