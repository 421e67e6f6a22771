"""The store contract for the outbox: numbering per topic, leases, purging, idle topics.

Part of `StoreContract` (see `pybondi.testing.contracts.stores`). Leases and purges take
the times they are given, so the tests pass moments of their own, and never wait.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pybondi.messaging.envelope import Envelope
from pybondi.testing.contracts.stores.target import Case, ContractPart, contract, envelope

__all__ = ["OutboxContract"]

START = datetime.now(UTC).replace(microsecond=0)
LEASE = timedelta(seconds=30)


def at(seconds: float) -> datetime:
    """The moment `seconds` after the tests' start."""
    return START + timedelta(seconds=seconds)


def claim(
    case: Case, topic: str, owner: str, seconds: float = 0, limit: int = 10
) -> tuple[int, list[Envelope]] | None:
    """`outbox.claim` at `at(seconds)`, for a lease of `LEASE`, in a transaction of its own."""
    now = at(seconds)
    return case.run(
        lambda records: records.outbox.claim(topic, owner, now=now, until=now + LEASE, limit=limit)
    )


def confirm(
    case: Case, topic: str, owner: str, *, after: int, last: int, seconds: float = 0
) -> bool:
    """`outbox.confirm` at `at(seconds)`, the lease extended for `LEASE`."""
    now = at(seconds)
    return case.run(
        lambda records: records.outbox.confirm(
            topic, owner, after=after, last=last, now=now, until=now + LEASE
        )
    )


def enqueue(case: Case, *envelopes: Envelope, commit: bool = True) -> None:
    """`outbox.enqueue` in a transaction of its own."""
    case.run(lambda records: records.outbox.enqueue(envelopes), commit=commit)


def pending(case: Case) -> list[str]:
    """The pending topics, sorted."""
    return sorted(case.run(lambda records: records.outbox.pending_topics()))


