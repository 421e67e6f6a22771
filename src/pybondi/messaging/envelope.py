"""Messages as they travel between processes: a topic, string headers and a JSON body.

    envelope = Envelope.seal("accounts", Message(Deposited("acc-1", 10)), registry)
    envelope.headers["message-type"]        # 'bank.Deposited'
    message = envelope.open(registry)       # Message(Deposited('acc-1', 10), ...)

The body is the payload as JSON: a type registered in a `Registry` (stored under its
registered name and version), or plain JSON (a dict, list, str, number, bool or None),
typed `json`. Opening builds only registered types; nothing is ever unpickled or
evaluated. The opened message's id is the envelope's: a `UUID` when it is one (pybondi's
own are), else the text as sent, since other producers send ids of their own.

Headers carry the envelope of the `Message`, under these names:

- `message-id`, `message-type`, `message-version`, `timestamp` (ISO 8601, UTC);
- `correlation-id` and `causation-id` (see `pybondi.tracing`);
- `sender`, when the message has one;
- the message's own `headers`.

Topics are words of ASCII letters, digits and `_-:/@+,` joined by single dots, up to
`TOPIC_LENGTH` characters: what every broker takes as a name and none reads as a
pattern. Header names are HTTP-style tokens (ASCII letters, digits and a few signs) and values are
text without line breaks, tabs or surrounding spaces: NATS would change or refuse
anything else, so every envelope is held to that, whatever the broker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pybondi.exceptions import (
    SerializationError,
    UnknownMessageType,
    callable_name,
    short_repr,
)
from pybondi.persistence.serialization import Registry
from pybondi.publisher import Message

__all__ = ["JSON_TYPE", "TOPIC_LENGTH", "Envelope"]

JSON_TYPE = "json"
"""The type name of a payload that is plain JSON rather than a registered type."""

_JSON_VALUES = (dict, list, str, int, float, bool, type(None))
TOPIC_LENGTH = 200
"""The longest topic name: RabbitMQ and NATS name queues and streams after topics."""

_TOPIC = re.compile(r"[A-Za-z0-9_\-:/@+,]+(?:\.[A-Za-z0-9_\-:/@+,]+)*")
_checked_topics: set[str] = set()
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_RESERVED = ("message-id", "message-type", "message-version", "timestamp", "sender")


# Not frozen: a frozen dataclass costs twice as much to build, once per message sent.
@dataclass(slots=True)
class Envelope:
    """A message ready for a broker: its topic, id, headers and JSON body; read-only."""

    topic: str
    id: str
    headers: dict[str, str]
    body: bytes

    @classmethod
    def seal(cls, topic: str, message: Message[Any], registry: Registry | None = None) -> Envelope:
        """Serialize a message for `topic`; a payload of a registered type needs `registry`."""
        if topic not in _checked_topics:
            _check_topic(topic)
        payload = message.payload
        if registry is not None and type(payload) in registry:
            serialized = registry.dumps(payload)
            name, version, body = serialized.name, serialized.version, serialized.data
        elif isinstance(payload, _JSON_VALUES):
            name, version, body = JSON_TYPE, 1, _plain_json(topic, payload)
        else:
            raise SerializationError(
                f"Cannot send {type(payload).__name__} to {topic!r}: a message leaving the "
                f"process carries a registered type or plain JSON, and "
                f"{type(payload).__name__} is {'not registered' if registry else 'no JSON'}. "
                f"Register it (registry.register({type(payload).__name__})) and give the "
                f"publisher the registry."
            )
        message_id = str(message.id)
        if message.headers:
            _check_headers(topic, message.headers)
        headers = dict(message.headers)
        headers["message-id"] = message_id
        headers["message-type"] = name
        headers["message-version"] = str(version)
        headers["timestamp"] = message.timestamp.isoformat()
        if message.sender is not None:
            _check_headers(topic, {"sender": message.sender})
            headers["sender"] = message.sender
        headers.setdefault("correlation-id", message_id)
        return cls(topic, message_id, headers, body.encode())

    def open(
        self,
        registry: Registry | None = None,
        *,
        payload: type | Callable[[Any], type] | None = None,
        timestamp: datetime | None = None,
    ) -> Message[Any]:
        """The message this envelope carries; only registered types are built.

        A body without a `message-type` header comes from a producer that does not speak
        pybondi: it is built into `payload` (a registered type, or a function of the
        parsed body that returns one), or given as plain JSON. Without a `timestamp`
        header, the message's time is `timestamp` (the broker's), else now.

        Raises `SerializationError` (or `UnknownMessageType`) naming what is wrong.
        """
        headers = self.headers
        try:
            version = headers.get("message-version")
            value = self._payload(registry, payload, headers.get("message-type"), version)
            sent = headers.get("timestamp")
            return Message(
                value,
                sender=headers.get("sender"),
                id=_message_id(self.id),
                headers={k: v for k, v in headers.items() if k not in _RESERVED},
                timestamp=datetime.fromisoformat(sent) if sent else timestamp or _now(),
            )
        except SerializationError as error:
            error.add_note(f"In message {self.id} on {self.topic!r}.")
            raise
        except (ValueError, RecursionError) as error:
            raise SerializationError(
                f"Message {self.id} on {self.topic!r} is malformed ({type(error).__name__}: "
                f"{error}); headers {short_repr(headers)}, body {short_repr(self.body)}."
            ) from error

    def _payload(
        self,
        registry: Registry | None,
        bound: type | Callable[[Any], type] | None,
        name: str | None,
        version: str | None,
    ) -> Any:
        """The payload: of the type `name` names, else of the `bound` one, else JSON."""
        if name == JSON_TYPE or (not name and bound is None):
            return json.loads(self.body)
        if registry is None:
            raise SerializationError(
                f"Message {self.id} on {self.topic!r} is a {name or 'message of a bound type'}:"
                f" pass the registry that registers its type to open()."
            )
        if name:
            return registry.loads(name, int(version or "1"), self.body)
        body = json.loads(self.body)
        kind = bound if isinstance(bound, type) or bound is None else _choose(bound, body)
        if kind not in registry:
            raise UnknownMessageType(
                f"Message {self.id} on {self.topic!r} has no message-type header, and its "
                f"topic's payload is {short_repr(kind)}, which the registry does not "
                f"register: register it, as in registry.register({_name(kind)})."
            )
        # A producer that does not speak pybondi writes the type as it is now.
        current = int(version) if version else registry.version_of(kind)
        return registry.decode(registry.name_of(kind), current, body)


def _choose(choose: Callable[[Any], type], body: Any) -> type:
    """The type a topic's function of the body picks for it."""
    try:
        return choose(body)
    except Exception as error:
        raise SerializationError(
            f"The topic's payload function {callable_name(choose)} failed on the body: "
            f"{type(error).__name__}: {error}."
        ) from error


