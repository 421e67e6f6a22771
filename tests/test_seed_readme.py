"""Every example of the pybondi 1.2.1 README runs as written.

The examples below are copied verbatim from `tests/seed/pybondi-1.2.1-README.txt` (a test
checks that they still match it). Only the README's placeholders are supplied: `database`,
`fetch_user_age`, `save_user_age`, `AgeChanged`, `UsernameChanged`, a `user`, the imports
the session example leaves out, and, where it says `repository`, a `Users` repository.

The session example passes `Session(messagebus, repository, publisher)`, although 1.2.1's
`Session.__init__` took `(messagebus, publisher, repository)`: pybondi 2 follows the
README, and refuses 1.2.1's own order with a TypeError that gives the README's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

SEED = Path(__file__).parent / "seed" / "pybondi-1.2.1-README.txt"

MESSAGEBUS = """
from pybondi.messagebus import Event, Command
from pybondi.messagebus import Messagebus, Depends

class MakeSomethingHappen(Command):
    def __init__(self, message: str):
        self.message = message

class SomethingHappened(Event):
    def __init__(self, message: str):
        self.message = message

class AnotherThingHappened(Event):
    def __init__(self, message: str):
        self.message = message

class ABCRepositoryDependency: ### This simulates to be a repository dependency that we want to inject into our handlers.
    ### This can be a real database client, file system client, or any other service that we want to inject.
    data: list[str]

messagebus = Messagebus()

def get_repository_deps() -> ABCRepositoryDependency:
    raise NotImplementedError("Subclasses must implement the execute method.")

@messagebus.on(SomethingHappened, AnotherThingHappened)
def handle_something(event: SomethingHappened | AnotherThingHappened, repository: ABCRepositoryDependency = Depends(get_repository_deps)):
    repository.data.append(event.message)

@messagebus.on(AnotherThingHappened)
def handle_more(event: AnotherThingHappened, repository: ABCRepositoryDependency = Depends(get_repository_deps)):
    repository.data.append(event.message)

@messagebus.register(MakeSomethingHappen)
def handle_make_something(command: MakeSomethingHappen, repository: ABCRepositoryDependency = Depends(get_repository_deps)):
    repository.data.append(command.message)

class RepositoryDependency(ABCRepositoryDependency):
    def __init__(self):
        self.data = list()

repository = RepositoryDependency()

def actual_repository(): 
    return repository    
                         
messagebus.dependency_overrides[get_repository_deps] = actual_repository    ### We override the dependency with our mock API.
                                                                            ### Just like in FastAPI. This is not necessary but
                                                                            ### super useful.
messagebus.handle(MakeSomethingHappen("Hello"))
messagebus.handle(SomethingHappened("World"))
messagebus.handle(AnotherThingHappened("!"))
print(repository.data) # ["Hello", "World", "!", "!"]
"""

PUBLISHER = """
from pybondi.publisher import Message, Publisher, Depends

class ExternalAPI: ### This is a mock class for an external API that we want to publish messages to.
    ### This can be a real API client, or any other external system that we want to inject.
    def __init__(self):
        self.data = []

def abc_dependency() -> ExternalAPI: ...

publisher = Publisher()

@publisher.subscribe("topic-1")
def subscriber1(message: Message, api: ExternalAPI = Depends(abc_dependency)):
    api.data.append(message.payload)

@publisher.subscribe("topic-1", "topic-2")
def subscriber2(message: Message, api: ExternalAPI = Depends(abc_dependency)):
    api.data.append(message.payload)

api = ExternalAPI()
publisher.dependency_overrides[abc_dependency] = lambda: api ### We override the dependency with our mock API.
                                                             ### Just like in FastAPI. This is not necessary but
                                                             ### super useful.
                                                            

def test_publisher():
    publisher.publish("topic-1", Message("Hi"))
    publisher.rollback()
    publisher.publish("topic-2", Message("Hello"))
    publisher.publish("topic-2", Message("World"))
    publisher.publish("topic-1", Message("!"))
    publisher.commit()

    print(api.data) ### ["Hello", "World", "!", "!"]
"""

AGGREGATE = """
from pybondi.aggregate import Aggregate, Root
from pybondi.repository import Repository

class User(Aggregate):
    def __init__(self, id: int, name: str):
        self.root = Root(id)
        self.name = name

    def change_name(self, name: str):
        self.root.publish(UsernameChanged(name))


