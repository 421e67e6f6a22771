from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from pybondi import (
    Added,
    Aggregate,
    AsyncRequired,
    BasePublisher,
    Command,
    Committed,
    DeliveryError,
    Event,
    Message,
    Messagebus,
    MessageLimitExceeded,
    Publisher,
    Repository,
    RolledBack,
    Root,
    Session,
    SessionError,
)
from tests.conftest import Driver


@dataclass
class Deposited(Event):
    account: str
    amount: int


@dataclass
class Audited(Event):
    account: str


class Account(Aggregate):
    def __init__(self, id: str, balance: int = 0) -> None:
        self.root = Root(id)
        self.balance = balance

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.root.publish(Deposited(self.id, amount))


@dataclass
class Deposit(Command):
    account: Account
    amount: int


@dataclass
class Noop(Command):
    def execute(self) -> None:
        pass


class Accounts(Repository[Account]):
    """Stores balances in a dict and records every hook call."""

    def __init__(self, database: dict[str, int] | None = None) -> None:
        super().__init__()
        self.database = {} if database is None else database
        self.log: list[str] = []

    def begin(self) -> None:
        self.log.append("begin")

    def load(self, id: Any) -> Account | None:
        return Account(id, self.database[id]) if id in self.database else None

    def store(self, account: Account) -> None:
        self.log.append(f"store {account.id}")
        self.database[account.id] = account.balance

    def restore(self, account: Account) -> None:
        self.log.append(f"restore {account.id}")
        account.balance = self.database.get(account.id, 0)

    def close(self) -> None:
        self.log.append("close")
        super().close()


@dataclass
class World:
    """A messagebus, publisher and trace wired like a small application."""

    bus: Messagebus = field(default_factory=Messagebus)
    publisher: Publisher = field(default_factory=Publisher)
    trace: list[str] = field(default_factory=list)
    sent: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        trace, publisher = self.trace, self.publisher

        @self.bus.register(Deposit)
        def deposit(command: Deposit) -> None:
            trace.append(f"command {command.amount}")
            command.account.deposit(command.amount)

        @self.bus.on(Deposited)
        def audit(event: Deposited) -> None:
            trace.append(f"deposited {event.amount}")
            publisher.publish("deposits", Message(event.amount))

        @self.bus.on(Added, Committed, RolledBack)
        def lifecycle(event: Added[Account]) -> None:
            trace.append(f"{type(event).__name__} {event.account.id}")

        publisher.subscribe("deposits")(lambda message: self.sent.append(message.payload))

    def session(self, repository: Repository[Any] | None = None) -> Session:
        return Session(self.bus, repository or Accounts(), self.publisher)


def test_clean_exit_commits_in_order(driver: Driver) -> None:
    world, accounts, account = World(), Accounts(), Account("a")
    with driver.session(world.session(accounts)) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 5))
        assert world.sent == []  # nothing leaves before commit
    assert world.trace == ["Added a", "command 5", "deposited 5", "Committed a"]
    assert accounts.log == ["begin", "store a", "close"]
    assert accounts.database == {"a": 5}
    assert world.sent == [5]


