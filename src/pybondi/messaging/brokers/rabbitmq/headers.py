"""The AMQP headers of a consumed message: those RabbitMQ and pybondi set, and copies.

A consumer reads the producer's headers into the envelope and leaves out those that
count attempts and redeliveries or say where a message was dead-lettered from; a copy
(to give a message an id, or to retry it) keeps the producer's.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aio_pika
import aio_pika.abc

__all__ = [
    "ATTEMPT_HEADER",
    "copy_message",
    "header_text",
    "is_transport_header",
    "redeliveries",
    "without_id",
]

ATTEMPT_HEADER = "x-pybondi-attempt"
"""The AMQP header that counts a retried message's attempts; absent on the first.

Retries set it on the copy they publish. A producer may set it too: it can only make
its message reach its last attempt sooner (a value above the consumer's attempts is
dead-lettered unhandled, visibly), never skip it; a value that is not a positive integer
is a `problem`, and the message is dead-lettered.
"""

# Set by RabbitMQ on a quorum queue's message each time it comes back to the queue
# unacknowledged (3.x: any return; 4.3 and later: failed ones, x-acquired-count any).
_REDELIVERY_HEADERS = ("x-delivery-count", "x-acquired-count")
_TRANSPORT_HEADERS = ("x-death", ATTEMPT_HEADER, *_REDELIVERY_HEADERS)
_DEATH_HEADERS = ("x-first-death-", "x-last-death-")


def is_transport_header(name: str) -> bool:
    """Whether RabbitMQ or this adapter set the header (to count, to dead-letter)."""
    return name in _TRANSPORT_HEADERS or name.startswith(_DEATH_HEADERS)


def redeliveries(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """How often a quorum queue delivered the message before, unacknowledged.

    Only on a message RabbitMQ flags as redelivered: on a first delivery, the headers
    are the producer's (RabbitMQ 3.12 and later set none then).
    """
    if not message.redelivered:
        return 0
    counts = [(message.headers or {}).get(name) for name in _REDELIVERY_HEADERS]
    return max(
        (n for n in counts if isinstance(n, int) and not isinstance(n, bool) and n > 0),
        default=0,
    )


def without_id(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    """Whether the message has no id: no AMQP message_id, no `message-id` header."""
    return not message.message_id and not header_text((message.headers or {}).get("message-id"))


def copy_message(
    message: aio_pika.abc.AbstractIncomingMessage, message_id: str, attempt: int | None = None
) -> aio_pika.Message:
    """The message as sent, with `message_id`, persistent, and `attempt` if given.

    Without `attempt`, its attempt header stays as it was; the other headers RabbitMQ or
    this adapter set are left out.
    """
    headers = {
        name: _encodable(value)
        for name, value in (message.headers or {}).items()
        if not is_transport_header(name) or (name == ATTEMPT_HEADER and attempt is None)
    }
    if attempt is not None:
        headers[ATTEMPT_HEADER] = attempt
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def header_text(value: object) -> str | None:
    """A header value as text: UTF-8 bytes decoded, numbers written out; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return None


def _encodable(value: Any) -> Any:
    """A header value as pamqp can write it, for a retried copy.

    pamqp reads a string that is not UTF-8 as `bytes`, but writes only `bytearray`.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    return value
