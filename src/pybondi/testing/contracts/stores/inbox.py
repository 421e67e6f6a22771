"""The store contract for the inbox: once per group and message, purged, refused ids.

Part of `StoreContract` (see `pybondi.testing.contracts.stores`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pybondi.exceptions import ConcurrencyError
from pybondi.messaging.envelope import Envelope
from pybondi.persistence.records import MessagingRecords, id_problem
from pybondi.testing.contracts.stores.target import Case, ContractPart, contract, envelope, later

__all__ = ["UNFIT_IDS", "InboxContract", "handled"]

GROUP = "billing"

UNFIT_IDS = ["x" * 256, "a\x00b", "a\udc80b"]
"""Ids no store keeps: too long, with a NUL, not UTF-8 (see `id_problem`)."""


def handled(case: Case, message_id: str, group: str = GROUP) -> bool:
    """Whether the group's inbox has the message, read in a transaction of its own."""
    return case.run(lambda records: records.inbox.has(group, message_id))


def claim(case: Case, message: Envelope, group: str = GROUP, commit: bool = True) -> bool:
    """`inbox.claim` in a transaction of its own."""
    return case.run(lambda records: records.inbox.claim(group, message), commit=commit)


class InboxContract(ContractPart):
    """What a `MessagingStore`'s inbox keeps: see `InboxRecords`."""

    @contract("messaging")
    def test_a_message_is_claimed_once_per_group(self, case: Case) -> None:
        """A claim is True once per group and message, in its transaction and after."""
        message = envelope()

        def twice(records: MessagingRecords) -> list[bool]:
            first = records.inbox.claim(GROUP, message)
            return [
                first,
                records.inbox.has(GROUP, message.id),
                records.inbox.claim(GROUP, message),
            ]

        assert handled(case, message.id) is False
        assert case.run(twice) == [True, True, False]
        assert claim(case, message) is False
        assert handled(case, message.id) is True
        assert handled(case, message.id, "audit") is False  # each group its own
        assert claim(case, message, "audit") is True
        assert handled(case, message.id, "audit") is True

    @contract("messaging")
    def test_a_rolled_back_claim_is_gone(self, case: Case) -> None:
        """A message claimed in a rolled-back transaction is handled again."""
        message = envelope()
        assert claim(case, message, commit=False) is True
        assert handled(case, message.id) is False
        assert claim(case, message) is True
        assert handled(case, message.id) is True

    @contract("messaging")
    def test_purge_forgets_the_messages_handled_before(self, case: Case) -> None:
        """Messages handled before the moment given are forgotten: handled again after."""
        old, new = envelope(number=1), envelope(number=2)
        claim(case, old)
        between = later()
        claim(case, new)

        def purge(before: datetime) -> int:
            return case.run(lambda records: records.inbox.purge(before))

        assert purge(between - timedelta(days=1)) == 0
        assert purge(between) == 1
        assert (handled(case, old.id), handled(case, new.id)) == (False, True)
        assert purge(between) == 0
        assert claim(case, old) is True
        assert purge(datetime.now(UTC) + timedelta(days=1)) == 2

    @contract("messaging")
    def test_an_id_the_inbox_cannot_keep_is_refused(self, case: Case) -> None:
        """A claim raises ValueError, naming the problem, for an id `id_problem` refuses."""
        for unfit in UNFIT_IDS:
            message = Envelope("orders", unfit, {"message-type": "json"}, b"{}")
            problem = id_problem(unfit)
            assert problem is not None
            with pytest.raises(ValueError) as caught:
                claim(case, message)
            assert problem in str(caught.value)

    @contract("messaging")
    def test_two_claims_at_once_handle_the_message_once(self, case: Case) -> None:
        """Of two transactions claiming one message at once, one only takes it.

        Per `StoreTarget.concurrent_claims_wait`: the second waits for the first, then
        answers; or both answer True, and the one that commits last fails at commit.
        """
        for first_ends in ("commit", "rollback"):
            message = envelope()
            run = case.interleave(
                lambda records: records.inbox.claim(GROUP, message),  # noqa: B023
                lambda records: records.inbox.claim(GROUP, message),  # noqa: B023
                end="commit" if first_ends == "commit" else "rollback",
            )
            if case.target.concurrent_claims_wait:
                assert not run.second_first, first_ends  # it waited for the first
                assert (run.first, run.second) == (True, first_ends == "rollback")
            elif first_ends == "commit":
                assert run.second_first and run.second is True
                assert isinstance(run.first, ConcurrencyError), run.first
            else:
                assert (run.first, run.second) == (True, True)
            assert handled(case, message.id)
