"""The inbox and dead letters, on real SQLite, PostgreSQL and MariaDB.

Records are used as a worker would: in a transaction of its own, committed or rolled
back. What they wrote is read back through a second store on the same tables (another
connection pool), with plain SQLAlchemy where the records' own reads would prove nothing.
The Python API, `DeadLetters`, runs on sync and async stores.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import pytest
import sqlalchemy as sa

from pybondi.messaging.deadletters import DeadLetter, DeadLetters
from pybondi.messaging.envelope import Envelope
from pybondi.persistence import SQLStore
from pybondi.persistence.records import bounded_id, id_problem
from pybondi.persistence.sql.records import SQLRecords
from tests.backends import AggregatesOnly, Backend
from tests.conftest import AsyncDriver, Driver
from tests.outboxes import outbox_rows

T = TypeVar("T")
GROUP = "billing"
WAITING = 0.3  # seconds a transaction that must wait is given to show that it does


def envelope(id: str | None = None, topic: str = "bank.deposits", body: bytes = b"{}") -> Envelope:
    return Envelope(topic, id or str(uuid.uuid4()), {"message-type": "json", "x-n": "1"}, body)


def transact(store: SQLStore, work: Callable[[SQLRecords], T], *, commit: bool = True) -> T:
    """Run `work` in a transaction of its own, then commit or roll back."""
    transaction = store.begin()
    try:
        result = transaction.run(cast(Callable[[Any], T], work))
        if commit:
            transaction.commit()
        else:
            transaction.rollback()
        return result
    finally:
        transaction.close()


def handled(store: SQLStore, message_id: str, group: str = GROUP) -> bool:
    return transact(store, lambda records: records.inbox.has(group, message_id))


def dead_letter(store: SQLStore, message: Envelope, group: str = GROUP, error: str = "no") -> int:
    id = give_up(store, message, group, error)
    assert id is not None, "not dead-lettered"
    return id


def give_up(
    store: SQLStore, message: Envelope, group: str = GROUP, error: str = "no"
) -> int | None:
    """The dead letter's id, or None if the group's inbox had the message already."""
    return transact(store, lambda records: records.dead_letters.add(group, message, error, 5))


def stored_dead_letters(store: SQLStore) -> list[dict[str, Any]]:
    """The dead_letters table as stored, read around pybondi."""
    table = store.statements.dead_letters.dead_letters
    assert isinstance(store.engine, sa.Engine)
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(table).order_by(table.c.id)).mappings()
        return [dict(row) for row in rows]


@pytest.fixture
def store(sql_backend: Backend) -> Iterator[SQLStore]:
    """A sync store with fresh tables."""
    made = sql_backend.store(prefix=f"i{uuid.uuid4().hex[:8]}_")
    assert isinstance(made, SQLStore)
    made.create_tables()
    yield made
    made.drop_tables()
    made.dispose()


@dataclass
class Tables:
    """The store under test (sync or async, as the driver) and a sync one on its tables."""

    store: SQLStore
    reader: SQLStore


@pytest.fixture
def tables(sql_backend: Backend, driver: Driver) -> Iterator[Tables]:
    prefix = f"i{uuid.uuid4().hex[:8]}_"
    store = sql_backend.store(asynchronous=driver.name == "async", prefix=prefix)
    reader = sql_backend.store(prefix=prefix)
    assert isinstance(store, SQLStore) and isinstance(reader, SQLStore)
    driver.io(store, "create_tables")
    yield Tables(store, reader)
    driver.io(store, "dispose")
    reader.drop_tables()
    reader.dispose()


def wait(driver: Driver, coroutine: Coroutine[Any, Any, T]) -> T:
    """Await on the driver's loop (an async store's connections belong to it)."""
    if isinstance(driver, AsyncDriver):
        return driver.runner.run(coroutine)
    return asyncio.run(coroutine)


def run_on(driver: Driver, store: SQLStore, work: Callable[[SQLRecords], T]) -> T:
    """`transact` on the store under test: awaited, on the driver's loop, if it is async."""
    if not store.is_async:
        return transact(store, work)
    return wait(driver, store.atransact(cast(Callable[[Any], T], work)))


# The tables ------------------------------------------------------------------------------


