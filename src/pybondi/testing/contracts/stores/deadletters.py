"""The store contract for dead letters: kept, deduplicated, paged, replayed, discarded.

Part of `StoreContract` (see `pybondi.testing.contracts.stores`). What a replay sends is
read back through the outbox, as a relay would.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import (
    REPLAYED_AT,
    REPLAYED_FOR,
    DeadLetter,
    MessagingRecords,
    bounded_id,
    id_problem,
)
from pybondi.testing.contracts.stores.inbox import GROUP, UNFIT_IDS, handled
from pybondi.testing.contracts.stores.target import Case, ContractPart, contract, envelope

__all__ = ["DeadLetterContract"]


def add(
    case: Case, message: Envelope, group: str = GROUP, *, claim: bool = True, commit: bool = True
) -> int | None:
    """`dead_letters.add` in a transaction of its own: the new letter's id, or None."""

    def work(records: MessagingRecords) -> int | None:
        return records.dead_letters.add(group, message, "Unreadable", 1, claim=claim)

    return case.run(work, commit=commit)


def ids(case: Case, **filters: Any) -> list[int]:
    """The ids of the dead letters `page(**filters)` lists."""
    return [letter.id for letter in case.run(lambda records: records.dead_letters.page(**filters))]


def get(case: Case, id: int) -> DeadLetter | None:
    """`dead_letters.get` in a transaction of its own."""
    return case.run(lambda records: records.dead_letters.get(id))


def replay(case: Case, *letters: int, commit: bool = True) -> list[int]:
    """`dead_letters.replay`: the ids replayed."""
    replayed = case.run(lambda records: records.dead_letters.replay(letters), commit=commit)
    return [letter.id for letter in replayed]


def sent(case: Case, topic: str) -> list[Envelope]:
    """What the outbox has for `topic`, as a relay claims it."""
    now = datetime.now(UTC)
    claimed = case.run(
        lambda records: records.outbox.claim(topic, "relay", now=now, until=now, limit=100)
    )
    return [] if claimed is None else claimed[1]


