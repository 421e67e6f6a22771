"""An in-process broker: the contract of the Redis, RabbitMQ and NATS adapters, no server.

    broker = MemoryBroker()                     # or connect("memory://orders")
    clock = ManualClock()
    broker = MemoryBroker(clock=clock)          # in tests: clock.advance(300) and a retry
                                                # due in 300 s comes now

The broker keeps each topic's messages, in the order sent, for as long as it lives: every
consumer group reads them from the oldest, as on Redis Streams and JetStream. Within a
group each message goes to one consumer at a time. A delivery neither acknowledged nor
extended within `redeliver_after` goes again, at attempt + 1, as its consumer went
silent; what a closed subscription held goes again at once, at attempt + 1, since the
broker knows that consumer is gone. `Delivery.retry(delay)` brings the message back to
its group only, `delay` seconds later on the broker's clock, at attempt + 1. Nothing
leaves the process nor outlives it: the broker is for tests and for running relays and
workers in one process.

Time is a `Clock` (pybondi.messaging.brokers.clock): real time by default. A
`ManualClock` moves only when told to, so a retry after 300 s takes no real time, and a
receive waiting on it wakes up as soon as `advance` makes something due.
`MemoryBroker.pending()` says what a group has ready, in flight and delayed, and when
the next delayed message is due: what an in-process runner needs to tell "idle" from
"waiting for a retry".

`connect("memory://name")` gives the process's broker of that name, made at the first
call, so that a relay and a worker in one process share it (see `shared`, `forget`).

It may be used from sync and async code on one event loop, and from other threads:
every change happens under a lock, and a receive waiting on any thread's event loop is
woken through that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from pybondi.exceptions import short_repr
from pybondi.messaging.brokers.base import Broker, Delivery, Subscription, SubscriptionTerms
from pybondi.messaging.brokers.clock import Clock, ManualClock
from pybondi.messaging.envelope import Envelope

__all__ = [
    "Clock",
    "ManualClock",
    "MemoryBroker",
    "MemoryDelivery",
    "MemorySubscription",
    "Pending",
    "forget",
    "shared",
]


class Pending(NamedTuple):
    """What a group of a `MemoryBroker` has to do on some topics; see `pending()`."""

    ready: int
    """Messages a receive would get now: new ones, due retries, redeliveries."""
    in_flight: int
    """Deliveries held by the group's consumers, neither acknowledged nor retried."""
    delayed: int
    """Retries not yet due."""
    next_due: float | None
    """When the first delayed one is due, on the broker's clock (`clock.monotonic()`)."""


@dataclass(slots=True, eq=False)
class _Kept:
    """A message as the broker keeps it for every group."""

    envelope: Envelope
    timestamp: datetime
    order: int  # the broker's count of messages sent: sets apart those of several topics


@dataclass(slots=True, eq=False)
class _Item:
    """One message on its way to one group: waiting, held by a consumer, or settled."""

    lane: _Lane
    kept: _Kept
    attempt: int
    order: int  # sets equal due times apart (first sent, first out); a key of `lane.held`
    due: float = 0.0  # waiting: when it is ready; held: when it goes to another consumer
    holder: MemorySubscription | None = None
    hold: int = 0  # which handing out holds it: a delivery of an earlier one is stale
    settled: bool = False