def test_create_tables_creates_the_inbox_and_dead_letters(sql_backend: Backend) -> None:
    made = sql_backend.store(prefix=f"c{uuid.uuid4().hex[:8]}_")
    assert isinstance(made, SQLStore)
    try:
        missing = made.missing_tables()
        assert {f"{made.prefix}inbox", f"{made.prefix}dead_letters"} <= set(missing)
        made.create_tables()
        assert made.missing_tables() == []
        assert isinstance(made.engine, sa.Engine)
        inspector = sa.inspect(made.engine)
        indexes = inspector.get_indexes(f"{made.prefix}inbox", schema=made.metadata.schema)
        assert [index["column_names"] for index in indexes] == [["handled_at"]]
        dead = f"{made.prefix}dead_letters"
        indexes = inspector.get_indexes(dead, schema=made.metadata.schema)
        assert sorted(index["column_names"] for index in indexes) == [
            ["consumer_group", "message_id"],
            ["consumer_group", "topic"],
        ]
    finally:
        made.drop_tables()
        made.dispose()


# The inbox -------------------------------------------------------------------------------


def test_record_handled_is_true_once_per_group_and_message(driver: Driver, tables: Tables) -> None:
    message = envelope()

    def twice(records: SQLRecords) -> list[bool]:
        return [records.inbox.claim(GROUP, message), records.inbox.claim(GROUP, message)]

    def run(work: Callable[[SQLRecords], T]) -> T:
        return run_on(driver, tables.store, work)

    assert run(twice) == [True, False]  # the duplicate in the same transaction too
    assert run(lambda records: records.inbox.claim(GROUP, message)) is False
    assert run(lambda records: records.inbox.has(GROUP, message.id)) is True
    assert run(lambda records: records.inbox.claim("audit", message)) is True
    assert run(lambda records: records.inbox.has("other", message.id)) is False
    assert handled(tables.reader, message.id) and handled(tables.reader, message.id, "audit")


def test_a_rolled_back_record_is_gone(store: SQLStore) -> None:
    message = envelope()

    def record(records: SQLRecords) -> tuple[bool, bool]:
        return records.inbox.claim(GROUP, message), records.inbox.has(GROUP, message.id)

    assert transact(store, record, commit=False) == (True, True)
    assert not handled(store, message.id)
    assert transact(store, record) == (True, True)  # handled again, for good this time
    assert handled(store, message.id)


@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_a_concurrent_record_of_the_same_message_waits_for_the_first(
    store: SQLStore, first_ends: str
) -> None:
    """PostgreSQL and MariaDB wait on the row's key; SQLite on its one writer."""
    message = envelope()
    first = store.begin()
    got: list[bool | BaseException] = []

    def second() -> None:
        try:
            got.append(transact(store, lambda records: records.inbox.claim(GROUP, message)))
        except BaseException as error:
            got.append(error)

    try:
        assert first.run(lambda records: records.inbox.claim(GROUP, message))
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(WAITING)
        assert thread.is_alive() and got == []  # waiting for the first transaction
        first.commit() if first_ends == "commit" else first.rollback()
    finally:
        first.close()
    thread.join(30)
    assert got == [first_ends == "rollback"]
    assert handled(store, message.id)


def test_purge_inbox_deletes_the_rows_handled_before(store: SQLStore) -> None:
    old, new = envelope(), envelope()
    transact(store, lambda records: records.inbox.claim(GROUP, old))
    transact(store, lambda records: records.inbox.claim(GROUP, new))
    inbox = store.statements.inbox.inbox
    assert isinstance(store.engine, sa.Engine)
    with store.engine.begin() as connection:
        two_days_ago = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=2)
        connection.execute(
            inbox.update().where(inbox.c.message_id == old.id).values(handled_at=two_days_ago)
        )
    day_ago = datetime.now(UTC) - timedelta(days=1)
    assert transact(store, lambda records: records.inbox.purge(day_ago)) == 1
    assert not handled(store, old.id) and handled(store, new.id)
    assert transact(store, lambda records: records.inbox.purge(day_ago)) == 0


# Dead letters ----------------------------------------------------------------------------


