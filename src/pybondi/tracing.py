"""Correlation and causation ids: which message led to which.

A message published while another is being handled takes the other's correlation id
and the other's id as its causation id. A message published outside any handling
starts a new chain: its correlation id is its own id.

    with handling(incoming):        # what a worker or a subscriber does around a handler
        publisher.publish("mail", Message(...))   # correlation and causation filled in

`publish` calls `trace(message)`, which fills in the two headers unless the message
already carries them (set them yourself to join a chain started elsewhere, such as an
HTTP request's id).

The in-memory publisher marks each message as handled while its subscribers run. A
task that a subscriber starts and leaves running sees the message being delivered when
it publishes, or none once delivery is over: give such a task its message with
`handling(message)` if what it publishes must name its cause.

`TracingFilter` gives log records the ids of the message being handled, so that every
line a handler (or pybondi) logs can say which message, and which chain, it belongs to:

    handler.addFilter(TracingFilter())
    handler.setFormatter(logging.Formatter("%(message_id)s %(correlation_id)s %(message)s"))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the publisher calls trace(): importing it here would be circular
    from pybondi.publisher import Message

__all__ = [
    "CAUSATION_ID",
    "CORRELATION_ID",
    "Handling",
    "TracingFilter",
    "current",
    "handling",
    "trace",
]

CORRELATION_ID = "correlation-id"
CAUSATION_ID = "causation-id"


class Handling:
    """Which message is being handled; a publisher delivering many moves it along."""

    __slots__ = ("message",)

    def __init__(self, message: Message[Any] | None = None) -> None:
        self.message = message


_handled: ContextVar[Handling | None] = ContextVar("pybondi.tracing.handled", default=None)


def current() -> Message[Any] | None:
    """The message being handled in this thread or task, if any."""
    handled = _handled.get()
    return None if handled is None else handled.message


@contextmanager
def handling(message: Message[Any]) -> Iterator[Message[Any]]:
    """Mark `message` as the one being handled for the duration of the block."""
    token = _handled.set(Handling(message))
    try:
        yield message
    finally:
        _handled.reset(token)


def trace(message: Message[Any]) -> None:
    """Fill in the correlation and causation ids of a message about to be published."""
    cause = current()
    if cause is None or cause is message:
        return
    headers = message.headers
    if CORRELATION_ID not in headers:
        headers[CORRELATION_ID] = cause.headers.get(CORRELATION_ID) or str(cause.id)
    if CAUSATION_ID not in headers:
        headers[CAUSATION_ID] = str(cause.id)


class TracingFilter(logging.Filter):
    """Adds `message_id`, `correlation_id` and `causation_id` to every log record.

    They are the ids of the message being handled, or `-` when there is none.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the record's ids; never drops a record."""
        message = current()
        ids = record.__dict__
        if message is None:
            ids["message_id"] = ids["correlation_id"] = ids["causation_id"] = "-"
        else:
            headers = message.headers
            ids["message_id"] = str(message.id)
            ids["correlation_id"] = headers.get(CORRELATION_ID) or ids["message_id"]
            ids["causation_id"] = headers.get(CAUSATION_ID, "-")
        return True
