"""Connections and queues, as publishing and consuming both open and declare them."""

from __future__ import annotations

import contextlib
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions

__all__ = ["QueueMismatch", "SelfClosingConnection", "declare_queue"]


class SelfClosingConnection(aio_pika.Connection):
    """A connection that closes itself when connecting fails.

    aio-pika leaves a connection that failed to connect open; when it is garbage
    collected, its `__del__` starts a close() that no event loop may be there to run.
    """

    async def connect(self, timeout: aio_pika.abc.TimeoutType = None) -> None:
        """Connect, as aio-pika does; on failure, close, then raise."""
        try:
            await super().connect(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()
            raise


class QueueMismatch(Exception):
    """A queue to declare exists already, with other arguments (a classic queue)."""


_QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


async def declare_queue(
    channel: aio_pika.abc.AbstractChannel, name: str
) -> aio_pika.abc.AbstractQueue:
    """Declare a topic's or a group's queue: durable and quorum, wherever it is declared.

    Sends and subscriptions both declare the topic's own queue: their declarations must
    be the same, or RabbitMQ refuses the second (PRECONDITION_FAILED) and closes the
    channel.
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=_QUORUM)
    except aio_pika.exceptions.ChannelPreconditionFailed as error:
        raise QueueMismatch(
            f"RabbitMQ queue {name!r} exists, but not as pybondi declares it ({error}). "
            f"pybondi's queues are durable quorum queues, which count redeliveries, so "
            f"that a message that keeps killing its workers is dead-lettered; an older "
            f"pybondi declared classic ones, which RabbitMQ cannot convert. Let the "
            f"workers empty it, delete it and start again (pybondi declares it anew), "
            f"or keep it with declare_queues=False (its redeliveries then go uncounted)"
        ) from error
