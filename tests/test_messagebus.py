from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import pytest

from pybondi import (
    AsyncRequired,
    Command,
    DuplicateHandler,
    Event,
    HandlerNotFound,
    InvalidHandler,
    Messagebus,
)
from pybondi.events import Added, RolledBack
from tests.conftest import Driver
from tests.test_aggregate import BankAccount, User


@dataclass
class Deposit(Command):
    amount: int


@dataclass
class Deposited(Event):
    amount: int


@dataclass
class BigDeposited(Deposited):
    pass


@dataclass
class Withdrawn(Event):
    amount: int


class SelfExecuting(Command):
    def __init__(self) -> None:
        self.ran = False

    def execute(self) -> str:
        self.ran = True
        return "executed"


class Bare(Command):
    pass


def test_event_handlers_run_in_registration_order(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(Deposited)
    def first(event: Deposited) -> None:
        seen.append(("first", event.amount))

    @bus.on(Deposited, Withdrawn)
    def second(event: Deposited | Withdrawn) -> None:
        seen.append(("second", event.amount))

    driver.handle(bus, Deposited(1))
    driver.handle(bus, Withdrawn(2))
    assert seen == [("first", 1), ("second", 1), ("second", 2)]


def test_decorators_return_the_function_unchanged() -> None:
    bus = Messagebus()

    def handler(event: Deposited) -> int:
        return event.amount * 2

    assert bus.on(Deposited)(handler) is handler
    assert handler(Deposited(2)) == 4


def test_handler_of_a_base_class_sees_subclasses_in_registration_order(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(BigDeposited)
    def specific(event: BigDeposited) -> None:
        seen.append("specific")

    @bus.on(Event)
    def everything(event: Event) -> None:
        seen.append(f"everything:{type(event).__name__}")

    @bus.on(Deposited, BigDeposited)  # registered for both: still runs once
    def deposits(event: Deposited) -> None:
        seen.append("deposits")

    driver.handle(bus, BigDeposited(5))
    driver.handle(bus, Withdrawn(1))
    assert seen == ["specific", "everything:BigDeposited", "deposits", "everything:Withdrawn"]


def test_routes_are_resolved_once_per_class_and_reset_by_registration(driver: Driver) -> None:
    bus, seen = Messagebus(), []
    bus.on(Deposited)(lambda event: seen.append("a"))
    driver.handle(bus, Deposited(1))
    routes = bus._routes if driver.name == "sync" else bus._aroutes
    assert list(routes) == [Deposited]
    bus.on(Deposited)(lambda event: seen.append("b"))
    assert not routes
    driver.handle(bus, Deposited(1))
    assert seen == ["a", "a", "b"]


def test_event_without_handlers_is_a_no_op(driver: Driver) -> None:
    assert driver.handle(Messagebus(), Deposited(1)) is None


def test_command_goes_to_its_handler_and_returns_its_result(driver: Driver) -> None:
    bus = Messagebus()

    @bus.register(Deposit)
    def deposit(command: Deposit) -> int:
        return command.amount + 1

    assert driver.handle(bus, Deposit(41)) == 42


def test_command_without_handler_runs_execute(driver: Driver) -> None:
    command = SelfExecuting()
    assert driver.handle(Messagebus(), command) == "executed"
    assert command.ran


def test_registered_handler_wins_over_execute(driver: Driver) -> None:
    bus = Messagebus()
    bus.register(SelfExecuting)(lambda command: "handler")
    command = SelfExecuting()
    assert driver.handle(bus, command) == "handler"
    assert not command.ran


def test_command_with_neither_handler_nor_execute_is_a_clear_error(driver: Driver) -> None:
    with pytest.raises(HandlerNotFound, match=r"register one with @messagebus.register\(Bare\)"):
        driver.handle(Messagebus(), Bare())


def test_second_command_handler_is_an_error_naming_both() -> None:
    bus = Messagebus()

    @bus.register(Deposit)
    def original(command: Deposit) -> None: ...

    def intruder(command: Deposit) -> None: ...

    with pytest.raises(DuplicateHandler) as raised:
        bus.register(Deposit)(intruder)
    assert "original" in str(raised.value)
    assert "intruder" in str(raised.value)
    bus.register(Deposit)(original)  # the same function again is harmless


def test_types_are_read_from_the_annotation_when_not_given(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on
    def bare(event: Deposited) -> None:
        seen.append("bare")

    @bus.on()
    def union(event: Deposited | Withdrawn) -> None:
        seen.append("union")

    @bus.register
    def command(command: Deposit) -> int:
        return command.amount

    @bus.register()
    def other(command: SelfExecuting) -> str:
        return "other"

    driver.handle(bus, Deposited(1))
    driver.handle(bus, Withdrawn(1))
    assert seen == ["bare", "union", "union"]
    assert driver.handle(bus, Deposit(7)) == 7
    assert driver.handle(bus, SelfExecuting()) == "other"


def test_unannotated_handler_without_types_is_an_error() -> None:
    with pytest.raises(InvalidHandler, match="no annotation"):
        Messagebus().on()(lambda event: None)


def test_wrong_kind_of_type_in_decorator_is_an_error() -> None:
    bus = Messagebus()
    with pytest.raises(InvalidHandler, match=r"Commands go to @messagebus.register"):
        bus.on(Deposit)(lambda event: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidHandler, match="takes Command subclasses, got 42"):
        bus.register(42)(lambda command: None)  # type: ignore[call-overload]


def test_handler_needs_a_message_parameter() -> None:
    with pytest.raises(InvalidHandler, match="first positional parameter"):
        Messagebus().on(Deposited)(lambda: None)


def test_extra_parameter_without_depends_is_an_error() -> None:
    def handler(event: Deposited, db: object) -> None: ...

    with pytest.raises(InvalidHandler, match="'db' .* neither a default nor Depends"):
        Messagebus().on(Deposited)(handler)


def test_not_a_message_is_a_type_error_saying_what_was_given(driver: Driver) -> None:
    with pytest.raises(TypeError, match="got str: 'hello'"):
        driver.handle(Messagebus(), "hello")  # type: ignore[arg-type]


def test_failing_event_handler_raises_by_default(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(Deposited)
    def broken(event: Deposited) -> None:
        raise ValueError("boom")

    bus.on(Deposited)(lambda event: seen.append("after"))
    with pytest.raises(ValueError, match="boom"):
        driver.handle(bus, Deposited(1))
    assert seen == []


def test_failing_event_handler_is_logged_and_others_run_when_not_raising(
    driver: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    bus, seen = Messagebus(raise_on_event_error=False), []

    @bus.on(Deposited)
    def broken(event: Deposited) -> None:
        raise ValueError("boom")

    bus.on(Deposited)(lambda event: seen.append(event.amount))
    with caplog.at_level(logging.ERROR, logger="pybondi.messagebus"):
        driver.handle(bus, Deposited(3))
    assert seen == [3]
    [record] = caplog.records
    assert "broken" in record.getMessage()
    assert "Deposited(amount=3)" in record.getMessage()
    assert record.exc_info is not None


def test_changing_raise_on_event_error_applies_to_cached_routes(driver: Driver) -> None:
    bus = Messagebus()
    bus.on(Deposited)(lambda event: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        driver.handle(bus, Deposited(1))
    bus.raise_on_event_error = False
    driver.handle(bus, Deposited(1))


def test_plain_class_messages_have_a_readable_repr() -> None:
    class Renamed(Event):
        def __init__(self, name: str) -> None:
            self.name = name

    assert repr(Renamed("bob")) == "Renamed(name='bob')"


def test_add_handler_methods_register_like_decorators(driver: Driver) -> None:
    bus, seen = Messagebus(), []
    bus.add_event_handler(Deposited, lambda event: seen.append("event"))
    bus.add_command_handler(Deposit, lambda command: "command")
    driver.handle(bus, Deposited(1))
    assert seen == ["event"]
    assert driver.handle(bus, Deposit(1)) == "command"


# Async handlers -------------------------------------------------------------------------


def test_async_handlers_are_awaited_in_order() -> None:
    bus, seen = Messagebus(), []

    @bus.on(Deposited)
    async def first(event: Deposited) -> None:
        await asyncio.sleep(0)
        seen.append("async")

    bus.on(Deposited)(lambda event: seen.append("sync"))

    @bus.register(Deposit)
    async def deposit(command: Deposit) -> int:
        return command.amount

    asyncio.run(bus.ahandle(Deposited(1)))
    assert seen == ["async", "sync"]
    assert asyncio.run(bus.ahandle(Deposit(5))) == 5


def test_async_execute_is_awaited() -> None:
    class Later(Command):
        async def execute(self) -> str:
            return "later"

    assert asyncio.run(Messagebus().ahandle(Later())) == "later"
    with pytest.raises(AsyncRequired, match="execute"):
        Messagebus().handle(Later())


def test_sync_handle_refuses_async_handler_by_name() -> None:
    bus = Messagebus()

    @bus.on(Deposited)
    async def notify(event: Deposited) -> None: ...

    with pytest.raises(AsyncRequired, match=r"notify is async.*ahandle"):
        bus.handle(Deposited(1))


def test_failing_async_handler_is_logged_when_not_raising(caplog: pytest.LogCaptureFixture) -> None:
    bus, seen = Messagebus(raise_on_event_error=False), []

    @bus.on(Deposited)
    async def broken(event: Deposited) -> None:
        raise ValueError("boom")

    bus.on(Deposited)(lambda event: seen.append("after"))
    asyncio.run(bus.ahandle(Deposited(1)))
    assert seen == ["after"]
    assert "broken" in caplog.text


# Generic events: `Added[User]` narrows a handler to one aggregate type -------------------


def test_parametrized_aggregate_events_reach_only_their_aggregate_type(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(Added, RolledBack)  # the 1.2.1 README form: the annotation narrows it
    def users(event: Added[User] | RolledBack[User]) -> None:
        seen.append(f"users:{event.user.name}")

    @bus.on()
    def accounts(event: Added[BankAccount]) -> None:
        seen.append(f"accounts:{event.bank_account.id}")

    @bus.on(Added[User], Added[BankAccount])
    def both(event: Added[User] | Added[BankAccount]) -> None:
        seen.append("both")

    @bus.on(Added)
    def everything(event: Added) -> None:  # type: ignore[type-arg]
        seen.append("everything")

    driver.handle(bus, Added(User(1, "ann")))
    driver.handle(bus, Added(BankAccount("x")))
    driver.handle(bus, RolledBack(BankAccount("x")))
    assert seen == [
        "users:ann", "both", "everything",
        "accounts:x", "both", "everything",
    ]  # fmt: skip


def test_narrowed_async_handler() -> None:
    bus, seen = Messagebus(), []

    @bus.on
    async def users(event: Added[User]) -> None:
        seen.append(event.user.name)

    asyncio.run(bus.ahandle(Added(BankAccount("x"))))
    asyncio.run(bus.ahandle(Added(User(1, "ann"))))
    assert seen == ["ann"]


def test_a_failed_registration_registers_nothing() -> None:
    bus = Messagebus()

    @bus.register(SelfExecuting)
    def existing(command: SelfExecuting) -> None: ...

    def both(command: Deposit | SelfExecuting) -> None: ...

    with pytest.raises(DuplicateHandler):
        bus.register()(both)
    assert Deposit not in bus.command_handlers


def test_union_of_parametrized_events_narrows_to_either_type(driver: Driver) -> None:
    bus, seen = Messagebus(), []

    @bus.on(Added)
    def people(event: Added[User] | Added[BankAccount]) -> None:
        seen.append(type(event.aggregate).__name__)

    driver.handle(bus, Added(User(1, "ann")))
    driver.handle(bus, Added(BankAccount("x")))
    assert seen == ["User", "BankAccount"]