class _Lane:
    """One group's share of one topic: how far it read, and its messages under way."""

    __slots__ = ("held", "log", "offset", "waiting")

    def __init__(self, log: list[_Kept]) -> None:
        self.log = log
        self.offset = 0  # a new group starts from the oldest message kept
        self.waiting: list[tuple[float, int, _Item]] = []  # heap: retries, redeliveries
        self.held: dict[int, _Item] = {}

    def expire(self, now: float) -> None:
        """Put back the deliveries held past their time: their consumer went silent."""
        for item in [item for item in self.held.values() if item.due <= now]:
            self.give_back(item, item.due)

    def give_back(self, item: _Item, due: float) -> None:
        """Make a held item wait again, at the next attempt, ready from `due`."""
        del self.held[item.order]
        if item.holder is not None:
            item.holder._holding.discard(item)
        item.holder = None
        item.attempt += 1
        heapq.heappush(self.waiting, (due, item.order, item))

    def first(self, now: float) -> tuple[int, float, int] | None:
        """The sort key of the message this lane would hand out next, if any is ready."""
        waiting = self.waiting
        while waiting and waiting[0][2].settled:
            heapq.heappop(waiting)
        if waiting and waiting[0][0] <= now:
            return (0, waiting[0][0], waiting[0][1])  # retries and redeliveries first
        if self.offset < len(self.log):
            return (1, 0.0, self.log[self.offset].order)
        return None

    def take(self, now: float) -> _Item:
        """Hand out the message `first()` named."""
        waiting = self.waiting
        if waiting and waiting[0][0] <= now:
            return heapq.heappop(waiting)[2]
        kept = self.log[self.offset]
        self.offset += 1
        return _Item(self, kept, 1, kept.order)

    def next_due(self) -> float | None:
        """When something of this lane is ready next: a retry, or a held one's expiry."""
        dues = [due for due, _, item in self.waiting if not item.settled]
        dues += [item.due for item in self.held.values()]
        return min(dues, default=None)


class MemoryBroker(Broker["MemorySubscription"]):
    """Keeps messages in this process and hands them to subscriptions; see the module doc.

    Args:
        url: `memory://` and a name, shown in its repr. `connect(url)` gives the
            process's shared broker of that name; a broker made here is your own.
        clock: the time of due times and timestamps (default: real time).

    `send` and `asend` never fail for want of a server: an envelope is refused (with
    `PublishError`) only when no broker could carry it (headers that are not text, a
    body that is not bytes). Each message is kept as a copy: changing the envelope sent
    changes nothing on the broker. `close()` keeps the messages.
    """

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None) -> None:
        self.url = url
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._count = itertools.count(1)
        self._topics: dict[str, list[_Kept]] = {}
        self._lanes: dict[tuple[str, str], _Lane] = {}  # (topic, group)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.clock.watch(self._wake)

    def send(self, envelopes: Sequence[Envelope]) -> None:
        """Keep the envelopes, in order; the sync client is the async one."""
        with self._lock:
            for index, envelope in enumerate(envelopes):
                if problem := _problem(envelope):
                    self._wake_all()
                    raise self._unconfirmed(envelopes, index, problem)
                log = self._topics.setdefault(envelope.topic, [])
                # Like a Redis entry id: the broker's own id of a message that has none.
                id = envelope.id or f"{envelope.topic}/{len(log) + 1}"
                copy = Envelope(envelope.topic, id, dict(envelope.headers), envelope.body)
                log.append(_Kept(copy, self.clock.now(), next(self._count)))
            self._wake_all()

    async def asend(self, envelopes: Sequence[Envelope]) -> None:
        """`send`: nothing to wait for."""
        self.send(envelopes)

    def _subscription(self, terms: SubscriptionTerms) -> MemorySubscription:
        with self._lock:
            lanes = []
            for topic in terms.topics:
                if (topic, terms.group) not in self._lanes:
                    lane = _Lane(self._topics.setdefault(topic, []))
                    self._lanes[topic, terms.group] = lane
                lanes.append(self._lanes[topic, terms.group])
        return MemorySubscription(self, lanes, terms)

    def messages(self, topic: str) -> list[Envelope]:
        """Every message kept for `topic`, in the order sent (copies): what was published."""
        with self._lock:
            kept = list(self._topics.get(topic, ()))
        return [_copy(each.envelope) for each in kept]

    def pending(self, topics: Sequence[str], group: str) -> Pending:
        """What `group` has to do on `topics`, now; see `Pending`.

        A group that never subscribed to a topic counts its every message as ready.
        Nothing ready, in flight nor delayed means the group is done, until more is sent.
        """
        ready = in_flight = delayed = 0
        dues: list[float] = []
        with self._lock:
            now = self.clock.monotonic()
            for topic in dict.fromkeys(topics):
                lane = self._lanes.get((topic, group))
                if lane is None:
                    ready += len(self._topics.get(topic, ()))
                    continue
                lane.expire(now)
                ready += len(lane.log) - lane.offset
                in_flight += len(lane.held)
                for due, _, item in lane.waiting:
                    if item.settled:
                        continue
                    if due <= now:
                        ready += 1
                    else:
                        delayed += 1
                        dues.append(due)
        return Pending(ready, in_flight, delayed, min(dues, default=None))

    def _wake(self) -> None:
        """Have every waiting receive look again (the clock moved)."""
        with self._lock:
            self._wake_all()

    def _wake_all(self) -> None:
        """`_wake`, with the lock held."""
        waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            # A closed loop raises RuntimeError: nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, waiter)


