"""The inbox and dead letters: what is particular to the SQL stores, and the Python API.

What every store keeps of the inbox and dead letters is the store contract's
(tests/test_store_contract.py). Here: the SQL tables, statements through SQLAlchemy's
execution, and a second transaction that waits on the first's locks (a thread, on real
SQLite, PostgreSQL and MariaDB); and `DeadLetters`, on sync and async stores, read back
through a second store on the same tables (another connection pool).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from pybondi.messaging.deadletters import DeadLetters
from pybondi.messaging.envelope import Envelope
from pybondi.persistence import SQLStore
from pybondi.persistence.records import MessagingRecords, bounded_id
from tests.backends import AggregatesOnly, Backend
from tests.conftest import AsyncDriver, Driver
from tests.outboxes import outbox_rows

T = TypeVar("T")
GROUP = "billing"
WAITING = 0.3  # seconds a transaction that must wait is given to show that it does


def envelope(topic: str = "bank.deposits", body: bytes = b"{}") -> Envelope:
    return Envelope(topic, str(uuid.uuid4()), {"message-type": "json", "x-n": "1"}, body)


def handled(store: SQLStore, message_id: str, group: str = GROUP) -> bool:
    return store.transact(lambda records: records.inbox.has(group, message_id))


def dead_letter(store: SQLStore, message: Envelope) -> int:
    id = store.transact(lambda records: records.dead_letters.add(GROUP, message, "no", 5))
    assert id is not None, "not dead-lettered"
    return id


def unreadable(message: Envelope) -> Callable[[MessagingRecords], int | None]:
    """Dead-letter a message that could not be read: without claiming its inbox row."""
    return lambda records: records.dead_letters.add(GROUP, message, "Unreadable", 1, claim=False)


def stored_dead_letters(store: SQLStore) -> list[int]:
    """The ids in the dead_letters table, read around pybondi."""
    table = store.statements.dead_letters.dead_letters
    assert isinstance(store.engine, sa.Engine)
    with store.engine.connect() as connection:
        return list(connection.execute(sa.select(table.c.id).order_by(table.c.id)).scalars())


def while_open(store: SQLStore, work: Callable[[MessagingRecords], T]) -> T:
    """Run `work` in a transaction, then again in another while the first is open.

    The second waits for the first (on the rows' locks, or SQLite's one writer) until
    it commits; returns what the second then gave.
    """
    first = store.begin()
    got: list[T | BaseException] = []

    def second() -> None:
        try:
            got.append(store.transact(work))
        except BaseException as error:
            got.append(error)

    try:
        assert first.run(work)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(WAITING)
        assert thread.is_alive() and got == []  # waiting for the first transaction
        first.commit()
    finally:
        first.close()
    thread.join(30)
    [outcome] = got
    assert not isinstance(outcome, BaseException), outcome
    return outcome


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


# The SQL stores ---------------------------------------------------------------------------


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


def test_dead_letters_written_through_sqlalchemys_execution(store: SQLStore) -> None:
    """With a listener on the engine, statements go through SQLAlchemy: ids still come back."""
    assert isinstance(store.engine, sa.Engine)
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    messages = [envelope(), envelope()]
    ids = [dead_letter(store, message) for message in messages]
    assert ids[1] > ids[0] and stored_dead_letters(store) == ids
    assert store.transact(lambda records: records.inbox.claim(GROUP, messages[0])) is False
    assert any("dead_letters" in statement for statement in statements)


def test_a_concurrent_dead_letter_of_the_same_unreadable_message_waits_and_writes_none(
    store: SQLStore,
) -> None:
    bad = envelope(body=b"{not json")
    assert while_open(store, unreadable(bad)) is None
    assert len(stored_dead_letters(store)) == 1 and not handled(store, bad.id)


def test_a_concurrent_replay_of_the_same_dead_letter_replays_it_once(store: SQLStore) -> None:
    id = dead_letter(store, envelope())
    assert while_open(store, lambda records: records.dead_letters.replay([id])) == []
    assert len(outbox_rows(store)) == 1


def test_long_ids_that_start_alike_stay_apart_when_shortened() -> None:
    first, second = "x" * 300 + "1", "x" * 300 + "2"
    assert bounded_id(first) != bounded_id(second)
    assert len(bounded_id(first)) <= 255 and bounded_id(first).startswith("x" * 200)
    assert bounded_id("order-42") == "order-42"


# The Python API --------------------------------------------------------------------------


def test_dead_letters_api(driver: Driver, tables: Tables) -> None:
    dead = DeadLetters(tables.store)
    messages = [envelope(topic="t1"), envelope(topic="t2"), envelope(topic="t1")]

    def dead_letter_of(message: Envelope) -> Callable[[MessagingRecords], int | None]:
        return lambda records: records.dead_letters.add(GROUP, message, "e", 2)

    made = [wait(driver, tables.store.atransact(dead_letter_of(each))) for each in messages]
    ids = [id for id in made if id is not None]
    assert ids == made and ids == sorted(ids) and len(set(ids)) == 3
    assert stored_dead_letters(tables.reader) == ids

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