class OutboxContract(ContractPart):
    """What a `MessagingStore`'s outbox keeps: see `OutboxRecords`."""

    @contract("messaging")
    def test_each_topics_messages_are_numbered_from_1_in_order(self, case: Case) -> None:
        """Each topic's messages get seq 1, 2, 3..., in the order written; headers kept."""
        a1, b1, a2, a3 = envelope("a", 1), envelope("b", 1), envelope("a", 2), envelope("a", 3)
        enqueue(case, a1, b1, a2)
        enqueue(case, a3)
        enqueue(case)  # nothing: nothing happens
        assert pending(case) == ["a", "b"]

        assert claim(case, "a", "relay-1", limit=2) == (0, [a1, a2])  # the first two
        assert confirm(case, "a", "relay-1", after=0, last=2)  # ... were seq 1 and 2
        assert claim(case, "a", "relay-1") == (2, [a3])
        assert claim(case, "b", "relay-1") == (0, [b1])
        assert pending(case) == ["a", "b"]  # claimed is not confirmed
        assert confirm(case, "a", "relay-1", after=2, last=3)
        assert pending(case) == ["b"]

    @contract("messaging")
    def test_a_rolled_back_enqueue_leaves_no_gap(self, case: Case) -> None:
        """A rolled-back transaction gives its numbers back, on a new topic too."""
        first, lost, second = envelope("a", 1), envelope("a", 2), envelope("a", 3)
        enqueue(case, first)
        enqueue(case, lost, envelope("new", 1), commit=False)
        assert pending(case) == ["a"]
        enqueue(case, second)
        fresh = envelope("new", 2)
        enqueue(case, fresh)
        assert pending(case) == ["a", "new"]  # the relay finds the new topic

        assert claim(case, "a", "relay-1") == (0, [first, second])
        assert confirm(case, "a", "relay-1", after=0, last=2)  # seq 1 and 2: no gap
        assert claim(case, "new", "relay-1") == (0, [fresh])
        assert confirm(case, "new", "relay-1", after=0, last=1)

    @contract("messaging")
    def test_a_topics_numbers_follow_commit_order(self, case: Case) -> None:
        """Of two transactions writing to a topic at once, the first to commit gets seq 1.

        A SQL store makes the second wait for the first; the memory store numbers at
        commit. Either way a relay, which sends from the last seq confirmed, skips none.
        """
        first, second = envelope("t", 1), envelope("t", 2)
        run = case.interleave(
            lambda records: records.outbox.enqueue([first]),
            lambda records: records.outbox.enqueue([second]),
        )
        assert (run.first, run.second) == (None, None)
        in_order = [second, first] if run.second_first else [first, second]
        assert claim(case, "t", "relay-1") == (0, in_order)

    @contract("messaging")
    def test_a_lease_keeps_other_relays_off_until_it_expires(self, case: Case) -> None:
        """A relay holds a topic until its lease expires; only it confirms, from its cursor."""
        messages = [envelope("t", n) for n in (1, 2, 3)]
        enqueue(case, *messages)
        assert claim(case, "t", "relay-1", 0, limit=2) == (0, messages[:2])
        assert claim(case, "t", "relay-2", 10) is None
        assert claim(case, "t", "relay-1", 5, limit=2) == (0, messages[:2])  # its own: renewed

        def renew(topic: str, owner: str, seconds: float) -> bool:
            return case.run(lambda records: records.outbox.renew(topic, owner, until=at(seconds)))

        assert renew("t", "relay-1", 60)
        assert not renew("t", "relay-2", 60) and not renew("other", "relay-1", 60)
        assert claim(case, "t", "relay-2", 45) is None  # renewed until 60

        assert not confirm(case, "t", "relay-2", after=0, last=2, seconds=20)  # not the holder
        assert not confirm(case, "t", "relay-1", after=1, last=2, seconds=20)  # not its cursor
        assert confirm(case, "t", "relay-1", after=0, last=2, seconds=20)  # leased until 50
        assert not confirm(case, "t", "relay-1", after=0, last=2, seconds=20)  # moved on

        assert claim(case, "t", "relay-2", 51) == (2, messages[2:])  # expired: taken over
        assert not renew("t", "relay-1", 90)
        assert not confirm(case, "t", "relay-1", after=2, last=3, seconds=52)
        assert confirm(case, "t", "relay-2", after=2, last=3, seconds=52)
        assert pending(case) == []

    @contract("messaging")
    def test_a_released_lease_is_free_at_once(self, case: Case) -> None:
        """`release` gives up one topic's lease, or every one the relay holds; no other's."""
        one, two = envelope("one", 1), envelope("two", 1)
        enqueue(case, one, two)
        assert claim(case, "one", "relay-1") and claim(case, "two", "relay-1")

        def release(owner: str, topic: str | None = None) -> None:
            case.run(lambda records: records.outbox.release(owner, topic))

        release("relay-1", "one")
        assert claim(case, "one", "relay-2", 1) == (0, [one])
        assert claim(case, "two", "relay-2", 1) is None
        release("relay-3")  # holds nothing: changes nothing
        assert claim(case, "one", "relay-1", 2) is None
        release("relay-1")
        assert claim(case, "two", "relay-2", 3) == (0, [two])

    @contract("messaging")
    def test_purge_deletes_the_messages_sent_before(self, case: Case) -> None:
        """Messages confirmed before the moment given go; unsent ones stay."""
        messages = [envelope("t", n) for n in (1, 2, 3)]
        enqueue(case, *messages)
        assert claim(case, "t", "relay-1", 0, limit=2) == (0, messages[:2])
        assert confirm(case, "t", "relay-1", after=0, last=2, seconds=10)

        def purge(seconds: float) -> int:
            return case.run(lambda records: records.outbox.purge(at(seconds)))

        assert purge(10) == 0  # sent at 10: not before it
        assert purge(11) == 2
        assert purge(11) == 0
        assert claim(case, "t", "relay-1", 12) == (2, messages[2:])

    @contract("messaging")
    def test_an_idle_topic_is_forgotten_and_starts_again_from_1(self, case: Case) -> None:
        """A topic all sent, purged and not leased goes; written to again, it starts anew."""
        for topic in ("a", "b", "busy"):
            enqueue(case, envelope(topic, 1))
        for topic in ("a", "b"):
            assert claim(case, topic, "relay-1")
            assert confirm(case, topic, "relay-1", after=0, last=1)

        def forget(seconds: float, limit: int = 100) -> int:
            now = at(seconds)
            return case.run(lambda records: records.outbox.forget_idle_topics(now, limit))

        assert forget(10) == 0  # sent, but not purged yet
        assert case.run(lambda records: records.outbox.purge(at(1))) == 2
        assert forget(10) == 0  # leased until 30
        case.run(lambda records: records.outbox.release("relay-1"))
        assert forget(10, limit=1) == 1
        assert forget(10) == 1
        assert forget(10) == 0  # "busy" has a message to send
        assert pending(case) == ["busy"]

        again = envelope("a", 2)
        enqueue(case, again)
        assert claim(case, "a", "relay-2", 11) == (0, [again])
        assert confirm(case, "a", "relay-2", after=0, last=1, seconds=11)
