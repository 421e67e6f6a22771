"""pybondi.testing.Scenario: given/when/then through the real messagebus and session.

A small bank, stored by state and by events, with sync and async handlers; every `then`
passing and failing, and the failure messages read as a user would read them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from pybondi import (
    Added,
    Aggregate,
    AsyncRequired,
    BasePublisher,
    Command,
    Committed,
    Depends,
    Event,
    Message,
    Messagebus,
    Publisher,
    Repository,
    Root,
    Session,
)
from pybondi.messaging.consumer import current_session
from pybondi.persistence import MemoryStore
from pybondi.persistence.repositories import EventSourcedRepository, StateRepository
from pybondi.persistence.serialization import Registry
from pybondi.testing import Scenario

# The domain -----------------------------------------------------------------------------


@dataclass
class Open(Command):
    account: str


@dataclass
class Deposit(Command):
    account: str
    amount: int


@dataclass
class Withdraw(Command):
    account: str
    amount: int


@dataclass
class Opened(Event):
    account: str


@dataclass
class Deposited(Event):
    account: str
    amount: int


@dataclass
class Withdrawn(Event):
    account: str
    amount: int


@dataclass
class Flagged(Event):
    account: str
    reason: str


class InsufficientFunds(Exception):
    pass


class Account(Aggregate):
    def __init__(self, id: str, balance: int = 0, flagged: bool = False) -> None:
        self.root = Root(id)
        self.balance = balance
        self.flagged = flagged

    @classmethod
    def open(cls, id: str) -> Account:
        account = cls(id)
        account._publish(Opened(id))
        return account

    def deposit(self, amount: int) -> None:
        self._publish(Deposited(self.id, amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise InsufficientFunds(f"{self.id} has {self.balance}, cannot withdraw {amount}")
        self._publish(Withdrawn(self.id, amount))

    def flag(self, reason: str) -> None:
        self._publish(Flagged(self.id, reason))

    def _publish(self, event: Event) -> None:
        self.apply(event)
        self.root.publish(event)

    def apply(self, event: Event) -> None:
        if isinstance(event, Deposited):
            self.balance += event.amount
        elif isinstance(event, Withdrawn):
            self.balance -= event.amount
        elif isinstance(event, Flagged):
            self.flagged = True


registry = Registry()
registry.register(Account, name="bank.Account")
for event_type in (Opened, Deposited, Withdrawn, Flagged):
    registry.register(event_type, name=f"bank.{event_type.__name__}")


def get_accounts() -> Repository[Account]:
    raise NotImplementedError("provided by the application")


def get_publisher() -> BasePublisher:
    raise NotImplementedError("provided by the application")


def open_account(command: Open, accounts: Repository[Account] = Depends(get_accounts)) -> None:
    accounts.add(Account.open(command.account))


def deposit(command: Deposit, accounts: Repository[Account] = Depends(get_accounts)) -> None:
    accounts.get(command.account).deposit(command.amount)


def withdraw(command: Withdraw, accounts: Repository[Account] = Depends(get_accounts)) -> None:
    accounts.get(command.account).withdraw(command.amount)


def flag_large(event: Deposited, accounts: Repository[Account] = Depends(get_accounts)) -> None:
    if event.amount >= 1000:
        accounts.get(event.account).flag("large deposit")


def announce(event: Withdrawn, publisher: BasePublisher = Depends(get_publisher)) -> None:
    publisher.publish("withdrawals", Message({"account": event.account, "amount": event.amount}))


def lifecycle(event: Added[Account] | Committed[Account]) -> None:
    """Listening makes the session dispatch these; the scenario leaves them out."""


def make_bus(asynchronous: bool) -> Messagebus:
    bus = Messagebus()
    wrap = _async if asynchronous else _same
    bus.register(Open)(wrap(open_account))
    bus.register(Deposit)(wrap(deposit))
    bus.register(Withdraw)(wrap(withdraw))
    bus.on(Deposited)(wrap(flag_large))
    bus.on(Withdrawn)(wrap(announce))
    bus.on(Added, Committed)(lifecycle)
    return bus


def _same(handler: Callable[..., Any]) -> Callable[..., Any]:
    return handler


def _async(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)  # the same signature, so the same Depends
    async def run(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return handler(*args, **kwargs)

    return run


# Fixtures: each behaviour on both repositories and three paths ---------------------------


@pytest.fixture(params=["state", "event-sourced"])
def accounts(request: pytest.FixtureRequest) -> Repository[Account]:
    if request.param == "state":
        return StateRepository(MemoryStore(), Account, registry)
    return EventSourcedRepository(MemoryStore(), Account, registry)


@pytest.fixture(params=["sync", "awhen", "async handlers"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bank(
    accounts: Repository[Account], asynchronous: bool = False, **options: Any
) -> Scenario[Account]:
    """A scenario whose handlers get `accounts` and the scenario's publisher."""
    publisher = options.pop("publisher", None) or Publisher()
    return Scenario(
        make_bus(asynchronous),
        accounts,
        publisher=publisher,
        dependencies={get_accounts: lambda: accounts, get_publisher: lambda: publisher},
        **options,
    )


