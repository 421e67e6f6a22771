"""Reading a delivery: its message, or why it cannot be handled.

What cannot be read goes to the dead letters at once, without a handler running and
without an inbox row: a delivery the adapter could not read from the broker's format, an
id the inbox cannot keep, a body that is not JSON or does not fit its type, a message on
a dispatched topic that is no command or event, a key function that fails on it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from pybondi.exceptions import SerializationError, short_repr
from pybondi.messages import Command, Event
from pybondi.messaging.brokers.base import Delivery
from pybondi.messaging.consumer import Binding, Consumer
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import id_problem
from pybondi.publisher import Message

__all__ = ["Unreadable", "describe", "key_of", "read"]

_UNBOUND = Binding()


class Unreadable(Exception):
    """Why a delivered message cannot be handled: it goes to the dead letters at once."""


def read(consumer: Consumer, delivery: Delivery) -> Message[Any]:
    """The delivery's message; `Unreadable` says why it cannot be handled.

    A topic bound to a producer's own id header (`Binding.id_header`) gives the
    delivery's envelope that id first.
    """
    if delivery.problem is not None:
        raise Unreadable(delivery.problem)
    binding = consumer.bindings.get(delivery.envelope.topic, _UNBOUND)
    envelope = delivery.envelope = _identified(delivery.envelope, binding.id_header)
    if problem := id_problem(envelope.id):
        raise Unreadable(problem)
    try:
        message = envelope.open(
            consumer.registry, payload=binding.payload, timestamp=delivery.timestamp
        )
    except SerializationError as error:
        raise Unreadable(describe(error)) from None
    if envelope.topic in consumer.dispatched and not isinstance(message.payload, Command | Event):
        raise Unreadable(_not_dispatchable(envelope, message.payload))
    return message


def key_of(consumer: Consumer, message: Message[Any]) -> Hashable:
    """The message's key, or None; `Unreadable` if the key function fails on it."""
    if consumer.key is None:
        return None
    try:
        key = consumer.key(message)
        hash(key)
    except Exception as error:
        raise Unreadable(f"the consumer's key function failed on it: {describe(error)}") from None
    return key


def describe(error: BaseException) -> str:
    """An error in a line: its type, and what it says."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _identified(envelope: Envelope, id_header: str | None) -> Envelope:
    """The envelope under the id its producer keeps in `id_header`, if it sent one."""
    id = envelope.headers.get(id_header) if id_header else None
    if not id or id == envelope.id:
        return envelope
    return Envelope(envelope.topic, id, envelope.headers, envelope.body)


def _not_dispatchable(envelope: Envelope, payload: object) -> str:
    if "message-type" in envelope.headers:
        carries = f"this message carries {short_repr(payload)}"
    else:
        carries = (
            f"this message has no message-type header, so its body is plain JSON "
            f"({short_repr(payload)}): bind the topic to a type, as in "
            f"consumer.dispatch({envelope.topic!r}, payload=YourCommand), or have its "
            f"producer send message-type"
        )
    return (
        f"{envelope.topic!r} is dispatched to the messagebus, which takes commands and "
        f"events, but {carries}"
    )
