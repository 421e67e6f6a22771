"""The outbox: messages written in the unit of work's transaction, on real SQL databases.

Every test runs on SQLite, PostgreSQL and MariaDB, sync and async, and reads what the
outbox wrote through a second store on the same tables (another connection pool), never
through the outbox itself. How a store numbers a topic's messages, and its leases, are
the store contract's (tests/test_store_contract.py).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from pybondi import Aggregate, Command, Event, Message, Messagebus, Repository, Root, Session
from pybondi.events import Committed
from pybondi.exceptions import ConcurrencyError, SerializationError, SessionError
from pybondi.messaging.envelope import JSON_TYPE, Envelope
from pybondi.messaging.outbox import Outbox
from pybondi.persistence import SQLStore
from pybondi.persistence.repositories import StateRepository
from pybondi.persistence.serialization import Registry
from pybondi.tracing import handling
from tests.backends import AggregatesOnly, Backend
from tests.conftest import AsyncDriver, Driver, SyncDriver
from tests.outboxes import OutboxRow, outbox_rows, seqs

# The domain -----------------------------------------------------------------------------


@dataclass
class Deposited(Event):
    account: str
    amount: int


@dataclass(eq=False)
class Account(Aggregate):
    root: Root
    owner: str
    balance: int = 0

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.root.publish(Deposited(self.root.id, amount))


@dataclass(frozen=True)
class Receipt:
    account: str
    amount: int


@dataclass(frozen=True)
class Memo:
    text: str


@dataclass
class Send(Command):
    """Publish a message to the outbox, from a handler (where an async session's task is)."""

    topic: str
    message: Message[Any]


@dataclass
class Receive(Command):
    """A message from elsewhere, handed to the bus by a subscriber."""

    message: Message[Any]


def send(outbox: Outbox) -> Callable[[Send], None]:
    def handle(command: Send) -> None:
        outbox.publish(command.topic, command.message)

    return handle


def registry() -> Registry:
    made = Registry()
    made.register(Account, name="bank.Account")
    made.register(Deposited, name="bank.Deposited")
    made.register(Receipt, name="bank.Receipt", version=2)
    return made


class Bank:
    """A bus whose `Deposited` handler publishes to the outbox what `publishes` says."""

    def __init__(self, store: SQLStore, outbox: Outbox | None = None) -> None:
        self.store = store
        self.registry = registry()
        self.outbox = outbox or Outbox(store, self.registry)
        self.bus = Messagebus()
        self.publishes: Callable[[Deposited], list[tuple[str, object]]] = lambda event: [
            (f"deposits.{event.account}", {"account": event.account, "amount": event.amount})
        ]
        self.published: list[Message[Any]] = []
        self.bus.register(Send)(send(self.outbox))

        @self.bus.on(Deposited)
        def notify(event: Deposited) -> None:
            for topic, payload in self.publishes(event):
                message = Message(payload)
                self.outbox.publish(topic, message)
                self.published.append(message)

    def repository(self) -> StateRepository[Account]:
        return StateRepository(self.store, Account, self.registry)

    def session(self, repository: StateRepository[Account] | None = None) -> Session:
        return Session(self.bus, repository or self.repository(), self.outbox)


# The tables ------------------------------------------------------------------------------


@dataclass
class Tables:
    """The store under test (sync or async, as the driver) and a sync second connection."""

    store: SQLStore
    reader: SQLStore
    prefix: str

    def rows(self) -> list[OutboxRow]:
        return outbox_rows(self.reader)

    def aggregates(self) -> list[str]:
        table = self.reader.statements.aggregates
        assert isinstance(self.reader.engine, sa.Engine)
        with self.reader.engine.connect() as connection:
            return list(connection.execute(sa.select(table.c.stream)).scalars())


@pytest.fixture
def tables(sql_backend: Backend, driver: Driver) -> Iterator[Tables]:
    prefix = f"o{uuid.uuid4().hex[:8]}_"
    store = sql_backend.store(asynchronous=driver.name == "async", prefix=prefix)
    reader = sql_backend.store(prefix=prefix)
    assert isinstance(store, SQLStore) and isinstance(reader, SQLStore)
    driver.io(store, "create_tables")
    yield Tables(store, reader, prefix)
    driver.io(store, "dispose")
    reader.drop_tables()
    reader.dispose()


def sync_engine(store: SQLStore) -> sa.Engine:
    engine = store.engine
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def amounts(rows: list[OutboxRow], topic: str) -> list[int]:
    return [Envelope(r.topic, r.message_id, r.headers, r.body.encode()).open().payload["amount"]
            for r in rows if r.topic == topic]  # fmt: skip


# One transaction --------------------------------------------------------------------------


def test_outbox_rows_commit_in_the_transaction_of_the_aggregates(
    driver: Driver, tables: Tables
) -> None:
    bank, outbox_table = Bank(tables.store), tables.store.statements.outbox.outbox
    at_commit: list[tuple[int, int, list[str]]] = []

    def peek(connection: sa.Connection) -> None:
        # Just before COMMIT: the session's own connection sees its rows, nobody else does.
        own = connection.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar()
        at_commit.append((int(own or 0), len(tables.rows()), tables.aggregates()))

    sa.event.listen(sync_engine(tables.store), "commit", peek)
    with driver.session(bank.session()) as unit:
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(10)
        account.deposit(5)

    # One commit, of both the aggregate and the messages. (On MariaDB, a new topic's head
    # and cursor rows are added first, at 0, on a connection outside the engine's pool.)
    assert at_commit == [(2, 0, [])]
    rows = tables.rows()
    assert tables.aggregates() == ["bank.Account-a-1"]
    assert [(r.topic, r.seq, r.message_id, r.sent_at) for r in rows] == [
        ("deposits.a-1", 1, str(bank.published[0].id), None),
        ("deposits.a-1", 2, str(bank.published[1].id), None),
    ]
    assert amounts(rows, "deposits.a-1") == [10, 5]


def test_a_version_conflict_leaves_no_outbox_row(driver: Driver, tables: Tables) -> None:
    bank = Bank(tables.store)
    with driver.session(bank.session()) as unit:
        unit.add(Account(Root("a-1"), "ada"))

    slow, fast = bank.repository(), bank.repository()
    with pytest.raises(ConcurrencyError), driver.session(bank.session(slow)):
        late = driver.io(slow, "get", "a-1")
        late.deposit(100)  # published at commit: after the other writer's commit
        with driver.session(bank.session(fast)):
            driver.io(fast, "get", "a-1").deposit(1)

    rows = tables.rows()
    assert amounts(rows, "deposits.a-1") == [1]
    assert seqs(rows, "deposits.a-1") == [1]
    # The failed session's message had reached the outbox's transaction, and went with it.
    assert [m.payload["amount"] for m in bank.published] == [1, 100]
    assert str(bank.published[1].id) not in {r.message_id for r in rows}


def test_a_session_that_raises_leaves_no_outbox_row(driver: Driver, tables: Tables) -> None:
    bank = Bank(tables.store)
    with (
        pytest.raises(RuntimeError, match="changed my mind"),
        driver.session(bank.session()) as unit,
    ):
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(10)
        driver.dispatch(unit, Deposited("a-2", 20))  # handled now, both: published
        raise RuntimeError("changed my mind")

    assert sorted(m.payload["amount"] for m in bank.published) == [10, 20]
    assert tables.rows() == []
    assert tables.aggregates() == []


@pytest.mark.parametrize("driver", [SyncDriver], ids=["sync"], indirect=True)
def test_concurrent_sessions_number_a_new_topic_without_gaps(
    driver: Driver, tables: Tables
) -> None:
    # Four threads, ten sessions each, on topics nobody wrote to before: the first
    # sessions race to create each topic's head, and every number is given once.
    bank, errors = Bank(tables.store), []

    def writer(worker: int) -> None:
        try:
            for n in range(10):
                with bank.session() as unit:
                    account = Account(Root(f"w{worker}-{n}"), "ada")
                    unit.add(account)
                    account.deposit(n)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    bank.publishes = lambda event: [("shared.one", event.amount), ("shared.two", event.amount)]
    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    rows = tables.rows()
    assert seqs(rows, "shared.one") == list(range(1, 41))
    assert seqs(rows, "shared.two") == list(range(1, 41))


# Where the outbox writes ------------------------------------------------------------------


def test_an_outbox_on_another_store_than_the_repository_is_refused(
    sql_backend: Backend, driver: Driver, tables: Tables
) -> None:
    bank = Bank(tables.store)
    # Another database's tables, and even another store object on the same tables: the
    # messages would commit in another transaction than the aggregates.
    for other in (
        sql_backend.store(asynchronous=tables.store.is_async),
        sql_backend.store(asynchronous=tables.store.is_async, prefix=tables.prefix),
    ):
        outbox = Outbox(other, bank.registry)  # type: ignore[arg-type]
        try:
            with (
                pytest.raises(SessionError, match="the same store") as refused,
                driver.session(Session(bank.bus, bank.repository(), outbox)),
            ):
                pass
        finally:
            driver.io(other, "dispose")
        assert repr(tables.store) in str(refused.value) and repr(other) in str(refused.value)

    # Nothing was left open: the same repository and outbox work in the next session.
    repository = bank.repository()
    with driver.session(bank.session(repository)) as unit:
        account = Account(Root("a-1"), "ada")
        unit.add(account)
        account.deposit(1)
    assert [r.seq for r in tables.rows()] == [1]


def test_with_the_in_memory_repository_the_outbox_commits_on_its_own(
    driver: Driver, tables: Tables
) -> None:
    outbox, bus, seen, commits = Outbox(tables.store), Messagebus(), [], []
    bus.register(Send)(send(outbox))
    # Committed is dispatched before anything commits: the outbox has written nothing yet.
    bus.on(Committed)(lambda event: seen.append(len(tables.rows())))
    sa.event.listen(sync_engine(tables.store), "commit", lambda connection: commits.append(1))

    with driver.session(Session(bus, Repository(), outbox)) as unit:
        unit.add(Account(Root("a-1"), "ada"))
        driver.execute(unit, Send("news", Message({"n": 1})))
        driver.execute(unit, Send("news", Message({"n": 2})))
    assert (seen, len(commits)) == ([0], 1)  # one transaction, the outbox's own
    assert [(r.topic, r.seq, json_body(r)) for r in tables.rows()] == [
        ("news", 1, {"n": 1}),
        ("news", 2, {"n": 2}),
    ]

    with pytest.raises(RuntimeError), driver.session(Session(bus, Repository(), outbox)) as unit:
        driver.execute(unit, Send("news", Message({"n": 3})))
        raise RuntimeError("rolled back")
    assert len(commits) == 1 and len(tables.rows()) == 2

    # Without a session, the outbox commits what was published when told to.
    alone(driver, outbox, "news", Message({"n": 4}))
    assert [json_body(r) for r in tables.rows()] == [{"n": 1}, {"n": 2}, {"n": 4}]


@pytest.mark.parametrize(
    "sql_backend", [pytest.param("sqlite", marks=pytest.mark.sqlite)], indirect=True
)  # no SQL of its own: which transaction the outbox joins is decided in pybondi
def test_a_session_on_the_in_memory_repository_inside_another_commits_on_its_own(
    driver: Driver, tables: Tables
) -> None:
    # A handler of a unit of work on the store runs a unit of work of its own, on the
    # in-memory repository: its messages commit when it commits, whatever the outer one does.
    bank, inner_bus = Bank(tables.store), Messagebus()
    outbox = Outbox(tables.store)
    inner_bus.register(Send)(send(outbox))

    if isinstance(driver, AsyncDriver):

        @bank.bus.on(Deposited)
        async def anotify_separately(event: Deposited) -> None:
            async with Session(inner_bus, Repository(), outbox) as inner:
                await inner.aexecute(Send("news", Message({"amount": event.amount})))

    else:

        @bank.bus.on(Deposited)
        def notify_separately(event: Deposited) -> None:
            with Session(inner_bus, Repository(), outbox) as inner:
                inner.execute(Send("news", Message({"amount": event.amount})))

    with pytest.raises(RuntimeError), driver.session(bank.session()) as unit:
        unit.add(Account(Root("a-1"), "ada"))
        driver.dispatch(unit, Deposited("a-1", 5))  # the inner unit of work commits here
        raise RuntimeError("the outer unit of work fails")

    assert [json_body(r) for r in tables.rows() if r.topic == "news"] == [{"amount": 5}]


def alone(driver: Driver, outbox: Outbox, topic: str, message: Message[Any]) -> None:
    """Begin, publish, commit and close, without a session, in one thread or task."""

    async def asynchronously() -> None:
        outbox.begin()
        outbox.publish(topic, message)
        await outbox.acommit()
        outbox.close()

    if isinstance(driver, AsyncDriver):
        driver.runner.run(asynchronously())
    else:
        outbox.begin()
        outbox.publish(topic, message)
        outbox.commit()
        outbox.close()


def json_body(row: OutboxRow) -> Any:
    return Envelope(row.topic, row.message_id, row.headers, row.body.encode()).open().payload


# What is written --------------------------------------------------------------------------


def test_a_payload_that_cannot_leave_the_process_fails_where_it_is_published(
    driver: Driver, tables: Tables
) -> None:
    bank, reached = Bank(tables.store), []

    @bank.bus.on(Deposited)
    def after(event: Deposited) -> None:
        reached.append(event)

    cases: list[tuple[object, str]] = [
        (Memo("not registered"), "Memo is not registered"),
        ({"when": object()}, "not plain JSON"),
        ({"ratio": float("nan")}, "not plain JSON"),
    ]
    for payload, problem in cases:
        bank.publishes = partial(publishing, "deposits", payload)
        with (
            pytest.raises(SerializationError, match=problem),
            driver.session(bank.session()) as unit,
        ):
            account = Account(Root("a-1"), "ada")
            unit.add(account)
            account.deposit(1)
        assert reached == []  # the handler after the failing one never ran
    assert tables.rows() == [] and tables.aggregates() == []
    assert bank.published == []


def publishing(topic: str, payload: object, event: Deposited) -> list[tuple[str, object]]:
    return [(topic, payload)]


def test_registered_payloads_are_stored_by_name_and_plain_ones_as_json(
    driver: Driver, tables: Tables
) -> None:
    bank = Bank(tables.store)
    receipt = Message(
        Receipt("a-1", 10), sender="tellers", headers={"tenant": "acme", "city": "Zürich"}
    )
    plain: list[Message[Any]] = [
        Message({"amount": 10, "note": "café"}),
        Message([1, "two"]),
        Message("three"),
    ]
    with driver.session(bank.session()) as unit:
        for message in (receipt, *plain):
            driver.execute(unit, Send("receipts", message))

    rows = tables.rows()
    assert [r.message_id for r in rows] == [str(m.id) for m in (receipt, *plain)]
    first = rows[0]
    assert first.headers == {
        "message-id": str(receipt.id),
        "message-type": "bank.Receipt",
        "message-version": "2",
        "timestamp": receipt.timestamp.isoformat(),
        "sender": "tellers",
        "correlation-id": str(receipt.id),
        "tenant": "acme",
        "city": "Zürich",
    }
    assert first.body == '{"account":"a-1","amount":10}'
    for row, message in zip(rows[1:], plain, strict=True):
        assert (row.headers["message-type"], row.headers["message-version"]) == (JSON_TYPE, "1")
        assert "sender" not in row.headers
        assert json_body(row) == message.payload
    assert rows[1].body == '{"amount":10,"note":"café"}'

    opened = Envelope(first.topic, first.message_id, first.headers, first.body.encode()).open(
        bank.registry
    )
    assert (opened.payload, opened.id, opened.sender, opened.timestamp) == (
        receipt.payload,
        receipt.id,
        "tellers",
        receipt.timestamp,
    )
    assert opened.headers == {"tenant": "acme", "city": "Zürich", "correlation-id": str(receipt.id)}


def test_messages_published_while_handling_another_carry_its_chain(
    driver: Driver, tables: Tables
) -> None:
    bank = Bank(tables.store)
    replies: list[Message[Any]] = []

    @bank.bus.register(Receive)
    def receive(command: Receive) -> None:
        # What a subscriber's worker does around the handling of an incoming message.
        with handling(command.message):
            replies.append(Message({"re": command.message.payload}))
            bank.outbox.publish("replies", replies[-1])

    chained = Message("first", headers={"correlation-id": "request-42"})
    fresh = Message("second")
    with driver.session(bank.session()) as unit:
        driver.execute(unit, Receive(chained))
        driver.execute(unit, Receive(fresh))
        driver.execute(unit, Send("replies", Message("unprompted")))

    first, second, third = tables.rows()
    assert (first.headers["correlation-id"], first.headers["causation-id"]) == (
        "request-42",
        str(chained.id),
    )
    assert (second.headers["correlation-id"], second.headers["causation-id"]) == (
        str(fresh.id),
        str(fresh.id),
    )
    # Outside any handling, a message starts a chain of its own.
    assert third.headers["correlation-id"] == third.message_id
    assert "causation-id" not in third.headers
    assert [first.message_id, second.message_id] == [str(m.id) for m in replies]


def test_an_outbox_needs_a_store_that_keeps_one() -> None:
    store = AggregatesOnly()
    with pytest.raises(TypeError, match="a store that keeps an outbox") as refused:
        Outbox(store)  # type: ignore[arg-type]
    assert repr(store) in str(refused.value) and "SQLStore" in str(refused.value)
