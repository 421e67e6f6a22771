"""The store contract for aggregates: records, events, snapshots, transactions; table rows.

Part of `StoreContract` (see `pybondi.testing.contracts.stores`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pybondi.exceptions import ConcurrencyError, SessionError
from pybondi.persistence.records import (
    MessagingRecords,
    Record,
    Records,
    Snapshot,
    StoredEvent,
    TableRecords,
)
from pybondi.testing.contracts.stores.target import Case, ContractPart, contract, envelope, event

__all__ = ["RecordsContract"]


def positioned(events: list[StoredEvent], first: int) -> list[StoredEvent]:
    """The events as the log keeps them: at positions from `first` on."""
    return [dataclasses.replace(each, position=first + n) for n, each in enumerate(events)]


def rows(records: Records) -> TableRecords:
    """The records, which read and write table rows (`keeps_table_rows`)."""
    assert isinstance(records, TableRecords), f"{records!r} are not TableRecords"
    return records


def assert_conflict(error: object, stream: str, expected: int, actual: int | None) -> None:
    """`error` is the ConcurrencyError of a write of `stream` expected at `expected`."""
    assert isinstance(error, ConcurrencyError), error
    assert (error.stream, error.expected, error.actual) == (stream, expected, actual)
    if actual is not None:
        assert f"version {actual}" in str(error)


class RecordsContract(ContractPart):
    """What every store keeps: `Records`, in transactions (and `TableRecords`)."""

    # Records and versions ----------------------------------------------------------------

    @contract()
    def test_a_record_is_written_new_at_0_and_read_back(self, case: Case) -> None:
        """A record written as new (expected 0) is read back, in its transaction and after."""
        record = Record("bank.Account-a-1", 1, 2, '{"owner":"ada","note":"café"}')
        begun = case.begin()
        try:
            assert begun.transaction.store is case.store
            assert begun.run(lambda records: records.read(record.stream)) is None
            begun.run(lambda records: records.write(record, 0))
            assert begun.run(lambda records: records.read(record.stream)) == record
            begun.commit()
        finally:
            begun.close()
        assert case.run(lambda records: records.read(record.stream)) == record
        assert case.run(lambda records: records.read("bank.Account-a-2")) is None
        assert case.run(lambda records: records.ping()) is None  # the store answers

    @contract()
    def test_a_write_checks_the_version_it_expects(self, case: Case) -> None:
        """A write expects the stored version; a stale one fails, naming both, writing nothing."""
        stream = "bank.Account-a-1"
        case.run(lambda records: records.write(Record(stream, 1, 1, '"first"'), 0))
        case.run(lambda records: records.write(Record(stream, 2, 1, '"second"'), 1))
        for expected, written in [(1, Record(stream, 2, 1, '"stale"')), (0, Record(stream, 1))]:
            with pytest.raises(ConcurrencyError) as caught:
                case.run(lambda records: records.write(written, expected))  # noqa: B023
            assert_conflict(caught.value, stream, expected, 2)
        with pytest.raises(ConcurrencyError) as caught:
            case.run(lambda records: records.write(Record("bank.Account-a-2", 4), 3))
        assert_conflict(caught.value, "bank.Account-a-2", 3, None)

        assert case.run(lambda records: records.read(stream)) == Record(stream, 2, 1, '"second"')
        assert case.run(lambda records: records.read("bank.Account-a-2")) is None

        def twice(records: Records) -> Record | None:  # a transaction sees its own writes
            records.write(Record(stream, 3, 1, '"third"'), 2)
            records.write(Record(stream, 4, 1, '"fourth"'), 3)
            return records.read(stream)

        assert case.run(twice) == Record(stream, 4, 1, '"fourth"')
        assert case.run(lambda records: records.read(stream)) == Record(stream, 4, 1, '"fourth"')

    # Events and the log ------------------------------------------------------------------

    @contract()
    def test_events_are_read_by_stream_and_in_the_log_from_position_1(self, case: Case) -> None:
        """Appended events get the log's next positions, from 1, without gaps."""
        first = [event("a", 1, '{"n":1}'), event("a", 2, '{"n":2}'), event("b", 1)]
        second = [event("a", 3, '{"n":3}')]
        case.run(lambda records: records.append(first))
        case.run(lambda records: records.append(second))
        case.run(lambda records: records.append([]))  # nothing to append: nothing happens

        log = positioned(first + second, 1)
        assert case.read_log() == log
        assert case.run(lambda records: records.read_log()) == log
        assert case.read_log(after=1, limit=2) == log[1:3]
        assert case.read_log(after=4) == []
        a_stream = [log[0], log[1], log[3]]
        assert case.run(lambda records: records.read_stream("a")) == a_stream
        assert case.run(lambda records: records.read_stream("a", after=1)) == a_stream[1:]
        assert case.run(lambda records: records.read_stream("c")) == []

    @contract()
    def test_a_rolled_back_append_gives_its_positions_back(self, case: Case) -> None:
        """Positions a rolled-back transaction took go to the next one: no gap."""
        case.run(lambda records: records.append([event("a", 1)]), commit=False)
        assert case.read_log() == []
        case.run(lambda records: records.append([event("b", 1)]))
        assert case.read_log() == positioned([event("b", 1)], 1)

    @contract()
    def test_log_positions_follow_commit_order(self, case: Case) -> None:
        """Of two transactions appending at once, the first to commit gets the first positions.

        So a reader that follows the log from its last position misses nothing: a SQL
        store makes the second wait for the first; the memory store numbers at commit.
        """
        first, second = [event("a", 1), event("a", 2)], [event("b", 1)]
        run = case.interleave(
            lambda records: records.append(first), lambda records: records.append(second)
        )
        assert (run.first, run.second) == (None, None)
        in_order = second + first if run.second_first else first + second
        assert case.read_log() == positioned(in_order, 1)

    @contract()
    def test_an_event_at_a_version_its_stream_has_is_a_conflict_where_checked(
        self, case: Case
    ) -> None:
        """`checks_stream_versions`: an event at a version its stream has is refused.

        Of two transactions appending a stream's next version at once, one commits, and
        the other fails with `ConcurrencyError` naming both versions, having written
        nothing: the log holds the winner's events alone, without a gap.
        """
        if not case.run(lambda records: records.checks_stream_versions):
            pytest.skip("the store checks an event-sourced stream's version on its record")
        case.run(lambda records: records.append([event("a", 1)]))
        with pytest.raises(ConcurrencyError) as caught:
            case.run(lambda records: records.append([event("b", 1), event("a", 1)]))
        assert_conflict(caught.value, "a", 0, 1)

        first = [event("b", 1, '"first"'), event("a", 2, '"first"')]
        second = [event("c", 1, '"second"'), event("a", 2, '"second"')]
        run = case.interleave(
            lambda records: records.append(first), lambda records: records.append(second)
        )
        assert run.first is None
        assert_conflict(run.second, "a", 1, 2)
        assert case.read_log() == positioned([event("a", 1), *first], 1)

    # Snapshots -----------------------------------------------------------------------------

    @contract()
    def test_a_snapshot_replaces_the_streams_last(self, case: Case) -> None:
        """A stream keeps its latest snapshot; a transaction reads its own."""
        older, newer = Snapshot("a", 2, 1, '{"v":2}'), Snapshot("a", 4, 2, '{"v":4}')
        assert case.run(lambda records: records.read_snapshot("a")) is None
        case.run(lambda records: records.write_snapshot(older))

        def replace(records: Records) -> Snapshot | None:
            records.write_snapshot(newer)
            return records.read_snapshot("a")

        assert case.run(replace) == newer
        assert case.run(lambda records: records.read_snapshot("a")) == newer
        assert case.run(lambda records: records.read_snapshot("b")) is None

    # Transactions --------------------------------------------------------------------------

    @contract()
    def test_a_commit_writes_all_or_nothing(self, case: Case) -> None:
        """Of two transactions writing one record at once, one commits all, the other nothing.

        A SQL store makes the second wait, then fails its write; the memory store lets
        both write, and fails the later commit.
        """
        case.run(lambda records: records.write(Record("y", 1, 1, '"start"'), 0))

        message, handled, given_up = envelope("t", 1), envelope("t", 2), envelope("t", 3)
        messaging = case.target.messaging

        def first(records: Records) -> None:
            records.write(Record("x", 1, 1, '"first"'), 0)
            records.append([event("x", 1), event("y", 2, '"first"')])
            records.write_snapshot(Snapshot("x", 1, 1, '"first"'))
            if messaging:  # a store's messaging goes with its records
                assert isinstance(records, MessagingRecords)
                records.outbox.enqueue([message])
                records.inbox.claim("billing", handled)
                records.dead_letters.add("billing", given_up, "error", 1)
            records.write(Record("y", 2, 1, '"first"'), 1)

        def second(records: Records) -> None:
            records.write(Record("y", 2, 1, '"second"'), 1)
            records.append([event("y", 2, '"second"')])

        run = case.interleave(first, second)
        [error] = [each for each in (run.first, run.second) if each is not None]
        assert_conflict(error, "y", 1, 2)
        first_won = run.second is error
        read = case.run(lambda records: (records.read("y"), records.read("x")))
        assert read[0] == Record("y", 2, 1, '"first"' if first_won else '"second"')
        assert read[1] == (Record("x", 1, 1, '"first"') if first_won else None)
        won = (
            [event("x", 1), event("y", 2, '"first"')] if first_won else [event("y", 2, '"second"')]
        )
        assert case.read_log() == positioned(won, 1)
        snapshot = case.run(lambda records: records.read_snapshot("x"))
        assert snapshot == (Snapshot("x", 1, 1, '"first"') if first_won else None)
        if messaging:

            def kept(records: MessagingRecords) -> list[object]:
                return [
                    records.outbox.pending_topics(),
                    records.inbox.has("billing", handled.id),
                    len(records.dead_letters.page()),
                ]

            assert case.run(kept) == ([["t"], True, 1] if first_won else [[], False, 0])

    @contract()
    def test_a_rollback_drops_every_write_and_the_transaction_goes_on(self, case: Case) -> None:
        """A rollback drops what the transaction wrote; it can be used again, as new."""
        begun = case.begin()
        try:

            def write(records: Records) -> None:
                records.write(Record("x", 1), 0)
                records.append([event("x", 1)])
                records.write_snapshot(Snapshot("x", 1, 1, "{}"))

            begun.run(write)
            begun.rollback()
            assert begun.run(lambda records: records.read("x")) is None
            begun.run(lambda records: records.write(Record("z", 1), 0))
            begun.commit()
        finally:
            begun.close()
        assert case.run(lambda records: (records.read("x"), records.read_snapshot("x"))) == (
            None,
            None,
        )
        assert case.run(lambda records: records.read("z")) == Record("z", 1)
        assert case.read_log() == []

    @contract()
    def test_a_closed_transaction_refuses_work(self, case: Case) -> None:
        """Closing drops what was not committed; run then raises `SessionError`."""
        begun = case.begin()
        begun.run(lambda records: records.write(Record("x", 1), 0))
        begun.close()
        with pytest.raises(SessionError):
            begun.run(lambda records: records.read("x"))
        assert case.run(lambda records: records.read("x")) is None

    # The application's own tables ---------------------------------------------------------

    @contract("keeps_table_rows")
    def test_table_rows_are_written_with_their_version_checked(self, case: Case) -> None:
        """`TableRecords`: rows of the application's table, versions checked as records'."""
        table = case.wait(case.target.table(case.store))

        def write(name: str, version: int, expected: int, id: str = "r-1") -> Any:
            return lambda records: rows(records).write_row(
                table,
                {"id": id, "name": name},
                "id",
                version_column="version",
                version=version,
                expected=expected,
            )

        def read(id: str = "r-1") -> Any:
            row = case.run(lambda records: rows(records).read_row(table, "id", id))
            return None if row is None else dict(row)

        case.run(write("ada", 1, 0))
        case.run(write("ada lovelace", 2, 1))
        assert read() == {"id": "r-1", "name": "ada lovelace", "version": 2}
        for expected in (1, 0):
            with pytest.raises(ConcurrencyError) as caught:
                case.run(write("stale", expected + 1, expected))
            assert (caught.value.expected, caught.value.actual) == (expected, 2)
            assert "version 2" in str(caught.value)
        case.run(write("bob", 1, 0, id="r-2"), commit=False)
        assert read() == {"id": "r-1", "name": "ada lovelace", "version": 2}
        assert read("r-2") is None
