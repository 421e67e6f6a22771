"""Pull requests of a durable consumer, sent and answered on an inbox of its own."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as Inbox
from nats.js.api import DEFAULT_PREFIX, Header

from pybondi.messaging.brokers.nats.connection import Link

__all__ = ["Pull", "is_stored", "status_of"]

_MORE_WITHIN = 0.05  # seconds a fetch that has its first message waits for what is there
_LATE = 0.1  # seconds a fetch waits, past its request's expiry, for JetStream to end it
_ACK_SUBJECT = "$JS.ACK."  # the reply subject of every message a consumer delivers
_OVER = ("404", "408", "409")  # statuses that end a pull request: none left, expired...
_HEARTBEAT = "100"


class Pull:
    """A topic's durable consumer, bound on the subscription's connection.

    It fetches with pull requests of its own, answered on an inbox of its own, rather
    than with nats-py's `PullSubscription.fetch`: nats-py takes any message with a
    `Status` header (how it reads a header block that begins with a status line, such as
    `NATS/1.0 503`) for JetStream's control message, and a producer can store such a
    message in a stream with a raw `HPUB`. nats-py then fails every fetch (503), or
    drops the message unseen (404, 408, 100), so that it came back forever, never
    handled nor dead-lettered. A message a consumer delivers has an acknowledgement
    subject as its reply; a control message has none: that tells them apart here, and
    the subscription gives a stored one a `problem`.
    """

    def __init__(self, topic: str, stream: str, durable: str, link: Link, inbox: Inbox) -> None:
        self.topic = topic
        self.stream = stream
        self.durable = durable
        self.link = link
        self.inbox = inbox  # where JetStream answers this consumer's pull requests
        self.requests = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.fetching: asyncio.Task[list[Msg]] | None = None  # one fetch at a time
        self.asked = 0  # how many messages the running fetch asked for
        self.quiet = False  # the last fetch brought nothing
        self.checked = asyncio.get_running_loop().time()  # when it was known to exist

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages, as soon as one came, waiting up to `timeout` for it.

        A request for one message waits for it; once it came, a request for the rest
        takes what is there now. Waiting for a whole batch would hold the first messages
        while the stream is slow, when the worker could handle them at once.
        """
        fetched = await self._late(batch)
        if not fetched:
            await self._request({"batch": 1, "expires": round(timeout * 1e9)})
            fetched = await self._answers(1, timeout + _LATE)
        if fetched and len(fetched) < batch:
            await self._request({"batch": batch - len(fetched), "no_wait": True})
            fetched += await self._answers(batch - len(fetched), _MORE_WITHIN)
        return fetched

    async def _request(self, request: dict[str, Any]) -> None:
        await self.link.connection.publish(
            self.requests, json.dumps(request).encode(), reply=self.inbox.subject
        )

    async def _late(self, batch: int) -> list[Msg]:
        """Messages already in the inbox: an earlier request's, come after it stopped.

        Control messages there ended earlier requests: they are dropped.
        """
        late: list[Msg] = []
        while self.inbox.pending_msgs and len(late) < batch:
            message = await self.inbox.next_msg(timeout=_LATE)  # at once: one is there
            if is_stored(message):
                late.append(message)
        return late

    async def _answers(self, wanted: int, timeout: float) -> list[Msg]:
        """The messages that answer a request, until `wanted` came or it is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        messages: list[Msg] = []
        while len(messages) < wanted:
            try:
                message = await self.inbox.next_msg(timeout=max(deadline - loop.time(), 0.001))
            except nats.errors.TimeoutError:
                break  # JetStream did not say the request is over: it is, by now
            status = None if is_stored(message) else status_of(message)
            if status is None:
                messages.append(message)
            elif status in _OVER:
                break
            elif status != _HEARTBEAT:
                # 503: no JetStream to answer, or worse: as nats-py's fetch, fail, and
                # the subscription connects again.
                raise nats.js.errors.APIError.from_msg(message)
        return messages


def is_stored(message: Msg) -> bool:
    """Whether a consumer delivered the message (a control message has no reply)."""
    return message.reply.startswith(_ACK_SUBJECT)


def status_of(message: Msg) -> str | None:
    """The status of the status line the message's header block begins with, if any.

    nats-py reads `NATS/1.0 503` into a header `Status: 503` (as nats.go does), so a
    header `Status` of three digits reads the same and is taken for a status line alike:
    NATS clients reserve it. Any other value is an ordinary header.
    """
    status = (message.headers or {}).get(Header.STATUS)
    return status if status is not None and len(status) == 3 and status.isdigit() else None
