"""The worker: tells the customer where their order was allocated.

The web app's sessions write `Allocated` to the outbox (topic `allocation.allocated`) in
the transaction that allocates. A relay sends it to the broker, and this consumer's
workers handle it, each message once per group (the inbox skips a repeat):

    export PYBONDI_STORE_URL=postgresql://localhost/allocation
    export PYBONDI_BROKER_URL=redis://localhost:6379
    pybondi relay
    pybondi worker examples.allocation.worker:consumer

The notification goes through `get_notifier`, a dependency that tests override with
`consumer.dependency_overrides[get_notifier] = ...`.
"""

from __future__ import annotations

import logging

from examples.allocation.domain import Allocated
from examples.allocation.service import ALLOCATED, registry
from pybondi import Depends, Message
from pybondi.messaging import Consumer, Retry

logger = logging.getLogger("allocation.notifications")


class Notifier:
    """Sends a customer a line of text (here, to the log: an e-mail in real life)."""

    def send(self, orderid: str, text: str) -> None:
        logger.info("to the customer of %s: %s", orderid, text)


def get_notifier() -> Notifier:
    return Notifier()


consumer = Consumer(None, registry, group="notifications", retry=Retry(attempts=5, delay=10))


@consumer.subscribe(ALLOCATED)
def notify(message: Message[Allocated], notifier: Notifier = Depends(get_notifier)) -> None:
    line = message.payload
    notifier.send(line.orderid, f"{line.qty} x {line.sku} will leave from batch {line.batchref}.")
