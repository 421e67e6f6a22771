"""Redis Streams: each topic is a stream, each message an entry added with XADD.

    broker = RedisBroker("redis://localhost:6379/0", maxlen=1_000_000)

An entry has two fields: `headers` (a JSON object of the envelope's headers) and
`body`. The entry id XADD returns is the broker's confirmation. A batch goes in one
pipelined round trip, in order. redis-py has sync and async clients, so this adapter
serves sync and async sessions alike.

Consuming (`subscribe`, async only; Redis 6.2 or later) reads each topic's stream through
a consumer group, which starts from the oldest entry kept. Entries are never deleted
from a topic's stream, as every group reads it. A retry goes durably, in the same
transaction as its XACK, to the group's sorted set `<stream>#delayed#<group>` (scored by
its due time); once due, it moves to the group's own stream `<stream>#retry#<group>`,
which the group reads besides the topic's stream and from which acknowledged entries are
deleted. Entries held by a consumer silent for `redeliver_after` are taken over with
XAUTOCLAIM by whichever consumer of the group receives next. A message without a
`message-id` header has its stream and entry id (`orders/1712345678901-0`: entry ids
repeat from stream to stream) as its id: a takeover is the same entry, and a retry
keeps the id in its entry's `id` field. A message without a `headers` field (a body
alone, from a producer that does not speak pybondi) has none; its time is its entry's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pybondi.exceptions import MissingDependency
from pybondi.messaging.brokers.base import Broker, SubscriptionTerms
from pybondi.messaging.envelope import Envelope

try:
    import redis
    import redis.asyncio
    from redis.typing import EncodableT, FieldT
except ModuleNotFoundError as missing:  # pragma: no cover - depends on the installation
    raise MissingDependency("redis", "redis", "A redis:// broker") from missing

# After the client's import: without it, the line above names the extra to install.
from pybondi.messaging.brokers.redis.subscription import RedisDelivery, RedisSubscription

__all__ = ["RedisBroker", "RedisDelivery", "RedisSubscription"]


class RedisBroker(Broker[RedisSubscription]):
    """Sends envelopes to Redis Streams, one stream per topic.

    Args:
        url: `redis://[user:password@]host:port/db` (or `rediss://` for TLS).
        maxlen: trim each stream to about this many entries (approximate, as Redis
            trims cheaply); None keeps every entry.
        prefix: put before each topic to name its stream.
        client_options: passed to `redis.Redis.from_url`.
    """

    def __init__(
        self, url: str, *, maxlen: int | None = None, prefix: str = "", **client_options: Any
    ) -> None:
        self.url = url
        self.maxlen = maxlen
        self.prefix = prefix
        self.client_options = client_options
        self._client: redis.Redis | None = None
        self._aclient: redis.asyncio.Redis | None = None

    def stream(self, topic: str) -> str:
        """The key of a topic's stream."""
        return self.prefix + topic

    def _fields(self, envelope: Envelope) -> dict[FieldT, EncodableT]:
        return {"headers": json.dumps(envelope.headers), "body": envelope.body}

    def send(self, envelopes: Sequence[Envelope]) -> None:
        """XADD every envelope in one pipelined round trip; each must get its entry id."""
        if not envelopes:
            return
        if self._client is None:
            self._client = redis.Redis.from_url(self.url, **self.client_options)
        pipeline = self._client.pipeline(transaction=False)
        for envelope in envelopes:
            pipeline.xadd(self.stream(envelope.topic), self._fields(envelope), maxlen=self.maxlen)
        try:
            results = pipeline.execute(raise_on_error=False)
        except redis.RedisError as error:
            self.close()
            raise self._unconfirmed(envelopes, 0, error) from error
        self._check(envelopes, results)

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        """`send`, on redis-py's asyncio client."""
        if not envelopes:
            return
        if self._aclient is None:
            self._aclient = redis.asyncio.Redis.from_url(self.url, **self.client_options)
        pipeline = self._aclient.pipeline(transaction=False)
        for envelope in envelopes:
            pipeline.xadd(self.stream(envelope.topic), self._fields(envelope), maxlen=self.maxlen)
        try:
            results = await pipeline.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as error:
            await self.aclose()
            raise self._unconfirmed(envelopes, 0, error) from error
        self._check(envelopes, results)

    def _check(self, envelopes: Sequence[Envelope], results: list[Any]) -> None:
        for index, result in enumerate(results):
            if isinstance(result, Exception) or not result:
                reason = result if isinstance(result, Exception) else "no entry id"
                raise self._unconfirmed(envelopes, index, reason)

    def _subscription(self, terms: SubscriptionTerms) -> RedisSubscription:
        return RedisSubscription(self, terms)

    def close(self) -> None:
        """Close the sync client's connections."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close both clients' connections."""
        self.close()
        client, self._aclient = self._aclient, None
        if client is not None:
            await client.aclose()