class MemorySubscription(Subscription):
    """A consumer's share of a group's messages on a `MemoryBroker`; see the module doc.

    `in_flight` bounds what the subscription holds unacknowledged, not only each
    receive. `redeliver_after` is in seconds of the broker's clock.

    `close()` puts what it held back to the group at once, at attempt + 1; a closed
    subscription cannot receive again, and its deliveries can no longer be settled
    (`ConnectionError`, as on RabbitMQ).
    """

    def __init__(self, broker: MemoryBroker, lanes: list[_Lane], terms: SubscriptionTerms) -> None:
        super().__init__(terms)
        self.broker = broker
        self._lanes = lanes
        self._holding: set[_Item] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<MemorySubscription {self.group}/{self.consumer} on {self.broker!r}>"

    async def receive(self, limit: int, wait: float) -> list[Delivery]:
        """Up to `limit` deliveries: at once what is ready, else the first that comes.

        Waits at most `wait` real seconds, and no longer than it takes a message to be
        sent, a retry or redelivery to come due, or a slot to free up (an ack).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        broker, clock = self.broker, self.broker.clock
        while True:
            with broker._lock:
                if self._closed:
                    raise RuntimeError(f"{self!r} is closed; subscribe again to receive.")
                taken, due = self._take(limit)
                remaining = deadline - loop.time()
                if taken or limit <= 0 or remaining <= 0:
                    return taken
                waiter = loop.create_future()
                broker._waiters.append((loop, waiter))
            if due is not None and clock.runs:
                remaining = min(remaining, max(due - clock.monotonic(), 0.0))
            try:
                await asyncio.wait((waiter,), timeout=remaining)
            finally:
                with broker._lock:
                    if (loop, waiter) in broker._waiters:
                        broker._waiters.remove((loop, waiter))

    def _take(self, limit: int) -> tuple[list[Delivery], float | None]:
        """Hand out what is ready, up to the limits; else when to look again, if known."""
        now = self.broker.clock.monotonic()
        for lane in self._lanes:
            lane.expire(now)
        budget = min(limit, self.in_flight - len(self._holding))
        taken: list[Delivery] = []
        while len(taken) < budget:
            firsts = [(key, lane) for lane in self._lanes if (key := lane.first(now))]
            if not firsts:
                break
            lane = min(firsts, key=lambda first: first[0])[1]
            item = lane.take(now)
            item.holder, item.due = self, now + self.redeliver_after
            item.hold += 1
            lane.held[item.order] = item
            self._holding.add(item)
            taken.append(MemoryDelivery(self, item))
        if taken or budget <= 0:
            return taken, None  # full: an ack or a close wakes the receive up
        return taken, min(
            (due for lane in self._lanes if (due := lane.next_due()) is not None), default=None
        )

    async def close(self) -> None:
        """Stop consuming: what this subscription held goes back to the group at once."""
        broker = self.broker
        with broker._lock:
            self._closed = True
            now = broker.clock.monotonic()
            for item in sorted(self._holding, key=lambda item: item.order):
                item.lane.give_back(item, now)
            broker._wake_all()

    def _settle(self, delivery: MemoryDelivery, retry_after: float | None = None) -> None:
        """Acknowledge (or retry) a delivery's message, unless it was settled already."""
        broker, item = self.broker, delivery._item
        with broker._lock:
            if self._closed:
                raise ConnectionError(
                    f"Cannot settle {delivery!r}: {self!r} is closed, and what it held went "
                    f"back to the group."
                )
            if item.settled:
                return  # the same message, settled through a later delivery of it
            item.settled = True
            if item.lane.held.get(item.order) is item:
                del item.lane.held[item.order]
            if item.holder is not None:
                item.holder._holding.discard(item)
                item.holder = None
            if retry_after is not None:
                now = broker.clock.monotonic()
                retried = _Item(item.lane, item.kept, delivery.attempt + 1, next(broker._count))
                heapq.heappush(item.lane.waiting, (now + retry_after, retried.order, retried))
            broker._wake_all()