def test_a_dead_letter_keeps_everything_and_records_the_message(store: SQLStore) -> None:
    message = Envelope(
        "bank.deposits", str(uuid.uuid4()), {"message-type": "json", "x-é": "ü"}, b'{"a":1}\xff\x00'
    )
    before = datetime.now(UTC)
    id = dead_letter(store, message, error="ValueError: bad\nTraceback...")
    after = datetime.now(UTC)

    [row] = stored_dead_letters(store)
    assert row["id"] == id
    assert json.loads(row["headers"]) == message.headers
    assert row["body"] == '{"a":1}\ufffd\ufffd'  # not UTF-8, and a NUL: replaced
    letter = transact(store, lambda records: records.dead_letters.get(id))
    assert letter == DeadLetter(
        id=id,
        group=GROUP,
        topic="bank.deposits",
        message_id=message.id,
        headers=message.headers,
        body='{"a":1}\ufffd\ufffd',
        error="ValueError: bad\nTraceback...",
        attempts=5,
        failed_at=letter.failed_at if letter else before,
        holds_inbox=True,
    )
    assert letter is not None and letter.failed_at.tzinfo is UTC
    assert before - timedelta(seconds=1) <= letter.failed_at <= after + timedelta(seconds=1)
    # The message is in the group's inbox: a redelivery is skipped.
    assert handled(store, message.id)
    assert transact(store, lambda records: records.inbox.claim(GROUP, message)) is False
    assert transact(store, lambda records: records.dead_letters.get(id + 1)) is None


def test_dead_letters_written_through_sqlalchemys_execution(store: SQLStore) -> None:
    """With a listener on the engine, statements go through SQLAlchemy: ids still come back."""
    assert isinstance(store.engine, sa.Engine)
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    messages = [envelope(), envelope()]
    ids = [dead_letter(store, message) for message in messages]
    assert ids[1] > ids[0] and [row["id"] for row in stored_dead_letters(store)] == ids
    assert transact(store, lambda records: records.inbox.claim(GROUP, messages[0])) is False
    assert any("dead_letters" in statement for statement in statements)


def test_a_message_already_in_the_inbox_is_not_dead_lettered(store: SQLStore) -> None:
    handled_elsewhere, given_up_on = envelope(), envelope()
    transact(store, lambda records: records.inbox.claim(GROUP, handled_elsewhere))
    assert give_up(store, handled_elsewhere) is None  # another worker committed it
    first = dead_letter(store, given_up_on)
    assert give_up(store, given_up_on) is None  # delivered twice, dead-lettered once
    assert [row["id"] for row in stored_dead_letters(store)] == [first]


def unread(store: SQLStore, message: Envelope, group: str = GROUP) -> int | None:
    """Dead-letter a message that could not be read: without claiming its inbox row."""
    return transact(
        store,
        lambda records: records.dead_letters.add(group, message, "Unreadable", 1, claim=False),
    )


def test_an_unreadable_message_is_dead_lettered_without_its_inbox_row(store: SQLStore) -> None:
    bad = envelope(body=b"{not json")
    first = unread(store, bad)
    assert first is not None and not handled(store, bad.id)
    letter = transact(store, lambda records: records.dead_letters.get(first))
    assert letter is not None and not letter.holds_inbox
    assert unread(store, bad) is None  # the same bad message again: no second letter
    # The same id with another body is another message; the group handles it (and
    # then a copy of it is a duplicate, not a dead letter).
    other = unread(store, envelope(bad.id, body=b"{NOT JSON"))  # compared case by case
    assert other is not None and other > first
    assert transact(store, lambda records: records.inbox.claim(GROUP, bad)) is True
    assert unread(store, envelope(bad.id, body=b"[")) is None
    assert [row["id"] for row in stored_dead_letters(store)] == [first, other]
    assert unread(store, bad, group="audit") is not None  # each group its own


def test_a_concurrent_dead_letter_of_the_same_unreadable_message_waits_and_writes_none(
    store: SQLStore,
) -> None:
    bad = envelope(body=b"{not json")
    first = store.begin()
    got: list[int | BaseException | None] = []

    def second() -> None:
        try:
            got.append(unread(store, bad))
        except BaseException as error:
            got.append(error)

    try:
        assert first.run(
            lambda records: records.dead_letters.add(GROUP, bad, "Unreadable", 1, claim=False)
        )
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(WAITING)
        assert thread.is_alive() and got == []  # waiting for the first transaction
        first.commit()
    finally:
        first.close()
    thread.join(30)
    assert got == [None]
    assert len(stored_dead_letters(store)) == 1 and not handled(store, bad.id)


