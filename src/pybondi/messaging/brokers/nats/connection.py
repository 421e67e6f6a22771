"""One connection to NATS, as the broker and each subscription hold theirs."""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client

__all__ = ["Link", "close_connection"]

logger = logging.getLogger(__name__)


class Link:
    """One connection and what the broker learned on it."""

    def __init__(self, connection: Client, closed: asyncio.Future[None], timeout: float) -> None:
        self.connection = connection
        self.timeout = timeout
        self.jetstream = connection.jetstream(timeout=timeout)
        self.declared: set[str] = set()  # topics a stream keeps
        self.closed = closed  # done once nats-py closed the connection, for good

    @property
    def is_open(self) -> bool:
        """Whether the connection may still carry messages: nats-py has not closed it."""
        return not self.closed.done() and not self.connection.is_closed


async def close_connection(connection: Client) -> None:
    """Close a connection unless closed already; a failure to close is only logged."""
    if connection.is_closed:
        return
    try:
        await connection.close()
    except (nats.errors.Error, OSError) as error:
        # Closing a broken connection can fail for the reason it broke, already reported.
        logger.debug("Closing a NATS connection failed: %r", error)
