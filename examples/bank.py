"""A small bank built with pybondi: run `python examples/bank.py [bank.db]`, twice.

Commands go through a `Messagebus` to handlers, which get the repository through
`Depends(get_accounts)`. The `Account` aggregate publishes domain events; event handlers
turn them into `Message`s that the `Publisher` delivers only when the `Session` commits.
Accounts and events are kept in a SQLite file by a `StateRepository`: the second run
starts from what the first one left. A domain error (`InsufficientFunds`) rolls the
whole session back: nothing of it is written and no message leaves. The same bus also
runs async, on an async store over the same file.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from pybondi import (
    Aggregate,
    Command,
    Committed,
    Depends,
    Event,
    Message,
    Messagebus,
    Publisher,
    RolledBack,
    Root,
    Session,
)
from pybondi.exceptions import NotFound
from pybondi.persistence import SQLStore
from pybondi.persistence.repositories import StateRepository
from pybondi.persistence.serialization import Registry

# Messages: what we ask for (commands) and what happened (events) ------------------------


@dataclass
class OpenAccount(Command):
    id: str


@dataclass
class Deposit(Command):
    id: str
    amount: int


@dataclass
class Withdraw(Command):
    id: str
    amount: int


@dataclass
class PayInterest(Command):
    id: str
    percent: int


@dataclass
class AccountOpened(Event):
    id: str


@dataclass
class Deposited(Event):
    id: str
    amount: int


@dataclass
class Withdrawn(Event):
    id: str
    amount: int


# The domain: an aggregate and the repository that stores it -----------------------------


class InsufficientFunds(Exception):
    """A withdrawal larger than the balance."""


class Account(Aggregate):
    def __init__(self, id: str, balance: int = 0) -> None:
        self.root = Root(id)
        self.balance = balance

    @classmethod
    def open(cls, id: str) -> Account:
        account = cls(id)
        account.root.publish(AccountOpened(id))
        return account

    def deposit(self, amount: int) -> None:
        self.balance += amount
        self.root.publish(Deposited(self.id, amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise InsufficientFunds(f"{self.id} has {self.balance}, cannot withdraw {amount}")
        self.balance -= amount
        self.root.publish(Withdrawn(self.id, amount))


# What may be stored, under names that stay stable when the code moves.
registry = Registry()
registry.register(Account, name="bank.Account")
for event_type in (AccountOpened, Deposited, Withdrawn):
    registry.register(event_type, name=f"bank.{event_type.__name__}")

Accounts = StateRepository[Account]


# Handlers: `@bus.register` / `@bus.on` read the message type from the first annotation ---

bus = Messagebus()
publisher = Publisher()


def get_accounts() -> Accounts:
    raise NotImplementedError("main() provides it through bus.dependency_overrides")


@bus.register
def open_account(command: OpenAccount, accounts: Accounts = Depends(get_accounts)) -> None:
    print(f"[command]  {command}")
    try:
        accounts.get(command.id)
        print(f"[command]  {command.id} is already open (a previous run opened it)")
    except NotFound:
        accounts.add(Account.open(command.id))


@bus.register
def deposit(command: Deposit, accounts: Accounts = Depends(get_accounts)) -> None:
    print(f"[command]  {command}")
    accounts.get(command.id).deposit(command.amount)


@bus.register
def withdraw(command: Withdraw, accounts: Accounts = Depends(get_accounts)) -> None:
    print(f"[command]  {command}")
    accounts.get(command.id).withdraw(command.amount)


@bus.register
async def pay_interest(command: PayInterest, accounts: Accounts = Depends(get_accounts)) -> None:
    print(f"[command]  {command} (async handler)")
    account = await accounts.aget(command.id)
    account.deposit(account.balance * command.percent // 100)


@bus.on
def announce(event: AccountOpened | Deposited | Withdrawn) -> None:
    print(f"[event]    {event} -> message queued")
    publisher.publish("accounts", Message({"type": type(event).__name__, **vars(event)}))


@bus.on
def saving(event: Committed[Account]) -> None:
    print(f"[commit]   {event.account.id}: balance {event.account.balance} saved")


@bus.on
def discard(event: RolledBack[Account]) -> None:
    print(f"[rollback] {event.account.id}: unsaved balance {event.account.balance} discarded")


@publisher.subscribe("accounts")  # called for each message, once the session commits
def send(message: Message[dict[str, object]]) -> None:
    print(f"[publish]  accounts <- {message.payload}")


# The run ---------------------------------------------------------------------------------


def balances(accounts: Accounts) -> dict[str, int]:
    """What the database holds, read in a session of its own (with no handlers)."""
    found = {}
    with Session(Messagebus(), accounts):
        for id in ("alice", "bob"):
            with suppress(NotFound):
                found[id] = accounts.get(id).balance
    return found


async def pay_interest_async(path: Path) -> None:
    store = SQLStore(f"sqlite:///{path}", asynchronous=True)
    accounts = StateRepository(store, Account, registry)
    bus.dependency_overrides[get_accounts] = lambda: accounts
    try:
        async with Session(bus, accounts, publisher) as session:
            await session.aexecute(PayInterest("alice", percent=10))
    finally:
        await store.adispose()


def main(path: Path) -> dict[str, int]:
    store = SQLStore(f"sqlite:///{path}")
    store.create_tables()
    accounts = StateRepository(store, Account, registry)
    bus.dependency_overrides[get_accounts] = lambda: accounts

    print(f"== 0. The database {path} holds {balances(accounts) or 'no accounts yet'}")

    print("\n== 1. Alice and Bob open accounts and deposit; messages leave after the commit")
    with Session(bus, accounts, publisher) as session:
        session.execute(OpenAccount("alice"))
        session.execute(Deposit("alice", 100))
        session.execute(OpenAccount("bob"))
        session.execute(Deposit("bob", 50))

    print("\n== 2. Alice withdraws 30")
    with Session(bus, accounts, publisher) as session:
        session.execute(Withdraw("alice", 30))

    print("\n== 3. Bob deposits 5, then withdraws 500: the whole session is rolled back")
    try:
        with Session(bus, accounts, publisher) as session:
            session.execute(Deposit("bob", 5))
            session.execute(Withdraw("bob", 500))
    except InsufficientFunds as error:
        print(f"[error]    InsufficientFunds: {error}; nothing written, no message left")

    print("\n== 4. Alice earns 10% interest, in an async session")
    asyncio.run(pay_interest_async(path))

    bus.dependency_overrides[get_accounts] = lambda: accounts
    final = balances(accounts)
    events = len(store.read_log(limit=10_000))
    print(f"\nFinal balances in the database: {final}; {events} events in its log")
    print("Run it again: the next run starts from here.")
    store.dispose()
    return final


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bank.db"))
