"""Consuming Redis Streams: a consumer group's subscription, and its deliveries.

`RedisBroker.subscribe` makes a `RedisSubscription`; see the package docstring for how
retries, takeovers and ids work.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, cast

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from pybondi.exceptions import short_repr
from pybondi.messaging.brokers.base import Delivery, Subscription, SubscriptionTerms
from pybondi.messaging.envelope import Envelope

if TYPE_CHECKING:
    from pybondi.messaging.brokers.redis import RedisBroker

__all__ = ["RedisDelivery", "RedisSubscription"]

_Fields = dict[bytes, bytes]  # an entry's fields, as redis-py returns them (RESP2, bytes)
_DELAYED = "{stream}#delayed#{group}"  # sorted set: the group's retries, scored by due time
_RETRIES = "{stream}#retry#{group}"  # stream: the group's retries that are due
_MOVE_EVERY = 0.25  # seconds between looks for due retries (other consumers add some too)
_MOVE_BATCH = 100  # due retries moved per stream and look; more are moved on the next one
_LONGEST_BLOCK = 2.0  # seconds: well under redis-py's default socket timeout (5 s)

# Moves the due retries of one delayed set to its retry stream, atomically, and returns
# the due time of the next one (or nil). `body` went into the JSON as latin-1 text, which
# cjson decodes to UTF-8: each character U+0080-U+00FF becomes its one byte again. A
# member cjson cannot read (a lone surrogate in an id) goes as the body of an entry with
# no headers, which the worker dead-letters, rather than failing every move after it.
_MOVE_DUE = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
    local ok, retry = pcall(cjson.decode, member)
    if ok and type(retry) == 'table' and type(retry.body) == 'string'
            and type(retry.headers) == 'string' and type(retry.id) == 'string'
            and type(retry.attempt) == 'number' then
        local body = string.gsub(retry.body, '([\194\195])([\128-\191])', function(lead, tail)
            return string.char((lead:byte() - 194) * 64 + tail:byte())
        end)
        redis.call('XADD', KEYS[2], '*', 'headers', retry.headers, 'body', body,
            'attempt', string.format('%d', retry.attempt), 'id', retry.id)
    else
        redis.call('XADD', KEYS[2], '*', 'body', member)
    end
    redis.call('ZREM', KEYS[1], member)
end
local following = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return following[2] or false
"""
_MOVE_DUE_SHA = hashlib.sha1(_MOVE_DUE.encode(), usedforsecurity=False).hexdigest()


class _Source(NamedTuple):
    """A stream a subscription reads: a topic's own, or the group's retries of it."""

    topic: str
    key: str  # the stream read
    stream: str  # the topic's stream (`key` itself unless `retried`)
    retried: bool