@pytest.fixture
def scenario(path: str, accounts: Repository[Account]) -> Scenario[Account]:
    return bank(accounts, asynchronous=path == "async handlers")


When = Callable[[Scenario[Account], Command | Event], Scenario[Account]]


@pytest.fixture
def when(path: str) -> When:
    """`scenario.when(message)`, or `await scenario.awhen(message)` on the async paths."""

    def run(scenario: Scenario[Account], message: Command | Event) -> Scenario[Account]:
        if path == "sync":
            return scenario.when(message)
        return asyncio.run(scenario.awhen(message))

    return run


def failure(check: Callable[[], object]) -> str:
    with pytest.raises(AssertionError) as raised:
        check()
    return str(raised.value)


# Given ----------------------------------------------------------------------------------


def test_given_events_are_the_history_the_handlers_load(
    scenario: Scenario[Account], when: When
) -> None:
    scenario.given_events("alice", Opened("alice"), Deposited("alice", 10))
    when(scenario, Withdraw("alice", 3)).then(Withdrawn("alice", 3))
    scenario.then_state("alice", balance=7)


def test_given_aggregates_built_through_their_methods_bring_their_events(
    scenario: Scenario[Account], when: When
) -> None:
    alice = Account.open("alice")
    alice.deposit(10)
    when(scenario.given(alice), Withdraw("alice", 10)).then(Withdrawn("alice", 10))
    scenario.then_state("alice", balance=0)


def test_given_state_is_stored_as_it_is(path: str, when: When) -> None:
    scenario = bank(StateRepository(MemoryStore(), Account, registry), path == "async handlers")
    scenario.given(Account("alice", balance=10, flagged=True))
    when(scenario, Withdraw("alice", 4)).then(Withdrawn("alice", 4))
    scenario.then_state("alice", balance=6, flagged=True)


def test_given_events_are_not_dispatched(scenario: Scenario[Account], when: When) -> None:
    # Deposited(1000) would flag the account, were it dispatched: it is history.
    scenario.given_events("alice", Opened("alice"), Deposited("alice", 1000))
    when(scenario, Deposit("alice", 1)).then(Deposited("alice", 1))
    scenario.then_state("alice", balance=1001, flagged=False)


def test_a_scenario_goes_on_over_several_whens(scenario: Scenario[Account], when: When) -> None:
    when(scenario, Open("alice")).then(Opened("alice"))
    when(scenario, Deposit("alice", 10)).then(Deposited("alice", 10))
    scenario.given_events("alice", Deposited("alice", 5))  # appended to what is stored
    when(scenario, Withdraw("alice", 12)).then(Withdrawn("alice", 12))
    scenario.then_state("alice", balance=3)


def test_an_event_sourced_repository_refuses_state_without_events() -> None:
    scenario = Scenario(Messagebus(), EventSourcedRepository(MemoryStore(), Account, registry))
    with pytest.raises(ValueError, match=r"stores only events.*given_events\('alice', \.\.\.\)"):
        scenario.given(Account("alice", balance=10))


