"""The outbox relay and workers, run in this process until nothing is left to do.

    runner = InProcessRunner(MemoryStore(), MemoryBroker(clock=ManualClock()))
    with Session(bus, StateRepository(runner.store, Account, registry),
                 Outbox(runner.store, registry)) as session:
        session.execute(Deposit("erin", 5))     # a message in the outbox
    drained = runner.drain(mails)               # relayed, handled, retried, dead-lettered
    assert drained.handled == 1

`drain(*consumers)` (`await adrain(...)` in async code) does what a relay and a worker
per consumer would do in production, in rounds, until a round changes nothing: a
`Relay` sends what the outbox holds (`Relay.run_once`, until it sends nothing), and a
`Worker` per consumer takes its group's messages until the broker has none of them
ready nor under way (`MemoryBroker.pending`). What the handlers publish goes through the
outbox, so the relay runs again after them. When only retries are left, waiting for
their time, the broker's `ManualClock` is advanced to the first one's: a retry 300 s on
takes no real time (on a clock that runs, the runner waits). Then the workers stop, the
relay gives its leases back, and `drain` returns what was done (`Drained`).

Everything runs as in production, on the store and the broker given: sessions, the
inbox, retries and dead letters. Within a drain, messages are handled concurrently, as
a worker does; only the order a consumer's `key` sets is kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pybondi.exceptions import short_repr
from pybondi.messaging.brokers.clock import ManualClock
from pybondi.messaging.brokers.memory import MemoryBroker, Pending
from pybondi.messaging.consumer import Consumer
from pybondi.messaging.relay import Relay
from pybondi.messaging.worker import Worker
from pybondi.persistence.records import MessagingRecords
from pybondi.persistence.store import MessagingStore

__all__ = ["Drained", "InProcessRunner"]

logger = logging.getLogger("pybondi.testing.runner")

_POLL = 0.001  # seconds between two looks at the broker while the workers are busy
_GRACE = 0.5  # seconds a worker stopped on an error gives its messages before cancelling


@dataclass(frozen=True, slots=True)
class Drained:
    """What one `InProcessRunner.drain` did.

    Attributes:
        sent: messages the relay sent from the outbox to the broker.
        handled, skipped, retried, dead_lettered: deliveries the workers handled,
            skipped (their group had them already), retried later and dead-lettered;
            a message that failed once, then passed, counts once in `retried` and once
            in `handled`.
        advanced: seconds the broker's manual clock was moved on, to bring retries due.
        delayed: retries still waiting (with `advance=False`), on the consumers' topics.
    """

    sent: int = 0
    handled: int = 0
    skipped: int = 0
    retried: int = 0
    dead_lettered: int = 0
    advanced: float = 0.0
    delayed: int = 0


class InProcessRunner:
    """Runs a relay and workers on a store and a memory broker; see the module doc.

    Args:
        store: the store the sessions' `Outbox` writes to, and the workers' store
            (inbox, dead letters, and the consumers' repositories).
        broker: the `MemoryBroker` between the relay and the workers; on a
            `ManualClock`, retries come due without waiting.
        timeout: real seconds a drain may take before it gives up with a
            `TimeoutError` that says what was left (a handler that never returns, or
            messages that keep causing others).
    """

    def __init__(self, store: MessagingStore, broker: MemoryBroker, *, timeout: float = 10.0):
        if not isinstance(store, MessagingStore):
            raise TypeError(
                f"The runner relays an outbox and keeps the workers' inbox in a store that "
                f"keeps them; {short_repr(store)} does not. Pass a MemoryStore (or a SQLStore)."
            )
        if not isinstance(broker, MemoryBroker):
            raise TypeError(
                f"The runner asks the broker when a group is done, which only a MemoryBroker "
                f"says; got {short_repr(broker)}. Pass MemoryBroker(clock=ManualClock())."
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be above 0 seconds, got {timeout!r}.")
        self.store = store
        self.broker = broker
        self.timeout = timeout
        self.relay = Relay(store, broker)

    def __repr__(self) -> str:
        return f"<InProcessRunner from {self.store!r} through {self.broker!r}>"

    def drain(self, *consumers: Consumer, advance: bool = True) -> Drained:
        """Relay and handle until nothing is left to do; for sync code and tests.

        It runs `adrain` on an event loop of its own, so it cannot be called where one
        runs already (in async code, `await runner.adrain(...)`). With `advance=False`
        it returns as soon as only retries are left, leaving the clock where it is.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "drain() runs an event loop of its own, and this thread runs one already: "
                "in async code, use `await runner.adrain(...)`."
            )
        with asyncio.Runner() as runner:
            return runner.run(self.adrain(*consumers, advance=advance))

    async def adrain(self, *consumers: Consumer, advance: bool = True) -> Drained:
        """`drain`, on the running event loop."""
        for consumer in consumers:
            if not isinstance(consumer, Consumer):
                raise TypeError(
                    f"drain() takes the Consumers whose workers to run, got {short_repr(consumer)}."
                )
        workers = [
            Worker(consumer, self.broker, self.store, name=f"runner-{index}", grace=_GRACE)
            for index, consumer in enumerate(consumers, start=1)
        ]
        tasks = [asyncio.create_task(worker.run()) for worker in workers]
        try:
            async with asyncio.timeout(self.timeout) as deadline:
                sent, advanced, delayed = await self._rounds(workers, tasks, advance)
        except BaseException as error:
            expired = isinstance(error, TimeoutError) and deadline.expired()
            left = self._timed_out(consumers) if expired else ""  # before the stop
            await _stop(workers, tasks)
            if expired:
                raise TimeoutError(left) from None
            raise
        finally:
            await self.store.atransact(self._release)
        if failures := await _stop(workers, tasks):
            raise failures[0]
        return Drained(
            sent,
            sum(worker.handled for worker in workers),
            sum(worker.skipped for worker in workers),
            sum(worker.retried for worker in workers),
            sum(worker.dead_lettered for worker in workers),
            advanced,
            delayed,
        )

    async def _rounds(
        self, workers: list[Worker], tasks: list[asyncio.Task[None]], advance: bool
    ) -> tuple[int, float, int]:
        """Relay, let the workers finish, again until neither has anything; see `adrain`.

        Returns what was sent, the seconds advanced, and the retries left waiting.
        """
        sent, advanced = await self._relay(), 0.0
        while True:
            pending = await self._idle(workers, tasks)
            if more := await self._relay():  # what the handlers published
                sent += more
                continue
            delayed = sum(each.delayed for each in pending)
            dues = [each.next_due for each in pending if each.next_due is not None]
            due = min(dues, default=None)
            if due is None or not advance:
                return sent, advanced, delayed
            clock = self.broker.clock
            step = max(due - clock.monotonic(), 0.0)
            if isinstance(clock, ManualClock):
                clock.advance(step)  # the waiting receives wake up at once
                advanced += step
            else:
                await asyncio.sleep(step)  # real time: the retries come due by themselves

    async def _relay(self) -> int:
        """Send what the outbox holds, until a round of the relay sends nothing."""
        sent = 0
        while more := await self.relay.run_once():
            sent += more
        return sent

    async def _idle(self, workers: list[Worker], tasks: list[asyncio.Task[None]]) -> list[Pending]:
        """Wait until no group has a message ready or under way; what each has left.

        A message is acknowledged or retried only once its session committed (or its
        dead letter is written): then what its handlers published is in the outbox.
        """
        while True:
            for worker, task in zip(workers, tasks, strict=True):
                if task.done():  # a worker ends only on stop(), or on an error
                    task.result()
                    raise RuntimeError(f"{worker!r} stopped while the runner was draining.")
            pending = [self._pending(worker.consumer) for worker in workers]
            if not any(each.ready or each.in_flight for each in pending):
                return pending
            await asyncio.sleep(_POLL)

    def _pending(self, consumer: Consumer) -> Pending:
        return self.broker.pending(consumer.topics, consumer.group)

    def _release(self, records: MessagingRecords) -> None:
        """Give the relay's leases back, so that another relay may send at once."""
        records.outbox.release(self.relay.name)

    def _timed_out(self, consumers: Sequence[Consumer]) -> str:
        left = "".join(
            f"\n  group {consumer.group!r} on {', '.join(consumer.topics)}: "
            f"{self._pending(consumer)}"
            for consumer in consumers
        )
        return (
            f"drain() still had work after {self.timeout:g} s: a handler that does not "
            f"return, or messages that keep causing others. What was left:"
            f"{left or ' the outbox, still sending.'}\nPass InProcessRunner(timeout=...) "
            f"if it only needs longer."
        )


async def _stop(workers: list[Worker], tasks: list[asyncio.Task[None]]) -> list[BaseException]:
    """Stop the workers and wait for them; the errors they ended with."""
    for worker in workers:
        worker.stop()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [result for result in results if isinstance(result, BaseException)]