@pytest.mark.parametrize(
    ("unfit", "problem"),
    [
        ("x" * 256, "has 256 characters, and the inbox keeps at most 255"),
        ("a\x00b", "NUL"),
        ("a\udc80b", "not UTF-8"),
    ],
)
def test_an_id_the_inbox_cannot_keep_is_dead_lettered_shortened(
    store: SQLStore, unfit: str, problem: str
) -> None:
    assert problem in (id_problem(unfit) or "")
    message = Envelope("bank.deposits", unfit, {"message-type": "json"}, b"{}")
    with pytest.raises(ValueError, match=problem):
        transact(store, lambda records: records.inbox.claim(GROUP, message))
    id = unread(store, message)
    assert id is not None and unread(store, message) is None
    letter = transact(store, lambda records: records.dead_letters.get(id))
    assert letter is not None
    assert letter.message_id == bounded_id(unfit) != unfit
    assert id_problem(letter.message_id) is None
    assert letter.headers == {"message-type": "json", "message-id": unfit}


def test_long_ids_that_start_alike_stay_apart_when_shortened() -> None:
    first, second = "x" * 300 + "1", "x" * 300 + "2"
    assert bounded_id(first) != bounded_id(second)
    assert len(bounded_id(first)) <= 255 and bounded_id(first).startswith("x" * 200)
    assert bounded_id("order-42") == "order-42"


def test_a_rolled_back_dead_letter_is_gone(store: SQLStore) -> None:
    message = envelope()
    transact(store, lambda records: records.dead_letters.add(GROUP, message, "no", 1), commit=False)
    assert stored_dead_letters(store) == [] and not handled(store, message.id)


def test_dead_letters_filter_and_page(store: SQLStore) -> None:
    made = [
        dead_letter(store, envelope(topic=topic), group=group)
        for group, topic in [("a", "t1"), ("b", "t1"), ("a", "t2"), ("a", "t1"), ("b", "t2")]
    ]

    def listed(**filters: Any) -> list[int]:
        return [
            letter.id
            for letter in transact(store, lambda records: records.dead_letters.page(**filters))
        ]

    assert listed() == made == sorted(made)
    assert listed(group="a") == [made[0], made[2], made[3]]
    assert listed(topic="t1") == [made[0], made[1], made[3]]
    assert listed(group="a", topic="t1") == [made[0], made[3]]
    assert listed(group="c") == []
    assert listed(limit=2) == made[:2]
    assert listed(after=made[1], limit=2) == made[2:4]
    assert listed(after=made[3]) == made[4:]
    assert listed(group="b", after=made[1]) == [made[4]]


def test_replay_moves_dead_letters_to_the_outbox(store: SQLStore) -> None:
    kept, replayed = envelope(topic="bank.other"), envelope(body='{"é":1}'.encode())
    kept_id, replayed_id = dead_letter(store, kept), dead_letter(store, replayed)
    before = datetime.now(UTC)

    result = transact(
        store, lambda records: records.dead_letters.replay([replayed_id, replayed_id, 999_999])
    )

    assert [letter.id for letter in result] == [replayed_id]
    assert result[0].message_id == replayed.id
    [row] = outbox_rows(store)
    assert (row.topic, row.seq, row.message_id, row.body) == (
        "bank.deposits",
        1,
        replayed.id,
        '{"é":1}',
    )
    replayed_at = datetime.fromisoformat(row.headers.pop("replayed-at"))
    assert row.headers.pop("replayed-for") == GROUP  # for information
    assert row.headers == replayed.headers
    assert replayed_at.tzinfo is not None and replayed_at >= before
    assert not handled(store, replayed.id)  # the worker handles it again
    assert [row["id"] for row in stored_dead_letters(store)] == [kept_id]
    assert handled(store, kept.id)
    # Replayed already: nothing left to replay.
    assert transact(store, lambda records: records.dead_letters.replay([replayed_id])) == []
    assert len(outbox_rows(store)) == 1