class MemoryDelivery(Delivery):
    """A message a `MemorySubscription` handed out; see `Delivery`.

    A delivery whose message went to another consumer since (it was held past
    `redeliver_after`) can still acknowledge or retry it, as on Redis; `extend()` then
    does nothing. Settling a message that is settled already does nothing.
    """

    __slots__ = ("_hold", "_item", "_subscription")

    def __init__(self, subscription: MemorySubscription, item: _Item) -> None:
        super().__init__(_copy(item.kept.envelope), item.attempt)
        self.timestamp = item.kept.timestamp
        self._subscription = subscription
        self._item = item
        self._hold = item.hold

    async def ack(self) -> None:
        """Acknowledge the message: the group will not get it again."""
        self._subscription._settle(self)

    async def extend(self) -> None:
        """Restart the `redeliver_after` of the message, if this delivery still holds it."""
        subscription, item = self._subscription, self._item
        with subscription.broker._lock:
            if item.holder is subscription and item.hold == self._hold and not item.settled:
                item.due = subscription.broker.clock.monotonic() + subscription.redeliver_after

    async def retry(self, delay: float) -> None:
        """Have the group get the message again `delay` seconds on, at attempt + 1."""
        self._subscription._settle(self, retry_after=max(delay, 0.0))


def _copy(envelope: Envelope) -> Envelope:
    """A copy whose headers a receiver may change without changing the broker's."""
    return Envelope(envelope.topic, envelope.id, dict(envelope.headers), envelope.body)


def _problem(envelope: object) -> str | None:
    """Why no broker could carry `envelope`, or None."""
    if not isinstance(envelope, Envelope):
        return f"{short_repr(envelope)} is not an Envelope"
    if not isinstance(envelope.topic, str) or not envelope.topic:
        return f"its topic is {short_repr(envelope.topic)}, not a name"
    if not isinstance(envelope.id, str):
        return f"its id is {short_repr(envelope.id)}, not text"
    if not isinstance(envelope.body, bytes):
        return f"its body is a {type(envelope.body).__name__}, not bytes"
    headers = envelope.headers
    if not isinstance(headers, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        return f"its headers are {short_repr(headers)}, not text names and values"
    return None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_SHARED: dict[str, MemoryBroker] = {}  # the process's brokers, by memory:// URL
_SHARED_LOCK = threading.Lock()


def shared(url: str, *, clock: Clock | None = None) -> MemoryBroker:
    """The process's broker for a `memory://name` URL: what `connect(url)` returns.

    Made at the first call for its name, with `clock`; later calls return the same
    broker, with its messages. Give a clock only with the first call (or the same one):
    another raises ValueError, since the broker's due times are on its first clock.
    """
    url = _normal(url)
    with _SHARED_LOCK:
        broker = _SHARED.get(url)
        if broker is None:
            broker = _SHARED[url] = MemoryBroker(url, clock=clock)
        elif clock is not None and clock is not broker.clock:
            raise ValueError(
                f"{url} is in use with {broker.clock!r}, not {clock!r}: give the same "
                f"clock or none, or forget({url!r}) first for a new broker."
            )
    return broker


def forget(url: str) -> None:
    """Drop the process's broker for `url` and its messages; the next `shared` makes anew.

    Whoever holds it keeps a working broker, no longer shared.
    """
    with _SHARED_LOCK:
        _SHARED.pop(_normal(url), None)


def _normal(url: str) -> str:
    """`url` as the key of its shared broker (the scheme in lower case)."""
    scheme, separator, name = url.partition("://")
    if not separator or scheme.lower() != "memory":
        raise ValueError(f"{url!r} is no memory:// URL; name the broker as in memory://orders.")
    return f"memory://{name}"