def test_bad_givens_say_what_to_do_instead() -> None:
    scenario = Scenario(Messagebus(), StateRepository(MemoryStore(), Account, registry))
    with pytest.raises(TypeError, match=r"given\(\) takes aggregates.*given_events\(id"):
        scenario.given(Deposited("alice", 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs at least one event"):
        scenario.given_events("alice")
    with pytest.raises(TypeError, match=r"given_events\(\) takes an id and then events"):
        scenario.given_events("alice", Deposit("alice", 1))  # type: ignore[arg-type]


def test_a_bare_repository_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="keeps aggregates only in its identity map"):
        Scenario(Messagebus(), Repository[Account]())


class Balances(Repository[Account]):
    """A repository of the user's own, as in the README: balances in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.database: dict[str, int] = {}

    def load(self, id: Any) -> Account | None:
        return Account(id, self.database[id]) if id in self.database else None

    def store(self, account: Account) -> None:
        self.database[account.id] = account.balance


def test_a_repository_of_your_own_works_and_given_events_need_create(when: When) -> None:
    balances = Balances()
    scenario = bank(balances)
    with pytest.raises(TypeError, match=r"does not say how to build one.*create=Account"):
        when(scenario.given_events("alice", Deposited("alice", 10)), Deposit("alice", 1))

    scenario = bank(balances, create=Account)
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 4))
    scenario.then(Withdrawn("alice", 4)).then_state("alice", balance=6)
    assert balances.database == {"alice": 6}


# When -----------------------------------------------------------------------------------


def test_when_an_event_records_what_it_causes_but_not_itself(
    scenario: Scenario[Account], when: When
) -> None:
    scenario.given_events("alice", Opened("alice"))
    when(scenario, Deposited("alice", 1000)).then(Flagged("alice", "large deposit"))
    scenario.then_state("alice", flagged=True)


def test_events_of_handlers_follow_their_causes_in_order(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario, Open("alice"))
    when(scenario, Deposit("alice", 1000))
    scenario.then(Deposited("alice", 1000), Flagged("alice", "large deposit"))
    assert scenario.events == [Deposited("alice", 1000), Flagged("alice", "large deposit")]


def test_async_handlers_need_awhen_and_are_told_so() -> None:
    scenario = bank(StateRepository(MemoryStore(), Account, registry), asynchronous=True)
    with pytest.raises(AsyncRequired) as raised:
        scenario.when(Open("alice"))
    assert "await scenario.awhen(...)" in "\n".join(raised.value.__notes__)


def test_dependencies_apply_during_when_only() -> None:
    bus, accounts = make_bus(False), StateRepository(MemoryStore(), Account, registry)
    before = lambda: None  # noqa: E731
    bus.dependency_overrides[get_publisher] = before
    publisher = Publisher()
    scenario = Scenario(
        bus,
        accounts,
        publisher=publisher,
        dependencies={get_accounts: lambda: accounts, get_publisher: lambda: publisher},
    )
    scenario.given_events("alice", Deposited("alice", 5))
    scenario.when(Withdraw("alice", 5)).then_published(
        ("withdrawals", {"account": "alice", "amount": 5})
    )
    assert dict(bus.dependency_overrides) == {get_publisher: before}


def test_then_before_when_is_a_usage_error() -> None:
    scenario = Scenario(Messagebus(), StateRepository(MemoryStore(), Account, registry))
    with pytest.raises(RuntimeError, match=r"then\(\) checks what when\(\) did"):
        scenario.then()


# Then: events ---------------------------------------------------------------------------


def test_then_fails_with_a_diff_that_points_at_the_field(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 3))
    message = failure(lambda: scenario.then(Withdrawn("alice", 4)))
    assert message == (
        "Expected 1 event; 1 was published, and they differ (- expected, + published):\n"
        "- Withdrawn(account='alice', amount=4)\n"
        "+ Withdrawn(account='alice', amount=3)\n"
        "    amount: expected 4, published 3"
    )


def test_then_lines_up_missing_and_extra_events(scenario: Scenario[Account], when: When) -> None:
    when(scenario.given_events("alice", Opened("alice")), Deposit("alice", 1000))
    expected = (Deposited("alice", 1000), Withdrawn("alice", 1), Flagged("alice", "large"))
    assert failure(lambda: scenario.then(*expected)) == (
        "Expected 3 events; 2 were published, and they differ (- expected, + published):\n"
        "  Deposited(account='alice', amount=1000)\n"
        "- Withdrawn(account='alice', amount=1)\n"
        "- Flagged(account='alice', reason='large')\n"
        "+ Flagged(account='alice', reason='large deposit')\n"
        "    reason: expected 'large', published 'large deposit'"
    )


def test_then_nothing_and_then_something_say_what_happened(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Opened("alice")), Deposit("alice", 2))
    assert failure(scenario.then) == (
        "Expected no event, but 1 was published:\n+ Deposited(account='alice', amount=2)"
    )


def test_then_says_the_command_raised_instead(scenario: Scenario[Account], when: When) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 20))
    with pytest.raises(AssertionError) as raised:
        scenario.then(Withdrawn("alice", 20))
    assert str(raised.value) == (
        "Expected 1 event, but Withdraw(account='alice', amount=20) raised "
        "InsufficientFunds('alice has 10, cannot withdraw 20')."
    )
    assert isinstance(raised.value.__cause__, InsufficientFunds)  # its traceback shows


def test_then_with_no_event_passes_when_none_was_published(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Opened("alice")), Deposit("alice", 0)).then(
        Deposited("alice", 0)
    )
    scenario.given(Account.open("bob"))
    when(scenario, Deposited("bob", 5)).then()  # an event nobody turns into another


# Then: errors ---------------------------------------------------------------------------


def test_then_raises_passes_and_leaves_the_state_as_it_was(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 20))
    scenario.then_raises(InsufficientFunds)
    scenario.then_raises(InsufficientFunds, match=r"has 10, cannot withdraw 20$")
    scenario.then_raises(Exception)
    scenario.then_state("alice", balance=10)
    assert scenario.published == []


def test_the_state_after_an_unexpected_error_asks_for_then_raises(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 20))
    assert failure(lambda: scenario.state("alice")) == (
        "Withdraw(account='alice', amount=20) raised InsufficientFunds('alice has 10, cannot "
        "withdraw 20'). If it should, say so with then_raises(InsufficientFunds) before "
        "looking at the state."
    )


def test_then_raises_fails_when_the_command_succeeded(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 3))
    assert failure(lambda: scenario.then_raises(InsufficientFunds)) == (
        "Expected Withdraw(account='alice', amount=3) to raise InsufficientFunds, but it "
        "succeeded and published 1 event:\n  Withdrawn(account='alice', amount=3)"
    )


def test_then_raises_fails_on_another_error_or_another_message(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 20))
    assert failure(lambda: scenario.then_raises(KeyError)) == (
        "Expected Withdraw(account='alice', amount=20) to raise KeyError, but it raised "
        "InsufficientFunds('alice has 10, cannot withdraw 20')."
    )
    assert failure(lambda: scenario.then_raises(InsufficientFunds, match="has 5")) == (
        "Withdraw(account='alice', amount=20) raised InsufficientFunds as expected, but its "
        "message 'alice has 10, cannot withdraw 20' does not match 'has 5'."
    )


# Then: published messages ---------------------------------------------------------------


def test_then_published_compares_topics_and_payloads(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 3))
    scenario.then_published(("withdrawals", {"account": "alice", "amount": 3}))
    assert [message.payload for _, message in scenario.published] == [
        {"account": "alice", "amount": 3}
    ]
    assert failure(
        lambda: scenario.then_published(("withdrawals", {"account": "alice", "amount": 30}))
    ) == (
        "Expected 1 message; 1 was delivered, and they differ (- expected, + delivered):\n"
        "- ('withdrawals', {'account': 'alice', 'amount': 30})\n"
        "+ ('withdrawals', {'account': 'alice', 'amount': 3})\n"
        "    payload['amount']: expected 30, delivered 3"
    )


def test_then_published_fails_when_nothing_left(scenario: Scenario[Account], when: When) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 20))
    message = failure(lambda: scenario.then_published(("withdrawals", {})))
    assert message.startswith("Expected 1 message, but Withdraw(account='alice', amount=20) ")
    assert message.endswith("a session that fails delivers nothing.")

    when(scenario, Deposit("alice", 1)).then_published()
    assert failure(lambda: scenario.then_published(("withdrawals", {}))) == (
        "Expected 1 message, but no message was delivered:\n- ('withdrawals', {})"
    )


def test_then_published_refuses_pairs_it_cannot_read(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Opened("alice")), Deposit("alice", 1))
    with pytest.raises(TypeError, match=r"takes \(topic, payload\) pairs"):
        scenario.then_published({"account": "alice"})  # type: ignore[arg-type]


class Silent(BasePublisher):
    """A publisher of the user's own that shows nothing of what it buffers."""

    def publish(self, topic: str, message: Message[Any]) -> None:
        pass

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def test_then_published_says_when_it_cannot_see_the_publisher() -> None:
    scenario = bank(StateRepository(MemoryStore(), Account, registry), publisher=Silent())
    scenario.when(Open("alice")).then(Opened("alice"))
    with pytest.raises(TypeError, match="Silent is not one"):
        scenario.then_published()


# Then: state ----------------------------------------------------------------------------


def test_then_state_names_each_attribute_that_differs(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario.given_events("alice", Deposited("alice", 10)), Withdraw("alice", 3))
    assert failure(lambda: scenario.then_state("alice", balance=8, flagged=False, owner="A")) == (
        "Account 'alice', as stored after Withdraw(account='alice', amount=3), is not as "
        "expected:\n"
        "  balance: expected 8, stored 7\n"
        "  owner: expected 'A', but there is no owner"
    )


def test_state_is_loaded_again_not_the_object_the_handlers_changed(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario, Open("alice"))  # created by the handler, found at commit
    loaded = scenario.state("alice")
    assert isinstance(loaded, Account) and loaded.balance == 0
    when(scenario, Deposit("alice", 5))
    assert scenario.state("alice") is not loaded
    assert scenario.state("alice").balance == 5


def test_state_of_an_unknown_id_says_which_it_knows(
    scenario: Scenario[Account], when: When
) -> None:
    when(scenario, Open("alice"))
    assert failure(lambda: scenario.state("bob")) == (
        "The scenario did not load 'bob': it loads the aggregates it was given and those its "
        "session held when it committed, which are ['alice']."
    )


# Events that cannot be compared -----------------------------------------------------------


class Closed(Event):
    """A plain class: equal only to itself, whatever its fields."""

    def __init__(self, account: str) -> None:
        self.account = account


def test_events_without_equality_are_pointed_out() -> None:
    accounts = Balances()
    bus = Messagebus()

    @bus.register
    def close(command: Withdraw) -> None:
        accounts.get(command.account).root.publish(Closed(command.account))

    scenario = Scenario(bus, accounts).given(Account("alice"))
    assert failure(lambda: scenario.when(Withdraw("alice", 0)).then(Closed("alice"))) == (
        "Expected 1 event; 1 was published, and they differ (- expected, + published):\n"
        "- Closed(account='alice')\n"
        "+ Closed(account='alice')\n"
        "    (alike, but not ==: make Closed compare by value, as a @dataclass does)"
    )


# Handlers that take the session ----------------------------------------------------------


def test_handlers_that_take_the_current_session_get_the_scenarios() -> None:
    bus = Messagebus()

    @bus.register
    def pay_out(command: Withdraw, session: Session = Depends(current_session)) -> None:
        session.repository.get(command.account).withdraw(command.amount)
        session.publisher.publish("payouts", Message(command.amount))

    scenario = Scenario(bus, StateRepository(MemoryStore(), Account, registry))
    scenario.dependencies[current_session] = lambda: scenario.session
    scenario.given_events("alice", Deposited("alice", 10))
    scenario.when(Withdraw("alice", 4)).then(Withdrawn("alice", 4))
    scenario.then_published(("payouts", 4)).then_state("alice", balance=6)
