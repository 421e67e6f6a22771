"""A small bank built with pybondi: run `python examples/bank.py` and read the trace.

Commands go through a `Messagebus` to handlers, which get the repository through
`Depends(get_accounts)`. The `Account` aggregate publishes domain events; event handlers
turn them into `Message`s that the `Publisher` delivers only when the `Session` commits.
A domain error (`InsufficientFunds`) rolls the whole session back: the balance is restored
from the "database" (a plain dict) and no message leaves. The same bus also runs async.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pybondi import (
    Aggregate,
    Command,
    Depends,
    Event,
    Message,
    Messagebus,
    Publisher,
    Repository,
    RolledBack,
    Root,
    Session,
)

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


class Accounts(Repository[Account]):
    """Accounts kept as `{id: balance}` in a dict that stands in for a database."""

    def __init__(self, database: dict[str, int]) -> None:
        super().__init__()
        self.database = database

    def load(self, id: str) -> Account | None:
        return Account(id, self.database[id]) if id in self.database else None

    def store(self, account: Account) -> None:
        self.database[account.id] = account.balance
        print(f"[commit]   {account.id}: balance {account.balance} saved")

    def restore(self, account: Account) -> None:
        account.balance = self.database.get(account.id, 0)
        print(f"[rollback] {account.id}: balance restored to {account.balance}")


# Handlers: `@bus.register` / `@bus.on` read the message type from the first annotation ---

bus = Messagebus()
publisher = Publisher()


def get_accounts() -> Accounts:
    raise NotImplementedError("main() provides it through bus.dependency_overrides")


@bus.register
def open_account(command: OpenAccount, accounts: Accounts = Depends(get_accounts)) -> None:
    print(f"[command]  {command}")
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
def discard(event: RolledBack[Account]) -> None:
    print(f"[rollback] {event.account.id}: unsaved balance {event.account.balance} discarded")


@publisher.subscribe("accounts")  # called for each message, once the session commits
def send(message: Message[dict[str, object]]) -> None:
    print(f"[publish]  accounts <- {message.payload}")


# The run ---------------------------------------------------------------------------------


async def pay_interest_async(accounts: Accounts) -> None:
    async with Session(bus, accounts, publisher) as session:
        await session.aexecute(PayInterest("alice", percent=10))


def main() -> dict[str, int]:
    database: dict[str, int] = {}
    accounts = Accounts(database)
    bus.dependency_overrides[get_accounts] = lambda: accounts

    print("== 1. Alice and Bob open accounts and deposit; messages leave after the commit")
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
        print(f"[error]    InsufficientFunds: {error}; no message left")

    print("\n== 4. Alice earns 10% interest, in an async session")
    asyncio.run(pay_interest_async(accounts))

    print(f"\nFinal balances in the database: {database}")
    return database


if __name__ == "__main__":
    main()
