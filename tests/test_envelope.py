"""Envelopes: how a message travels between processes, and how bad data is refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

import pytest

from pybondi import Event, Message
from pybondi.exceptions import SerializationError, UnknownMessageType
from pybondi.messaging.envelope import JSON_TYPE, Envelope
from pybondi.persistence.serialization import Registry


@dataclass(frozen=True)
class Deposited(Event):
    account: str
    amount: int


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.register(Deposited, name="bank.Deposited", version=2)
    return registry


def test_a_registered_payload_travels_under_its_name_and_version(registry: Registry) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    message = Message(Deposited("acc-1", 10), sender="bank", headers={"tenant": "t1"}, timestamp=at)

    envelope = Envelope.seal("accounts", message, registry)

    assert envelope.topic == "accounts"
    assert envelope.id == str(message.id)
    assert json.loads(envelope.body) == {"account": "acc-1", "amount": 10}
    assert envelope.headers == {
        "tenant": "t1",
        "message-id": str(message.id),
        "message-type": "bank.Deposited",
        "message-version": "2",
        "timestamp": "2026-01-02T03:04:05.000006+00:00",
        "sender": "bank",
        "correlation-id": str(message.id),  # a chain of its own: no cause
    }
    opened = envelope.open(registry)
    assert opened.payload == Deposited("acc-1", 10)
    assert (opened.id, opened.sender, opened.timestamp) == (message.id, "bank", at)
    assert opened.headers == {"tenant": "t1", "correlation-id": str(message.id)}


def test_plain_json_needs_no_registry() -> None:
    message = Message({"n": [1, 2.5, None, True, "é"]})
    envelope = Envelope.seal("numbers", message)

    assert envelope.headers["message-type"] == JSON_TYPE
    assert envelope.open().payload == {"n": [1, 2.5, None, True, "é"]}
    assert envelope.open().id == message.id


def test_a_payload_that_cannot_leave_the_process_is_refused_at_once(registry: Registry) -> None:
    class Unregistered:
        pass

    with pytest.raises(SerializationError, match=r"Unregistered.*not registered.*register"):
        Envelope.seal("t", Message(Unregistered()), registry)
    with pytest.raises(SerializationError, match=r"Deposited.*no JSON.*registry"):
        Envelope.seal("t", Message(Deposited("a", 1)))  # registered, but no registry given
    with pytest.raises(SerializationError, match="not plain JSON"):
        Envelope.seal("t", Message({"x": float("nan")}))
    with pytest.raises(SerializationError, match="not plain JSON"):
        Envelope.seal("t", Message({"when": datetime.now(UTC)}))


def test_correlation_and_causation_set_by_the_caller_are_kept() -> None:
    message: Message[dict[str, str]] = Message(
        {}, headers={"correlation-id": "request-42", "causation-id": "c"}
    )
    headers = Envelope.seal("t", message).headers
    assert (headers["correlation-id"], headers["causation-id"]) == ("request-42", "c")


def _sealed(registry: Registry) -> Envelope:
    return Envelope.seal("accounts", Message(Deposited("acc-1", 10)), registry)


def test_only_registered_types_are_built(registry: Registry) -> None:
    envelope = _sealed(registry)
    with pytest.raises(UnknownMessageType, match="bank.Deposited") as caught:
        envelope.open(Registry())
    assert f"In message {envelope.id} on 'accounts'." in caught.value.__notes__
    with pytest.raises(SerializationError, match="pass the registry"):
        envelope.open()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"body": b"{not json"}, "not valid JSON"),
        ({"body": b'{"account": "a"}'}, "amount"),
        ({"headers": {"message-type": "bank.Deposited", "message-version": "x"}}, "malformed"),
        ({"headers": {"message-type": JSON_TYPE, "timestamp": "soon"}}, "malformed"),
    ],
)
def test_bad_data_is_a_serialization_error_naming_the_message(
    registry: Registry, change: dict[str, object], problem: str
) -> None:
    envelope = _sealed(registry)
    headers = {**envelope.headers, **change.get("headers", {})}  # type: ignore[dict-item]
    body = change.get("body", envelope.body)
    assert isinstance(body, bytes)
    broken = Envelope(envelope.topic, envelope.id, headers, body)
    with pytest.raises(SerializationError, match=problem) as caught:
        broken.open(registry)
    assert envelope.id in str(caught.value) + " ".join(getattr(caught.value, "__notes__", []))


def test_opened_ids_are_uuids(registry: Registry) -> None:
    assert isinstance(_sealed(registry).open(registry).id, UUID)


@pytest.mark.parametrize(
    "id",
    [
        "1700000000000-0",  # a Redis entry id
        "order-42",
        "{12345678-1234-5678-1234-567812345678}",  # a UUID, but not as pybondi writes one
        "12345678-1234-5678-1234-56781234567A",
    ],
)
def test_ids_of_other_producers_are_kept_as_text(id: str) -> None:
    sealed = Envelope.seal("t", Message({"n": 1}))
    opened = Envelope("t", id, {**sealed.headers, "message-id": id}, sealed.body).open()
    assert opened.id == id and isinstance(opened.id, str)
    assert Envelope.seal("t", opened).id == id  # sent on with the id it came with


@pytest.mark.parametrize(
    "headers",
    [
        {"a key": "v"},
        {"a:b": "v"},
        {"città": "v"},
        {"": "v"},
        {"note": "  padded  "},
        {"note": "two\nlines"},
        {"note": "tab\there"},
        {"note": 42},
    ],
)
def test_headers_some_broker_would_change_are_refused(headers: dict[str, str]) -> None:
    # NATS headers are HTTP-style: it strips, folds or rejects anything else.
    with pytest.raises(SerializationError, match="header"):
        Envelope.seal("t", Message(1, headers=headers))
    with pytest.raises(SerializationError, match="header"):
        Envelope.seal("t", Message(1, sender=" me"))


@pytest.mark.parametrize(
    "topic",
    ["", "a..b", ".a", "a.", "orders.*", "orders.>", "a#b", "zürich", "a b", "a\nb", "x" * 201],
)
def test_topics_some_broker_would_refuse_or_read_as_patterns_are_refused(topic: str) -> None:
    with pytest.raises(ValueError, match="Cannot send to topic"):
        Envelope.seal(topic, Message(1))


@pytest.mark.parametrize("topic", ["a", "bank.deposits", "v1:orders/eu-west_2@x+y,z", "x" * 200])
def test_topics_every_broker_takes_are_accepted(topic: str) -> None:
    assert Envelope.seal(topic, Message(1)).topic == topic


# Producers that do not speak pybondi --------------------------------------------------


def test_a_body_without_a_type_header_is_plain_json_or_the_bound_type(registry: Registry) -> None:
    plain = Envelope("accounts", "42", {}, b'{"account": "acc-1", "amount": 10}')
    at = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)  # the broker's time

    assert plain.open(registry, timestamp=at).payload == {"account": "acc-1", "amount": 10}
    bound = plain.open(registry, payload=Deposited, timestamp=at)
    assert (bound.payload, bound.id, bound.timestamp) == (Deposited("acc-1", 10), "42", at)
    chosen = plain.open(registry, payload=lambda body: Deposited)
    assert chosen.payload == Deposited("acc-1", 10)
    assert abs(chosen.timestamp - datetime.now(UTC)).total_seconds() < 5  # else now


def test_a_bound_type_the_registry_lacks_or_a_failing_choice_says_what_to_do(
    registry: Registry,
) -> None:
    @dataclass
    class Unknown:
        account: str

    plain = Envelope("accounts", "42", {}, b'{"account": "acc-1"}')
    with pytest.raises(UnknownMessageType, match=r"registry.register\(Unknown\)") as unknown:
        plain.open(registry, payload=Unknown)
    assert "name=''" not in str(unknown.value)

    def choose(body: object) -> type:
        raise KeyError("kind")

    with pytest.raises(SerializationError, match="payload function .*choose failed on the body"):
        plain.open(registry, payload=choose)
