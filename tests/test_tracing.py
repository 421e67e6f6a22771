"""Correlation and causation ids: what a message published while handling another carries."""

from __future__ import annotations

import asyncio
from typing import Any

from pybondi import Message, Publisher
from pybondi.tracing import CAUSATION_ID, CORRELATION_ID, current, handling
from tests.conftest import Driver


def test_a_message_published_outside_any_handling_starts_no_chain() -> None:
    publisher = Publisher()
    message = Message("m")
    publisher.publish("t", message)
    assert CORRELATION_ID not in message.headers  # an envelope names it after itself
    assert current() is None


def test_a_message_published_while_handling_another_names_its_cause() -> None:
    incoming = Message("order", headers={CORRELATION_ID: "request-7"})
    publisher = Publisher()
    with handling(incoming):
        assert current() is incoming
        reply = Message("mail")
        publisher.publish("mail", reply)
    assert current() is None
    assert reply.headers == {CORRELATION_ID: "request-7", CAUSATION_ID: str(incoming.id)}


def test_a_cause_without_correlation_id_starts_the_chain_with_its_own_id() -> None:
    incoming = Message("order")
    reply = Message("mail")
    with handling(incoming):
        Publisher().publish("mail", reply)
    assert reply.headers == {CORRELATION_ID: str(incoming.id), CAUSATION_ID: str(incoming.id)}


def test_ids_the_publisher_set_itself_are_kept() -> None:
    reply = Message("mail", headers={CORRELATION_ID: "mine", CAUSATION_ID: "also mine"})
    with handling(Message("order")):
        Publisher().publish("mail", reply)
    assert reply.headers == {CORRELATION_ID: "mine", CAUSATION_ID: "also mine"}


def test_subscribers_publishing_chain_the_ids_through_every_step(driver: Driver) -> None:
    publisher = Publisher()
    seen: list[Message[Any]] = []

    @publisher.subscribe("orders")
    def on_order(message: Message[Any]) -> None:
        seen.append(message)
        publisher.publish("invoices", Message("invoice"))

    @publisher.subscribe("invoices")
    def on_invoice(message: Message[Any]) -> None:
        seen.append(message)
        publisher.publish("mails", Message("mail"))

    @publisher.subscribe("mails")
    def on_mail(message: Message[Any]) -> None:
        seen.append(message)

    publisher.publish("orders", Message("order"))
    driver.deliver(publisher)

    order, invoice, mail = seen
    assert CORRELATION_ID not in order.headers
    assert invoice.headers == {CORRELATION_ID: str(order.id), CAUSATION_ID: str(order.id)}
    assert mail.headers == {CORRELATION_ID: str(order.id), CAUSATION_ID: str(invoice.id)}
    assert current() is None


def test_each_task_sees_the_message_it_handles() -> None:
    async def handle(incoming: Message[Any]) -> Message[Any]:
        with handling(incoming):
            await asyncio.sleep(0.01)  # the other task runs meanwhile
            reply = Message("reply")
            Publisher().publish("t", reply)
            return reply

    async def both() -> list[Message[Any]]:
        return list(await asyncio.gather(handle(first), handle(second)))

    first, second = Message("a"), Message("b")
    one, two = asyncio.run(both())
    assert one.headers[CAUSATION_ID] == str(first.id)
    assert two.headers[CAUSATION_ID] == str(second.id)