class RedisSubscription(Subscription):
    """A consumer group's share of some topics' streams; see the package docstring.

    It has a client of its own (on the broker's URL and options), which connects at the
    first `receive`.

    Each `receive` first moves the group's due retries to its retry streams (at most
    every quarter of a second, or when the next one is due), and every
    `redeliver_after / 4` seconds takes over, with XAUTOCLAIM, the entries that other
    consumers held for longer than `redeliver_after`. Then XREADGROUP blocks for new
    entries. A group deleted under it (NOGROUP) is created again, from the oldest entry.

    XREADGROUP's COUNT holds per stream, so a read can bring more than `limit` entries:
    the rest wait here for the next `receive`. One kept longer than half of
    `redeliver_after` is dropped, as another consumer may have taken it over already;
    it comes back through XAUTOCLAIM.
    """

    def __init__(self, broker: RedisBroker, terms: SubscriptionTerms) -> None:
        super().__init__(terms)
        self.url = broker.url
        group, in_flight = self.group, self.in_flight
        self._name = f"{group}/{self.consumer} on {broker!r}"
        # The parsing below expects RESP2's bytes, in redis-py's classic shapes.
        options = {**broker.client_options, "decode_responses": False, "protocol": 2}
        # Every delivery in flight may ack, retry or extend at once, next to a receive.
        options.setdefault("max_connections", 2 * in_flight + 8)
        options.pop("legacy_responses", None)
        self._options = options
        self._streams = [broker.stream(topic) for topic in self.topics]
        self._sources: dict[bytes, _Source] = {}
        for topic, stream in zip(self.topics, self._streams, strict=True):
            self._sources[stream.encode()] = _Source(topic, stream, stream, False)
        for topic, stream in zip(self.topics, self._streams, strict=True):
            key = _RETRIES.format(stream=stream, group=group)
            self._sources[key.encode()] = _Source(topic, key, stream, True)
        self._client: redis.asyncio.Redis | None = None
        self._grouped = False  # whether the groups were created on this client
        self._buffer: deque[tuple[float, RedisDelivery]] = deque()  # (read at, delivery)
        self._cursors: dict[bytes, bytes] = {}  # where each stream's XAUTOCLAIM goes on
        self._next_move = 0.0  # monotonic time of the next look for due retries
        self._next_due: float | None = None  # due time (epoch ms) of the next retry known
        self._next_reclaim = 0.0  # monotonic time of the next XAUTOCLAIM round

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name}>"

    async def receive(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` (and `in_flight`) deliveries, waiting at most `wait` seconds.

        Raises the client's error (`redis.ConnectionError`, `OSError`...) when Redis
        cannot be reached; the next call connects again.
        """
        limit = min(limit, self.in_flight)
        if limit <= 0:
            return []
        async with self._connected() as client:
            if not self._grouped:
                await self._create_groups(client)
            try:
                await self._fetch(client, limit, wait)
            except redis.ResponseError as error:
                if not str(error).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                # A stream or group was deleted under us: make it again, from the start.
                await self._create_groups(client)
                await self._fetch(client, limit, wait)
        return [self._buffer.popleft()[1] for _ in range(min(limit, len(self._buffer)))]

    async def close(self) -> None:
        """Close the connection; the next `receive` opens a new one.

        Unacknowledged deliveries stay pending in Redis and come back to the group's
        consumers after `redeliver_after`.
        """
        self._buffer.clear()
        client, self._client = self._client, None
        if client is None:
            return
        try:
            # Bounded: a server that stopped answering must not hold the close up.
            async with asyncio.timeout(_LONGEST_BLOCK):
                await self._leave(client)
        except (redis.RedisError, OSError, TimeoutError):
            pass  # an idle consumer left in the group holds nothing
        finally:
            await client.aclose()

    async def _leave(self, client: redis.asyncio.Redis) -> None:
        """Remove this consumer from the group on each stream where it holds nothing.

        Otherwise each worker ever started would stay listed in the group, forever.
        Where it still holds entries, it stays, so that they can be taken over.
        """
        keys = list(self._sources)
        pipeline = client.pipeline(transaction=False)
        for key in keys:
            pipeline.xpending_range(key, self.group, "-", "+", 1, consumername=self.consumer)
        holding = await pipeline.execute(raise_on_error=False)
        pipeline = client.pipeline(transaction=False)
        for key, held in zip(keys, holding, strict=True):
            if held == []:
                pipeline.xgroup_delconsumer(key, self.group, self.consumer)
        await pipeline.execute(raise_on_error=False)

    @asynccontextmanager
    async def _connected(self) -> AsyncIterator[redis.asyncio.Redis]:
        """The client, made when needed; dropped after a connection error."""
        client = self._client
        if client is None:
            client = redis.asyncio.Redis.from_url(self.url, **self._options)
            self._client, self._grouped = client, False
        try:
            yield client
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            # A new client for the next call, rather than a pool in an unknown state.
            if self._client is client:
                self._client = None
            await client.aclose()
            raise

    async def _create_groups(self, client: redis.asyncio.Redis) -> None:
        """Create the group on every stream read (and the stream), unless it exists."""
        pipeline = client.pipeline(transaction=False)
        for key in self._sources:
            pipeline.xgroup_create(key, self.group, "0", mkstream=True)
        for result in await pipeline.execute(raise_on_error=False):
            if isinstance(result, Exception) and not str(result).startswith("BUSYGROUP"):
                raise result
        self._grouped = True

    async def _fetch(self, client: redis.asyncio.Redis, limit: int, wait: float) -> None:
        """Fill the buffer up to `limit`: due retries, taken-over entries, new ones."""
        now = time.monotonic()
        while self._buffer and self._buffer[0][0] < now - self.redeliver_after / 2:
            self._buffer.popleft()  # pending in Redis: it comes back through XAUTOCLAIM
        if now >= self._next_move or (
            self._next_due is not None and time.time() * 1000 >= self._next_due
        ):
            await self._move_due(client)
            self._next_move = now + _MOVE_EVERY
        if len(self._buffer) < limit and now >= self._next_reclaim:
            await self._reclaim(client, limit - len(self._buffer))
        if len(self._buffer) >= limit:
            return
        block: int | None = None  # XREADGROUP without BLOCK returns at once
        if wait > 0 and not self._buffer:
            milliseconds = wait * 1000
            if self._next_due is not None:  # wake up for the next retry of ours
                milliseconds = min(milliseconds, self._next_due - time.time() * 1000)
            # BLOCK 0 would wait forever; a block longer than the client's socket timeout
            # (5 s by default) would fail as a timeout, so a longer wait ends early.
            block = max(1, int(min(milliseconds, _LONGEST_BLOCK * 1000)))
        # COUNT holds per stream: share the room among them, so that this consumer takes
        # hardly more than it can hold (what it takes waits here, out of others' reach).
        count = -(-(limit - len(self._buffer)) // len(self._sources))
        response = await client.xreadgroup(
            self.group, self.consumer, dict.fromkeys(self._sources, ">"), count=count, block=block
        )
        read_at = time.monotonic()
        for key, entries in cast(list[tuple[bytes, list[tuple[bytes, _Fields]]]], response):
            for entry, fields in entries:
                self._buffer.append((read_at, self._delivery(key, entry, fields)))

    async def _move_due(self, client: redis.asyncio.Redis) -> None:
        """Move the group's due retries to its retry streams; note when the next is due."""
        now = int(time.time() * 1000)
        for _ in range(2):
            pipeline = client.pipeline(transaction=False)
            for stream in self._streams:
                delayed = _DELAYED.format(stream=stream, group=self.group)
                retries = _RETRIES.format(stream=stream, group=self.group)
                pipeline.evalsha(_MOVE_DUE_SHA, 2, delayed, retries, now, _MOVE_BATCH)
            results = await pipeline.execute(raise_on_error=False)
            if not any(isinstance(result, NoScriptError) for result in results):
                break
            # A server that does not know the script yet (or flushed it): load it, again.
            await client.script_load(_MOVE_DUE)
        for result in results:
            if isinstance(result, Exception):
                raise result
        self._next_due = min((float(score) for score in results if score is not None), default=None)

    async def _reclaim(self, client: redis.asyncio.Redis, budget: int) -> None:
        """Take over up to `budget` entries that other consumers held too long."""
        done = True
        idle = int(self.redeliver_after * 1000)
        for key in self._sources:
            if budget <= 0:
                done = False
                break
            cursor, claimed, *_ = await client.xautoclaim(
                key, self.group, self.consumer, idle, self._cursors.get(key, b"0-0"), budget
            )
            self._cursors[key] = cursor
            done = done and cursor in (b"0-0", "0-0")
            # Redis 6.2 lists entries deleted meanwhile without fields; 7.0 leaves them out.
            claimed = [(entry, fields) for entry, fields in claimed if fields is not None]
            if not claimed:
                continue
            # XAUTOCLAIM does not say how often an entry was delivered; XPENDING does.
            pipeline = client.pipeline(transaction=False)
            for entry, _ in claimed:
                pipeline.xpending_range(key, self.group, entry, entry, 1)
            counts = await pipeline.execute()
            read_at = time.monotonic()
            for (entry, fields), pending in zip(claimed, counts, strict=True):
                redelivered = pending[0]["times_delivered"] - 1 if pending else 1
                delivery = self._delivery(key, entry, fields, redelivered)
                self._buffer.append((read_at, delivery))
            budget -= len(claimed)
        # An unfinished round goes on at the next call; a finished one waits.
        self._next_reclaim = time.monotonic() + (self.redeliver_after / 4 if done else 0)

    def _delivery(
        self, key: bytes, entry: bytes, fields: _Fields, redelivered: int = 0
    ) -> RedisDelivery:
        """The delivery of one entry, with a `problem` if it is not a pybondi message."""
        source = self._sources[key]
        headers, body, problems = _read(fields)
        attempt, entry_id = 1, entry.decode()
        # Entry ids repeat from one stream to the next: the stream's name makes it unique.
        message_id = headers.get("message-id") or f"{source.stream}/{entry_id}"
        if source.retried:
            # It keeps the id of the message it retries, in its `id` field.
            message_id = headers.get("message-id") or fields.get(b"id", entry).decode(
                "utf-8", "replace"
            )
            try:
                attempt = int(fields.get(b"attempt", b""))
            except ValueError:
                attempt = 2
                problems.append(f"its attempt is not a number: {fields.get(b'attempt')!r}")
        problem = None
        if problems:
            problem = f"Entry {entry_id} of stream {source.key!r} " + "; ".join(problems) + "."
        envelope = Envelope(source.topic, message_id, headers, body)
        delivery = RedisDelivery(
            envelope, attempt + redelivered, problem, subscription=self, source=source, entry=entry
        )
        # The time Redis took it: its first entry's id (a retry keeps it as its `id`).
        delivery.timestamp = _entry_time(fields.get(b"id", entry) if source.retried else entry)
        return delivery


def _entry_time(entry: bytes) -> datetime | None:
    """The time in a stream entry's id (`[<stream>/]<milliseconds>-<sequence>`), if any."""
    milliseconds, dash, sequence = entry.rpartition(b"/")[2].partition(b"-")
    if not (dash and milliseconds.isdigit() and sequence.isdigit()):
        return None
    return datetime.fromtimestamp(int(milliseconds) / 1000, UTC)


def _read(fields: _Fields) -> tuple[dict[str, str], bytes, list[str]]:
    """An entry's headers and body, as far as they can be read, and what is wrong."""
    problems = []
    body = fields.get(b"body")
    if body is None:
        problems.append("has no body field")
        body = b""
    headers: dict[str, str] = {}
    raw = fields.get(b"headers")
    if raw is None:  # a producer that does not speak pybondi: a body alone
        return headers, body, problems
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as error:
        problems.append(f"has headers that are not JSON ({error}): {short_repr(raw)}")
        return headers, body, problems
    if not isinstance(parsed, dict):
        problems.append(f"has headers that are not a JSON object: {short_repr(parsed)}")
        return headers, body, problems
    headers = {name: value for name, value in parsed.items() if isinstance(value, str)}
    if len(headers) < len(parsed):
        wrong = {name: value for name, value in parsed.items() if name not in headers}
        problems.append(f"has headers whose values are not strings: {short_repr(wrong)}")
    return headers, body, problems


class RedisDelivery(Delivery):
    """An entry a `RedisSubscription` received, pending in the group until acknowledged.

    `attempt` counts the retries and the takeovers from silent consumers alike.
    """

    __slots__ = ("_entry", "_source", "_subscription")

    def __init__(
        self,
        envelope: Envelope,
        attempt: int,
        problem: str | None,
        *,
        subscription: RedisSubscription,
        source: _Source,
        entry: bytes,
    ) -> None:
        super().__init__(envelope, attempt, problem)
        self._subscription = subscription
        self._source = source
        self._entry = entry

    async def ack(self) -> None:
        """XACK the entry; a retry's entry is deleted too, as only this group reads it."""
        subscription, source = self._subscription, self._source
        async with subscription._connected() as client:
            if not source.retried:
                await client.xack(source.key, subscription.group, self._entry)
                return
            pipeline = client.pipeline(transaction=True)
            pipeline.xack(source.key, subscription.group, self._entry)
            pipeline.xdel(source.key, self._entry)
            await pipeline.execute()

    async def extend(self) -> None:
        """Claim the entry again for this consumer, which resets its idle time."""
        subscription = self._subscription
        async with subscription._connected() as client:
            await client.xclaim(
                self._source.key,
                subscription.group,
                subscription.consumer,
                0,
                [self._entry],
                justid=True,
            )

    async def retry(self, delay: float) -> None:
        """Add the message to the group's delayed retries and XACK it, in one transaction."""
        subscription, source, envelope = self._subscription, self._source, self.envelope
        due = (time.time() + max(delay, 0.0)) * 1000
        member = json.dumps(
            {
                "headers": json.dumps(envelope.headers),
                "body": envelope.body.decode("latin-1"),  # any bytes, as JSON text
                "attempt": self.attempt + 1,
                "id": envelope.id,  # the same id again, even without a message-id header
                "entry": f"{source.key}/{self._entry.decode()}",  # sets equal messages apart
            }
        )
        async with subscription._connected() as client:
            pipeline = client.pipeline(transaction=True)
            pipeline.zadd(
                _DELAYED.format(stream=source.stream, group=subscription.group), {member: due}
            )
            pipeline.xack(source.key, subscription.group, self._entry)
            if source.retried:
                pipeline.xdel(source.key, self._entry)
            await pipeline.execute()
        if subscription._next_due is None or due < subscription._next_due:
            subscription._next_due = due  # the next receive waits no longer than that