def _name(kind: object) -> str:
    return getattr(kind, "__name__", "cls")


def _now() -> datetime:
    return datetime.now(UTC)


def _message_id(text: str) -> UUID | str:
    """The id as a `UUID` when it is one written the canonical way, else the text itself.

    Producers other than pybondi send ids of their own (a Redis entry id, any string);
    a UUID written otherwise (braces, capitals) stays text, so that `str(message.id)`
    is always the id as received, which the inbox and causation ids use.
    """
    try:
        parsed = UUID(text)
    except ValueError:
        return text
    return parsed if str(parsed) == text else text


def _check_topic(topic: object) -> None:
    """Refuse a topic name that some broker would refuse, or read as a pattern."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic) or len(topic) > TOPIC_LENGTH:
        raise ValueError(
            f"Cannot send to topic {short_repr(topic)}: a topic is 1 to {TOPIC_LENGTH} "
            f"ASCII letters, digits and _-:/@+, in words joined by single dots (as in "
            f"'bank.deposits'): brokers refuse other names, or read '*', '>' and '#' "
            f"as patterns."
        )
    if len(_checked_topics) > 10_000:  # topics made up at run time: do not grow forever
        _checked_topics.clear()
    _checked_topics.add(topic)


def _check_headers(topic: str, headers: dict[str, str]) -> None:
    """Refuse headers that some broker would change or reject (NATS's are HTTP-style)."""
    for name, value in headers.items():
        if not (isinstance(name, str) and _TOKEN.fullmatch(name)):
            raise SerializationError(
                f"Cannot send header {name!r} to {topic!r}: header names are ASCII letters, "
                f"digits and !#$%&'*+-.^_`|~ (no spaces, colons or accents), as in HTTP."
            )
        if not isinstance(value, str) or not value.isprintable() or value != value.strip():
            raise SerializationError(
                f"Cannot send header {name}={short_repr(value)} to {topic!r}: header values "
                f"are text without line breaks, tabs, or spaces at either end, which some "
                f"brokers would change in transit. Put such data in the payload."
            )


def _plain_json(topic: str, payload: Any) -> str:
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise SerializationError(
            f"Cannot send {short_repr(payload)} to {topic!r}: it is not plain JSON ({error}). "
            f"Send JSON values, or a registered type with a registry."
        ) from error