class Journal(Repository[Account]):
    """Overrides only the hooks a session skips when a class leaves them as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def record(self, aggregate: Account, events: Any) -> None:
        self.log.append(f"record {aggregate.id} {[type(e).__name__ for e in events]}")


class JoiningPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def join(self, transaction: Any) -> None:
        self.log.append(f"join {transaction}")

    def prepare(self) -> None:
        self.log.append("prepare")


def test_hooks_a_class_overrides_are_called(driver: Driver) -> None:
    # The session skips the base class's do-nothing hooks; overriding one brings it back.
    world, journal, account = World(), Journal(), Account("a")
    publisher = JoiningPublisher()
    with driver.session(Session(world.bus, journal, publisher)) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 5))
    assert journal.log == ["record a ['Deposited']"]
    assert publisher.log == ["join None", "prepare"]


class CountingBus(Messagebus):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def handle(self, message: Command | Event) -> Any:
        self.seen.append(type(message).__name__)
        return super().handle(message)

    async def ahandle(self, message: Command | Event) -> Any:
        self.seen.append(type(message).__name__)
        return await super().ahandle(message)


def test_a_bus_that_overrides_handle_sees_every_message(driver: Driver) -> None:
    bus, account = CountingBus(), Account("a")
    bus.register(Deposit)(lambda command: command.account.deposit(command.amount))
    bus.on(Deposited)(lambda event: None)
    bus.on(Added, Committed)(lambda event: None)
    with driver.session(Session(bus, Accounts(), Publisher())) as session:
        session.add(account)
        assert driver.execute(session, Deposit(account, 5)) is None
    assert bus.seen == ["Added", "Deposit", "Deposited", "Committed"]


def test_events_are_dispatched_after_each_message_breadth_first(driver: Driver) -> None:
    world, a, b = World(), Account("a"), Account("b")

    @world.bus.on(Deposited)
    def chain(event: Deposited) -> None:
        if event.amount < 3:
            world.trace.append(f"chain {event.amount}")
            (a if event.account == "a" else b).deposit(event.amount + 1)

    with driver.session(world.session()) as session:
        session.add(a)
        session.add(b)
        driver.execute(session, Deposit(a, 1))
    assert world.trace == [
        "Added a",
        "Added b",
        "command 1",
        "deposited 1",
        "chain 1",
        "deposited 2",
        "chain 2",
        "deposited 3",
        "Committed a",
        "Committed b",
    ]


def test_events_published_in_the_block_are_dispatched_on_commit(driver: Driver) -> None:
    world, account = World(), Account("a")
    with driver.session(world.session()) as session:
        session.add(account)
        account.deposit(2)
    assert world.trace == ["Added a", "deposited 2", "Committed a"]
    assert world.sent == [2]


def test_committed_handlers_can_publish_events(driver: Driver) -> None:
    world, account = World(), Account("a")
    world.bus.on(Committed)(lambda event: event.aggregate.root.publish(Audited(event.aggregate.id)))
    world.bus.on(Audited)(lambda event: world.trace.append(f"audited {event.account}"))
    with driver.session(world.session()) as session:
        session.add(account)
    assert world.trace == ["Added a", "Committed a", "audited a"]


def test_exception_in_block_rolls_back_and_propagates(driver: Driver) -> None:
    world, account = World(), Account("a")
    accounts = Accounts({"a": 10})
    with pytest.raises(KeyError, match="boom"), driver.session(world.session(accounts)) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 5))
        account.deposit(100)  # queued: must never be dispatched
        raise KeyError("boom")
    assert world.trace == ["Added a", "command 5", "deposited 5", "RolledBack a"]
    assert accounts.log == ["begin", "restore a", "close"]
    assert account.balance == 10
    assert world.sent == []
    assert world.publisher.pending() == []


def test_failing_handler_in_execute_rolls_back_when_it_leaves_the_block(driver: Driver) -> None:
    world, account = World(), Account("a")
    world.bus.on(Deposited)(lambda event: 1 / 0)
    with pytest.raises(ZeroDivisionError), driver.session(world.session()) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 1))
    assert world.trace[-1] == "RolledBack a"
    assert world.sent == []


def test_failing_committed_handler_rolls_back_and_nothing_leaves(driver: Driver) -> None:
    world, account, accounts = World(), Account("a"), Accounts()

    @world.bus.on(Committed)
    def refuse(event: Committed[Account]) -> None:
        raise PermissionError("no")

    with pytest.raises(PermissionError), driver.session(world.session(accounts)) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 1))
    assert world.trace[-1] == "RolledBack a"
    assert accounts.log == ["begin", "restore a", "close"]
    assert world.sent == []


def test_failing_store_rolls_back_and_nothing_leaves(driver: Driver) -> None:
    world, account = World(), Account("a")

    class Broken(Accounts):
        def store(self, account: Account) -> None:
            raise OSError("disk full")

    accounts = Broken()
    with pytest.raises(OSError, match="disk full"), driver.session(world.session(accounts)) as s:
        s.add(account)
        driver.execute(s, Deposit(account, 1))
    assert world.trace[-1] == "RolledBack a"
    assert accounts.log == ["begin", "restore a", "close"]
    assert world.sent == []


def test_failing_subscriber_propagates_with_undelivered_messages(driver: Driver) -> None:
    world, account, accounts = World(), Account("a"), Accounts()

    @world.publisher.subscribe("deposits")
    def broken(message: Message[int]) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(DeliveryError) as raised, driver.session(world.session(accounts)) as s:
        s.add(account)
        driver.execute(s, Deposit(account, 1))
    error = raised.value
    assert [m.payload for _, m in error.undelivered] == [1]
    assert any("rolled the publisher back" in note for note in error.__notes__)
    assert accounts.database == {"a": 1}  # the repository had committed
    assert world.publisher.pending() == []


def test_runaway_chain_stops_with_a_clear_error(driver: Driver) -> None:
    world, account = World(), Account("a")
    world.bus.on(Deposited)(lambda event: account.deposit(1))
    session = Session(world.bus, Accounts(), world.publisher, max_messages=50)
    with (
        pytest.raises(MessageLimitExceeded, match="50 messages") as raised,
        driver.session(session),
    ):
        session.add(account)
        driver.execute(session, Deposit(account, 1))
    assert "max_messages" in str(raised.value)
    assert world.trace[-1] == "RolledBack a"


def test_explicit_commit_and_rollback_inside_a_session(driver: Driver) -> None:
    world, account, accounts = World(), Account("a"), Accounts()
    with driver.session(world.session(accounts)) as session:
        session.add(account)
        driver.execute(session, Deposit(account, 1))
        driver.commit(session)
        assert world.sent == [1]
        driver.execute(session, Deposit(account, 2))
        driver.rollback(session)
        assert account.balance == 1
    assert world.sent == [1]
    assert accounts.database == {"a": 1}


def test_dispatch_takes_events_and_execute_only_commands(driver: Driver) -> None:
    world = World()
    with driver.session(world.session()) as session:
        driver.dispatch(session, Deposited("x", 3))
        with pytest.raises(TypeError, match="Use session.dispatch\\(\\) for events"):
            driver.execute(session, Deposited("x", 3))  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got int"):
            driver.dispatch(session, 3)  # type: ignore[arg-type]
    assert world.trace == ["deposited 3"]
    assert world.sent == [3]


def test_commands_without_handlers_execute_in_a_session(driver: Driver) -> None:
    with driver.session(Session()) as session:
        driver.execute(session, Noop())


def test_adding_twice_sends_added_once(driver: Driver) -> None:
    world, account = World(), Account("a")
    with driver.session(world.session()) as session:
        session.add(account)
        session.add(account)
    assert world.trace == ["Added a", "Committed a"]


def test_readme_argument_order_and_keywords() -> None:
    bus, repository, publisher = Messagebus(), Repository[Any](), Publisher()
    session = Session(bus, repository, publisher)
    assert (session.messagebus, session.repository, session.publisher) == (
        bus,
        repository,
        publisher,
    )
    session = Session(publisher=publisher)
    assert session.publisher is publisher
    assert isinstance(session.repository, Repository)


@pytest.mark.parametrize(
    ("arguments", "slot"),
    [
        ((Repository(),), "messagebus"),
        ((None, Messagebus()), "repository"),
        ((None, None, Messagebus()), "publisher"),
    ],
)
def test_wrong_kind_of_argument_names_the_slot(arguments: tuple[Any, ...], slot: str) -> None:
    with pytest.raises(TypeError, match=f"argument '{slot}' expects"):
        Session(*arguments)


def test_closed_session_cannot_be_reused_and_sessions_do_not_nest() -> None:
    session = Session()
    with session, pytest.raises(SessionError, match="already begun"):
        session.begin()
    with pytest.raises(SessionError, match="closed"):
        session.add(Account("a"))
    with pytest.raises(SessionError, match="closed"), session:
        pass


def test_repository_serves_one_open_session() -> None:
    accounts = Accounts()
    with Session(repository=accounts), pytest.raises(SessionError, match="another open session"):
        Session(repository=accounts).begin()
    with Session(repository=accounts):  # free again once the first one closed
        pass


def test_rollback_failure_is_noted_on_the_original_error(driver: Driver) -> None:
    world, account = World(), Account("a")
    world.bus.on(RolledBack)(lambda event: 1 / 0)
    with pytest.raises(KeyError) as raised, driver.session(world.session()) as session:
        session.add(account)
        raise KeyError("original")
    assert any("ZeroDivisionError" in note for note in raised.value.__notes__)


def test_sessions_on_two_threads_share_nothing() -> None:
    world, barrier, errors = World(), threading.Barrier(2), []

    def work(name: str, fail: bool) -> None:
        account = Account(name)
        try:
            with world.session() as session:
                session.add(account)
                session.execute(Deposit(account, len(name)))
                barrier.wait()
                if fail:
                    raise RuntimeError(name)
        except RuntimeError:
            pass
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=args) for args in (("ok", False), ("bad!", True))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert world.sent == [2]


# Async only ------------------------------------------------------------------------------


def test_async_session_with_async_handlers_and_hooks() -> None:
    bus, publisher, seen = Messagebus(), Publisher(), []

    class AsyncAccounts(Repository[Account]):
        async def store(self, account: Account) -> None:
            await asyncio.sleep(0)
            seen.append(f"store {account.balance}")

    @bus.register(Deposit)
    async def deposit(command: Deposit) -> None:
        await asyncio.sleep(0)
        command.account.deposit(command.amount)

    @bus.on(Deposited)
    async def publish(event: Deposited) -> None:
        publisher.publish("out", Message(event.amount))

    @publisher.subscribe("out")
    async def sink(message: Message[int]) -> None:
        seen.append(f"sent {message.payload}")

    async def main() -> None:
        account = Account("a")
        async with Session(bus, AsyncAccounts(), publisher) as session:
            session.add(account)
            await session.aexecute(Deposit(account, 4))

    asyncio.run(main())
    assert seen == ["store 4", "sent 4"]


def test_sync_session_refuses_async_handler_and_rolls_back() -> None:
    world, account = World(), Account("a")

    @world.bus.on(Deposited)
    async def remote(event: Deposited) -> None: ...

    with pytest.raises(AsyncRequired, match="remote is async"), world.session() as session:
        session.add(account)
        session.execute(Deposit(account, 1))
    assert world.trace[-1] == "RolledBack a"


def test_sync_session_refuses_async_repository_hook() -> None:
    class AsyncBegin(Repository[Any]):
        async def begin(self) -> None:
            pass

    with pytest.raises(AsyncRequired, match="begin"), Session(repository=AsyncBegin()):
        pass


def test_aggregates_reaching_the_repository_otherwise_get_added_first(driver: Driver) -> None:
    world = World()
    accounts = Accounts({"old": 7})

    @world.bus.register
    def open_and_fund(command: Opening) -> None:
        account = Account(command.id)
        account.deposit(1)
        accounts.add(account)

    with driver.session(world.session(accounts)) as session:
        driver.execute(session, Opening("new"))
        accounts.get("old").deposit(2)
    assert world.trace == [
        "Added new", "deposited 1", "Added old", "deposited 2", "Committed new", "Committed old",
    ]  # fmt: skip


@dataclass
class Opening(Command):
    id: str


def test_lifecycle_events_reach_catch_all_handlers(driver: Driver) -> None:
    bus, seen = Messagebus(), []
    bus.on(Event)(lambda event: seen.append(type(event).__name__))
    with driver.session(Session(bus)) as session:
        session.add(Account("a"))
    assert seen == ["Added", "Committed"]
    bus.on(Deposited)(lambda event: None)  # registering clears what the bus knew
    assert bus.listens(Added) and bus.listens(Deposited)
    assert not Messagebus().listens(Added)


def test_begin_returns_the_session() -> None:
    session = Session()
    assert session.begin() is session
    session.close()


# Sessions sharing one publisher on one thread must nest ---------------------------------


def test_outer_session_refuses_work_while_an_inner_one_is_open(driver: Driver) -> None:
    world, outer_account, inner_account = World(), Account("outer"), Account("inner")
    with pytest.raises(RuntimeError), driver.session(world.session()) as outer:
        outer.add(outer_account)
        driver.execute(outer, Deposit(outer_account, 1))
        with driver.session(world.session()) as inner:
            inner.add(inner_account)
            with pytest.raises(SessionError, match="Close the inner session"):
                driver.execute(outer, Deposit(outer_account, 2))
            driver.execute(inner, Deposit(inner_account, 3))
        raise RuntimeError("the outer unit of work fails")
    assert world.sent == [3]  # only the inner session's message left


def test_interleaved_sessions_cannot_deliver_each_others_messages() -> None:
    world = World()
    first, second = world.session().begin(), world.session().begin()
    with pytest.raises(SessionError, match="Close the inner session"):
        first.commit()
    second.dispatch(Deposited("second", 2))
    second.rollback()
    second.close()
    first.dispatch(Deposited("first", 1))
    first.commit()
    first.close()
    assert world.sent == [1]


def test_handler_dispatching_through_the_session_is_queued_and_bounded() -> None:
    world, account = World(), Account("a")
    session = Session(world.bus, Accounts(), world.publisher, max_messages=20)

    @world.bus.on(Deposited)
    def again(event: Deposited) -> None:
        session.dispatch(Deposited(event.account, event.amount + 1))

    with pytest.raises(MessageLimitExceeded), session:
        session.add(account)
        session.execute(Deposit(account, 1))
    assert "deposited 2" in world.trace  # queued and handled by the drain under way


# Rollback is best effort, aggregate by aggregate -----------------------------------------


def test_one_failing_rolled_back_handler_does_not_stop_the_others(driver: Driver) -> None:
    world, a, b = World(), Account("a"), Account("b")

    @world.bus.on(RolledBack)
    def fragile(event: RolledBack[Account]) -> None:
        if event.account.id == "a":
            raise ConnectionError("cache down")

    with pytest.raises(KeyError) as raised, driver.session(world.session()) as session:
        session.add(a)
        session.add(b)
        raise KeyError("original")
    assert world.trace[-2:] == ["RolledBack a", "RolledBack b"]
    assert any("cache down" in note for note in raised.value.__notes__)


def test_explicit_rollback_raises_the_first_failure_and_notes_the_rest() -> None:
    world, account = World(), Account("a")
    world.bus.on(RolledBack)(lambda event: 1 / 0)

    class Broken(Accounts):
        def restore(self, account: Account) -> None:
            raise OSError("disk gone")

    with Session(world.bus, Broken(), world.publisher) as session:
        session.add(account)
        with pytest.raises(ZeroDivisionError) as raised:
            session.rollback()
    assert any("disk gone" in note for note in raised.value.__notes__)


# Async hooks are awaited, never dropped ---------------------------------------------------


def test_async_repository_close_is_awaited() -> None:
    closed = []

    class AsyncClose(Repository[Account]):
        async def close(self) -> None:
            super().close()
            closed.append(True)

    async def main() -> None:
        async with Session(repository=AsyncClose()) as session:
            session.add(Account("a"))

    asyncio.run(main())
    assert closed == [True]
    with pytest.raises(AsyncRequired, match="close"), Session(repository=AsyncClose()):
        pass


class AsyncBroker(BasePublisher):
    """A publisher adapter written with `async def` hooks, as a broker client would be."""

    def __init__(self) -> None:
        self.buffer: list[Message[Any]] = []
        self.sent: list[object] = []

    def publish(self, topic: str, message: Message[Any]) -> None:
        self.buffer.append(message)

    async def commit(self) -> None:
        self.sent.extend(message.payload for message in self.buffer)
        self.buffer.clear()

    def rollback(self) -> None:
        self.buffer.clear()


def test_async_publisher_hooks_are_awaited_or_refused() -> None:
    bus, broker = Messagebus(), AsyncBroker()
    bus.on(Deposited)(lambda event: broker.publish("out", Message(event.amount)))

    async def main() -> None:
        async with Session(bus, publisher=broker) as session:
            await session.adispatch(Deposited("a", 7))

    asyncio.run(main())
    assert broker.sent == [7]
    with pytest.raises(AsyncRequired, match="commit"), Session(bus, publisher=broker) as session:
        session.dispatch(Deposited("a", 8))
    assert broker.sent == [7]
    assert broker.buffer == []  # the session rolled the publisher back