class DeadLetterContract(ContractPart):
    """What a `MessagingStore`'s dead letters keep: see `DeadLetterRecords`."""

    @contract("messaging")
    def test_a_dead_letter_keeps_the_message_and_takes_its_inbox_row(self, case: Case) -> None:
        """A letter keeps the message (its body as text) and the error; redeliveries skip it."""
        message = Envelope(
            "orders", "m-1", {"message-type": "json", "x-é": "ü"}, b'{"a":1}\xff\x00'
        )
        before = datetime.now(UTC)
        id = case.run(
            lambda records: records.dead_letters.add(GROUP, message, "ValueError: bad\nTrace", 5)
        )
        after = datetime.now(UTC)
        assert isinstance(id, int)
        letter = get(case, id)
        assert letter is not None
        assert letter == DeadLetter(
            id=id,
            group=GROUP,
            topic="orders",
            message_id="m-1",
            headers=message.headers,
            body='{"a":1}\ufffd\ufffd',  # not UTF-8, and a NUL: replaced
            error="ValueError: bad\nTrace",
            attempts=5,
            failed_at=letter.failed_at,
            holds_inbox=True,
        )
        assert letter.failed_at.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= letter.failed_at <= after + timedelta(seconds=1)
        assert handled(case, "m-1")
        assert get(case, id + 1) is None

    @contract("messaging")
    def test_a_message_the_inbox_has_is_not_dead_lettered(self, case: Case) -> None:
        """With `claim`, a message handled, or dead-lettered, already makes no letter."""
        handled_elsewhere, given_up_on = envelope(number=1), envelope(number=2)
        case.run(lambda records: records.inbox.claim(GROUP, handled_elsewhere))
        assert add(case, handled_elsewhere) is None
        first = add(case, given_up_on)
        assert first is not None
        assert add(case, given_up_on) is None  # delivered twice, dead-lettered once
        assert ids(case) == [first]

    @contract("messaging")
    def test_an_unreadable_message_is_kept_without_its_inbox_row(self, case: Case) -> None:
        """Without `claim`, the inbox is left alone; the same body is kept once per group."""
        bad = envelope(body=b"{not json")
        first = add(case, bad, claim=False)
        assert first is not None and not handled(case, bad.id)
        assert (letter := get(case, first)) is not None and not letter.holds_inbox
        assert add(case, bad, claim=False) is None  # the same again: no second letter
        # The same id with another body is another message (bodies compare case by case).
        corrected = Envelope(bad.topic, bad.id, bad.headers, b"{NOT JSON")
        other = add(case, corrected, claim=False)
        assert other is not None and other > first
        assert case.run(lambda records: records.inbox.claim(GROUP, corrected)) is True
        handled_since = Envelope(bad.topic, bad.id, bad.headers, b"[")
        assert add(case, handled_since, claim=False) is None  # the inbox has it now
        assert ids(case) == [first, other]
        assert add(case, bad, "audit", claim=False) is not None  # each group its own

    @contract("messaging")
    def test_an_unfit_id_is_kept_bounded_and_in_full_in_a_header(self, case: Case) -> None:
        """An id the inbox cannot keep is kept as `bounded_id`, and whole as `message-id`."""
        for unfit in UNFIT_IDS:
            message = Envelope("orders", unfit, {"message-type": "json"}, b"{}")
            id = add(case, message, claim=False)
            assert id is not None and add(case, message, claim=False) is None
            letter = get(case, id)
            assert letter is not None
            assert letter.message_id == bounded_id(unfit) != unfit
            assert id_problem(letter.message_id) is None
            assert letter.headers == {"message-type": "json", "message-id": unfit}

    @contract("messaging")
    def test_a_rolled_back_dead_letter_is_gone(self, case: Case) -> None:
        """A letter added in a rolled-back transaction leaves neither letter nor inbox row."""
        message = envelope()
        assert add(case, message, commit=False) is not None
        assert ids(case) == [] and not handled(case, message.id)

    @contract("messaging")
    def test_dead_letters_are_paged_by_group_and_topic(self, case: Case) -> None:
        """`page` lists letters in id order, after an id, up to a limit, of a group or topic."""
        made = [
            add(case, envelope(topic), group)
            for group, topic in [("a", "t1"), ("b", "t1"), ("a", "t2"), ("a", "t1"), ("b", "t2")]
        ]
        assert ids(case) == made == sorted(made)  # type: ignore[type-var]
        assert ids(case, group="a") == [made[0], made[2], made[3]]
        assert ids(case, topic="t1") == [made[0], made[1], made[3]]
        assert ids(case, group="a", topic="t1") == [made[0], made[3]]
        assert ids(case, group="c") == []
        assert ids(case, limit=2) == made[:2]
        assert ids(case, after=made[1], limit=2) == made[2:4]
        assert ids(case, after=made[3]) == made[4:]
        assert ids(case, group="b", after=made[1]) == [made[4]]

    @contract("messaging")
    def test_a_replay_sends_the_message_again_and_forgets_its_inbox_row(self, case: Case) -> None:
        """A replayed letter goes to the outbox, marked, and leaves the inbox; once only."""
        kept, replayed = envelope("other"), envelope(body='{"é":1}'.encode())
        kept_id, replayed_id = add(case, kept), add(case, replayed)
        assert kept_id is not None and replayed_id is not None
        before = datetime.now(UTC)

        assert replay(case, replayed_id, replayed_id, 999_999) == [replayed_id]

        [again] = sent(case, replayed.topic)
        headers = dict(again.headers)
        replayed_at = datetime.fromisoformat(headers.pop(REPLAYED_AT))
        assert headers.pop(REPLAYED_FOR) == GROUP
        assert (again.topic, again.id, headers, again.body) == (
            replayed.topic,
            replayed.id,
            replayed.headers,
            replayed.body,
        )
        assert replayed_at.utcoffset() is not None and replayed_at >= before
        assert not handled(case, replayed.id)  # the group handles it again
        assert ids(case) == [kept_id] and handled(case, kept.id)
        assert replay(case, replayed_id) == []  # replayed already
        assert len(sent(case, replayed.topic)) == 1

    @contract("messaging")
    def test_replaying_an_unreadable_message_keeps_the_inbox_row_of_its_twin(
        self, case: Case
    ) -> None:
        """A letter that holds no inbox row leaves the row of a corrected twin, handled since."""
        bad = envelope(body=b"{not json")
        letter = add(case, bad, claim=False)
        assert letter is not None
        corrected = Envelope(bad.topic, bad.id, bad.headers, b"{}")
        assert case.run(lambda records: records.inbox.claim(GROUP, corrected)) is True
        assert replay(case, letter) == [letter]
        assert handled(case, bad.id)  # the corrected message stays handled

    @contract("messaging")
    def test_a_rolled_back_replay_changes_nothing(self, case: Case) -> None:
        """A rolled-back replay leaves the letter, its inbox row, and no message."""
        message = envelope()
        id = add(case, message)
        assert id is not None
        assert replay(case, id, commit=False) == [id]
        assert sent(case, message.topic) == []
        assert handled(case, message.id) and ids(case) == [id]

    @contract("messaging")
    def test_discard_deletes_letters_and_keeps_their_inbox_rows(self, case: Case) -> None:
        """`discard` counts the letters it deleted; their messages stay handled."""
        messages = [envelope(number=n) for n in (1, 2, 3)]
        made = [add(case, message) for message in messages]
        first, second, third = (id for id in made if id is not None)

        def discard(*letters: int) -> int:
            return case.run(lambda records: records.dead_letters.discard(letters))

        assert discard(first, third, third, -1) == 2
        assert ids(case) == [second]
        assert all(handled(case, message.id) for message in messages)
        assert discard(first) == 0
        assert sent(case, messages[0].topic) == []