def test_replaying_an_unreadable_message_leaves_the_inbox_row_of_its_corrected_twin(
    store: SQLStore,
) -> None:
    bad = envelope(body=b"{not json")
    letter = unread(store, bad)
    assert letter is not None
    corrected = envelope(bad.id, body=b"{}")  # resent, fixed, and handled since
    assert transact(store, lambda records: records.inbox.claim(GROUP, corrected)) is True

    [replayed] = transact(store, lambda records: records.dead_letters.replay([letter]))

    assert not replayed.holds_inbox
    assert handled(store, bad.id)  # the corrected message stays handled: no second effect


def test_a_rolled_back_replay_changes_nothing(store: SQLStore) -> None:
    message = envelope()
    id = dead_letter(store, message)
    assert (
        len(transact(store, lambda records: records.dead_letters.replay([id]), commit=False)) == 1
    )
    assert outbox_rows(store) == []
    assert handled(store, message.id)
    assert [row["id"] for row in stored_dead_letters(store)] == [id]


def test_a_concurrent_replay_of_the_same_dead_letter_replays_it_once(store: SQLStore) -> None:
    id = dead_letter(store, envelope())
    first = store.begin()
    got: list[list[DeadLetter] | BaseException] = []

    def second() -> None:
        try:
            got.append(transact(store, lambda records: records.dead_letters.replay([id])))
        except BaseException as error:
            got.append(error)

    try:
        assert len(first.run(lambda records: records.dead_letters.replay([id]))) == 1
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(WAITING)
        assert thread.is_alive() and got == []
        first.commit()
    finally:
        first.close()
    thread.join(30)
    assert got == [[]]
    assert len(outbox_rows(store)) == 1


def test_discard_deletes_dead_letters_and_keeps_the_inbox_rows(store: SQLStore) -> None:
    messages = [envelope(), envelope(), envelope()]
    ids = [dead_letter(store, message) for message in messages]
    assert (
        transact(store, lambda records: records.dead_letters.discard([ids[0], ids[2], ids[2], -1]))
        == 2
    )
    assert [row["id"] for row in stored_dead_letters(store)] == [ids[1]]
    assert all(handled(store, message.id) for message in messages)
    assert transact(store, lambda records: records.dead_letters.discard([ids[0]])) == 0
    assert outbox_rows(store) == []


# The Python API --------------------------------------------------------------------------


def test_dead_letters_api(driver: Driver, tables: Tables) -> None:
    dead = DeadLetters(tables.store)
    messages = [envelope(topic="t1"), envelope(topic="t2"), envelope(topic="t1")]

    def dead_letter_of(message: Envelope) -> Callable[[SQLRecords], int | None]:
        return lambda records: records.dead_letters.add(GROUP, message, "e", 2)

    made = [run_on(driver, tables.store, dead_letter_of(message)) for message in messages]
    ids = [id for id in made if id is not None]
    assert ids == made and ids == sorted(ids) and len(set(ids)) == 3
    assert [row["id"] for row in stored_dead_letters(tables.reader)] == ids

    assert [letter.id for letter in wait(driver, dead.list())] == ids
    assert [letter.id for letter in wait(driver, dead.list(topic="t1", limit=1))] == ids[:1]
    assert [letter.id for letter in wait(driver, dead.list(GROUP, after=ids[0]))] == ids[1:]
    assert wait(driver, dead.list(group="other")) == []
    letter = wait(driver, dead.get(ids[1]))
    assert letter is not None and letter.message_id == messages[1].id
    assert wait(driver, dead.get(-1)) is None

    replayed = wait(driver, dead.replay([ids[1], -1]))
    assert [letter.id for letter in replayed.replayed] == [ids[1]]
    assert (replayed.missing, replayed.failed) == ([-1], {})
    assert [row.message_id for row in outbox_rows(tables.reader)] == [messages[1].id]
    assert not handled(tables.reader, messages[1].id)
    assert wait(driver, dead.discard((ids[0], ids[1]))) == 1
    assert [letter.id for letter in wait(driver, dead.list())] == [ids[2]]
    assert handled(tables.reader, messages[0].id)


def test_dead_letters_need_a_store_that_keeps_them() -> None:
    with pytest.raises(TypeError, match="SQLStore or a MemoryStore"):
        DeadLetters(AggregatesOnly())  # type: ignore[arg-type]