class Users(Repository):
    def __init__(self):
        super().__init__()

    def store(self, user: User):
        database.save(user) ### Persists the user to the database.

    def restore(self, user: User):
        return database.load(user) ### Loads the user from the database to it's original state.
"""

SESSION_COMMITS = """
from pybondi import Command
from pybondi.session import Session


@messagebus.on(Added, RolledBack)
def bring_user_up_to_date(event: Added[User] | RolledBack[User]):
    event.user.age = fetch_user_age(event.user) ### Fetch the user's age from somewhere
    event.user.root.publish(AgeChanged(event.user.age)) ### You can publish events from events handlers
                                                        ### This way you can create a chain of events that
                                                        ### Will be executed in order.

@messagebus.on(Commited)
def save_user(event: Commited[User]):
    save_user_age(event.user) ### Send the user's age to somewhere this is just an example.
    
    
@dataclass
class BumpAge(Command):
    user: User

    def execute(self):
        self.user.age += 1 

with Session(messagebus, repository, publisher) as session:
    session.add(user)
    session.execute(BumpAge(user))

### user is now 1 year older
"""

SESSION_ROLLS_BACK = """
with Session(messagebus) as session:
    session.add(user)
    session.execute(BumpAge(user))
    raise Exception("Something went wrong")

### user don't get older because the session was rolled back
"""


class Database:
    """The README's `database`: keeps each user's name and age by id."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}

    def save(self, user: Any) -> None:
        self.rows[user.id] = {"name": user.name, "age": user.age}

    def load(self, user: Any) -> Any:
        for name, value in self.rows.get(user.id, {}).items():
            setattr(user, name, value)
        return user


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.mark.parametrize(
    "example", [MESSAGEBUS, PUBLISHER, AGGREGATE, SESSION_COMMITS, SESSION_ROLLS_BACK]
)
def test_examples_are_verbatim_copies_of_the_seed(example: str) -> None:
    assert squash(example) in squash(SEED.read_text())


def test_messagebus_example(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {}
    exec(MESSAGEBUS, namespace)
    assert namespace["repository"].data == ["Hello", "World", "!", "!"]
    assert capsys.readouterr().out == "['Hello', 'World', '!', '!']\n"


def test_publisher_example() -> None:
    namespace: dict[str, Any] = {}
    exec(PUBLISHER, namespace)
    namespace["test_publisher"]()
    assert namespace["api"].data == ["Hello", "World", "!", "!"]


def test_aggregate_and_session_examples() -> None:
    from dataclasses import dataclass

    from pybondi import Event
    from pybondi.events import Added, Commited, RolledBack

    class UsernameChanged(Event):
        def __init__(self, name: str) -> None:
            self.name = name

    class AgeChanged(Event):
        def __init__(self, age: int) -> None:
            self.age = age

    database, ages = Database(), {1: 30}
    namespace: dict[str, Any] = {
        "database": database,
        "UsernameChanged": UsernameChanged,
        "AgeChanged": AgeChanged,
        "dataclass": dataclass,
        "Added": Added,
        "Commited": Commited,
        "RolledBack": RolledBack,
        "fetch_user_age": lambda user: ages[user.id],
        "save_user_age": lambda user: ages.__setitem__(user.id, user.age),
    }
    exec(MESSAGEBUS, namespace)
    exec(PUBLISHER, namespace)
    exec(AGGREGATE, namespace)
    user = namespace["user"] = namespace["User"](1, "ann")
    namespace["repository"] = namespace["Users"]()  # the session example's `repository`
    changes: list[int] = []
    namespace["messagebus"].on(AgeChanged)(lambda event: changes.append(event.age))

    exec(SESSION_COMMITS, namespace)
    assert user.age == 31  # "user is now 1 year older"
    assert ages == {1: 31}
    assert database.rows == {1: {"name": "ann", "age": 31}}
    assert changes == [30]

    with pytest.raises(Exception, match="Something went wrong"):
        exec(SESSION_ROLLS_BACK, namespace)
    assert user.age == 31  # "user don't get older because the session was rolled back"
    assert ages == {1: 31}
    assert changes == [30, 31, 31]  # Added, then RolledBack brought it up to date again


def test_the_order_of_1_2_1_s_session_signature_is_refused_with_the_readme_s() -> None:
    from pybondi import Messagebus, Publisher, Repository, Session

    with pytest.raises(
        TypeError, match=r"The order is Session\(messagebus, repository, publisher\)"
    ):
        Session(Messagebus(), Publisher(), Repository())  # type: ignore[arg-type]
