"""Code written for pybondi 1.2.1 keeps working, name by name.

`PUBLIC` lists, module by module, what pybondi 1.2.1's source defines or imports for its
users (its stdlib and typing imports left out): classes, functions, their methods and
the attributes users reach. Each one works in pybondi 2, or is in `CHANGED`: named in
the README's "Coming from pybondi 1.2.1" section with its replacement (and the reason).
The `DEPRECATED` ones work, warn once per process and are named in that section too.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pybondi import (
    Added,
    Aggregate,
    BasePublisher,
    Command,
    Committed,
    Depends,
    Event,
    Factory,
    Message,
    Messagebus,
    Publisher,
    Root,
    Session,
    _deprecation,
)
from pybondi.events import AggregateEvent

README = Path(__file__).parent.parent / "README.md"
SECTION = "## Coming from pybondi 1.2.1"

PUBLIC: dict[str, list[str]] = {
    "pybondi": [
        "Event",
        "Command",
        "Messagebus",
        "Aggregate",
        "Root",
        "Factory",
        "Session",
        "Publisher",
        "Message",
        "Repository",
        "Callbacks",
    ],
    "pybondi.aggregate": [
        "Event",
        "Entity",
        "Entity.id",
        "Entity.__eq__",
        "Entity.__hash__",
        "Entity.__setattr__",
        "Root",
        "Root.events",
        "Root.publish",
        "Aggregate",
        "Aggregate.root",
        "Factory",
        "Factory.__call__",
    ],
    "pybondi.callbacks": [
        "Publisher",
        "Callback",
        "Callback.publisher",
        "Callback.bind",
        "Callback.set",
        "Callback.__call__",
        "Callback.flush",
        "Callback.reset",
        "Callbacks",
        "Callbacks.__init__",
        "Callbacks.publisher",
        "Callbacks.list",
        "Callbacks.bind",
        "Callbacks.set",
        "Callbacks.__call__",
        "Callbacks.flush",
        "Callbacks.reset",
    ],
    "pybondi.events": [
        "Aggregate",
        "Event",
        "Added",
        "Added.aggregate",
        "RolledBack",
        "RolledBack.aggregate",
        "Commited",
        "Commited.aggregate",
    ],
    "pybondi.messagebus": [
        "Depends",
        "logger",
        "Event",
        "Command",
        "Command.execute",
        "Messagebus",
        "Messagebus.raise_on_event_error",
        "Messagebus.command_handlers",
        "Messagebus.event_handlers",
        "Messagebus.dependency_provider",
        "Messagebus.dependency_overrides",
        "Messagebus.handle",
        "Messagebus.handle_command",
        "Messagebus.handle_event",
        "Messagebus.add_command_handler",
        "Messagebus.add_event_handler",
        "Messagebus.on",
        "Messagebus.register",
    ],
    "pybondi.publisher": [
        "Depends",
        "Message",
        "Message.payload",
        "Message.sender",
        "Message.id",
        "Message.headers",
        "Message.timestamp",
        "Base",
        "Base.publish",
        "Base.begin",
        "Base.commit",
        "Base.rollback",
        "Base.close",
        "Publisher",
        "Publisher.provider",
        "Publisher.subscribers",
        "Publisher.queue",
        "Publisher.dependency_overrides",
        "Publisher.add_subscriber",
        "Publisher.subscribe",
        "Publisher.publish",
        "Publisher.commit",
        "Publisher.rollback",
        "Publisher.begin",
        "Publisher.close",
    ],
    "pybondi.repository": [
        "Aggregate",
        "Repository",
        "Repository.aggregates",
        "Repository.add",
        "Repository.commit",
        "Repository.rollback",
        "Repository.begin",
        "Repository.close",
        "Repository.store",
        "Repository.restore",
    ],
    "pybondi.session": [
        "Aggregate",
        "Messagebus",
        "Command",
        "Event",
        "Repository",
        "Publisher",
        "Added",
        "RolledBack",
        "Commited",
        "Session",
        "Session.__init__",
        "Session.repository",
        "Session.messagebus",
        "Session.publisher",
        "Session.queue",
        "Session.enqueue",
        "Session.dequeue",
        "Session.add",
        "Session.dispatch",
        "Session.run",
        "Session.execute",
        "Session.begin",
        "Session.commit",
        "Session.rollback",
        "Session.close",
        "Session.__enter__",
        "Session.__exit__",
    ],
}

# Renamed: each still works, warns once, and is named in the README with its replacement.
DEPRECATED: dict[str, tuple[str, str]] = {
    "pybondi.messagebus.Messagebus.handle_command": (
        "Messagebus.handle_command",
        "Messagebus.handle",
    ),
    "pybondi.messagebus.Messagebus.handle_event": ("Messagebus.handle_event", "Messagebus.handle"),
    "pybondi.publisher.Publisher.add_subscriber": (
        "Publisher.add_subscriber",
        "Publisher.subscribe",
    ),
    "pybondi.publisher.Publisher.queue": ("Publisher.queue", "Publisher.pending"),
    "pybondi.publisher.Base": ("pybondi.publisher.Base", "pybondi.publisher.BasePublisher"),
    "pybondi.session.Commited": ("pybondi.session.Commited", "pybondi.Committed"),
    "pybondi.session.Session.enqueue": ("Session.enqueue", "Session.dispatch"),
    "pybondi.session.Session.dequeue": ("Session.dequeue", "Session.queue.popleft"),
    "pybondi.session.Session.run": ("Session.run", "Session.dispatch"),
}

# Changed: named in the README's section with what to use instead, and why.
CHANGED: dict[str, tuple[str, str]] = {
    "pybondi.session.Session.__init__": (
        "Session(messagebus, publisher, repository)",
        "Session(messagebus, repository, publisher)",
    ),
    "pybondi.messagebus.Messagebus.dependency_provider": (
        "Messagebus.dependency_provider",
        "dependency_overrides",
    ),
    "pybondi.publisher.Publisher.provider": ("Publisher.provider", "dependency_overrides"),
    "pybondi.messagebus.Messagebus.command_handlers": ("Messagebus.command_handlers", ".call"),
    "pybondi.messagebus.Messagebus.event_handlers": ("Messagebus.event_handlers", ".call"),
    "pybondi.publisher.Publisher.subscribers": ("Publisher.subscribers", ".call"),
    "pybondi.messagebus.Messagebus.on": ("Messagebus.on", "Depends"),
    "pybondi.messagebus.Messagebus.register": ("Messagebus.register", "DuplicateHandler"),
    "pybondi.messagebus.Messagebus.add_command_handler": (
        "Messagebus.add_command_handler",
        "DuplicateHandler",
    ),
    "pybondi.messagebus.Messagebus.handle": ("Messagebus.handle", "TypeError"),
    "pybondi.messagebus.Command.execute": ("Command.execute", "HandlerNotFound"),
    "pybondi.aggregate.Entity.__eq__": ("Entity.__eq__", "same class"),
    "pybondi.aggregate.Factory.__call__": ("Factory.__call__", "Factory.create"),
    "pybondi.aggregate.Root.publish": ("Root.publish", "session.execute"),
    "pybondi.repository.Repository.add": ("Repository.add", "repository.get"),
    "pybondi.events.Added": ("Added", "event.aggregate"),
    "pybondi.events.RolledBack": ("RolledBack", "event.aggregate"),
    "pybondi.events.Commited": ("Commited", "event.aggregate"),
    "pybondi.callbacks.Callbacks.__init__": ("Callbacks(", "Callbacks.bind"),
    "pybondi.publisher.Publisher.commit": ("Publisher.commit", "DeliveryError"),
    "pybondi.session.Session.dispatch": ("Session.dispatch", "Session.execute"),
    "pybondi.session.Session.begin": ("Session.begin", "new `Session`"),
    "pybondi.session.Session.__exit__": ("Session.__exit__", "rolls back"),
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no deprecated name has warned yet."""
    monkeypatch.setattr(_deprecation, "_warned", set())


def readme_section() -> str:
    """The README's section, its whitespace squashed: names may wrap across lines."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    return " ".join(text.split(SECTION, 1)[1].split("\n## ", 1)[0].split())


# The walk --------------------------------------------------------------------------------


class _User(Aggregate):
    def __init__(self, id: int) -> None:
        self.root = Root(id)


def instance(cls: type) -> Any:
    """An instance of a 1.2.1 class, for the attributes its `__init__` sets."""
    abstract = getattr(cls, "__abstractmethods__", ())
    if abstract:  # a minimal concrete subclass, as a user would write
        cls = type(cls.__name__, (cls,), dict.fromkeys(abstract, lambda *args: None))
    if issubclass(cls, AggregateEvent):
        return cls(_User(1))
    arguments: dict[str, tuple[Any, ...]] = {
        "Entity": (1,),
        "Root": (1,),
        "Message": ("payload",),
        "Callbacks": ([],),
    }
    return cls(*arguments.get(cls.__name__, ()))


def resolve(path: str) -> Any:
    """The object a dotted 1.2.1 name reaches: a module attribute, then its members."""
    for module_name in sorted(PUBLIC, key=len, reverse=True):
        if path.startswith(module_name + "."):
            break
    first, *members = path.removeprefix(module_name + ".").split(".")
    value = getattr(importlib.import_module(module_name), first)
    for member in members:
        if hasattr(value, member):
            value = getattr(value, member)
        elif value is Aggregate:  # its root is set by subclasses, as in 1.2.1
            value = getattr(_User(1), member)
        else:
            value = getattr(instance(value), member)
    return value


def test_the_readme_names_each_deprecated_and_changed_name_with_its_replacement() -> None:
    section = readme_section()
    missing = [
        f"{name} (use {replacement})"
        for name, replacement in [*DEPRECATED.values(), *CHANGED.values()]
        if name not in section or replacement not in section
    ]
    assert not missing, f"Not in the README's {SECTION!r}: {missing}"


PATHS = [f"{module}.{name}" for module, names in PUBLIC.items() for name in names]


def test_changed_and_deprecated_are_public_names_of_1_2_1() -> None:
    assert not (set(CHANGED) | set(DEPRECATED)) - set(PATHS)


@pytest.mark.parametrize("path", PATHS)
def test_every_public_name_of_1_2_1_works_or_is_listed(path: str) -> None:
    if path in CHANGED:
        name, replacement = CHANGED[path]
        section = readme_section()
        assert name in section and replacement in section
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve(path)
    # Reaching a deprecated module attribute (Base, and so Base.publish) warns; a deprecated
    # method warns when called (see below).
    through_deprecated = any(path == old or path.startswith(old + ".") for old in DEPRECATED)
    assert all(w.category is DeprecationWarning for w in caught)
    assert not caught or through_deprecated, [str(w.message) for w in caught]


# The deprecated aliases, each doing what it did in 1.2.1 ---------------------------------


@dataclass
class Greet(Command):
    name: str


@dataclass
class Greeted(Event):
    name: str


def the_greeting() -> list[str]:
    raise NotImplementedError  # overridden in each test


@pytest.fixture
def bus() -> Iterator[Messagebus]:
    bus, greetings = Messagebus(), list[str]()
    bus.dependency_overrides[the_greeting] = lambda: greetings

    @bus.register(Greet)
    def greet(command: Greet, greetings: list[str] = Depends(the_greeting)) -> str:
        greetings.append(f"hello {command.name}")
        return command.name

    @bus.on(Greeted)
    def greeted(event: Greeted, greetings: list[str] = Depends(the_greeting)) -> None:
        greetings.append(f"greeted {event.name}")

    yield bus


def greetings(bus: Messagebus) -> Any:
    return bus.dependency_overrides[the_greeting]()


def test_handle_command_and_handle_event_dispatch_as_handle(bus: Messagebus) -> None:
    with pytest.deprecated_call(match=r"Messagebus\.handle_command\(\).*Messagebus\.handle\(\)"):
        assert bus.handle_command(Greet("ann")) == "ann"
    with pytest.deprecated_call(match=r"Messagebus\.handle_event\(\).*Messagebus\.handle\(\)"):
        bus.handle_event(Greeted("ann"))
    assert greetings(bus) == ["hello ann", "greeted ann"]
    with pytest.raises(TypeError, match=r"handle_command\(\) takes a Command, got Greeted"):
        bus.handle_command(Greeted("bob"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"handle_event\(\) takes an Event, got Greet"):
        bus.handle_event(Greet("bob"))  # type: ignore[arg-type]


def test_a_deprecated_name_warns_once_per_process_at_the_caller(bus: Messagebus) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bus.handle_command(Greet("ann"))
        bus.handle_command(Greet("bob"))
        bus.handle_event(Greeted("ann"))
    assert [str(w.message).split(" is ")[0] for w in caught] == [
        "Messagebus.handle_command()",
        "Messagebus.handle_event()",
    ]
    assert {w.filename for w in caught} == {__file__}
    assert greetings(bus) == ["hello ann", "hello bob", "greeted ann"]


def test_add_subscriber_subscribes_and_queue_is_the_buffer() -> None:
    publisher, received = Publisher(), list[Any]()

    def the_list() -> list[Any]:
        raise NotImplementedError

    def subscriber(message: Message[str], into: list[Any] = Depends(the_list)) -> None:
        into.append(message.payload)

    publisher.dependency_overrides[the_list] = lambda: received
    with pytest.deprecated_call(match=r"add_subscriber\(\).*Publisher\.subscribe\("):
        publisher.add_subscriber("greetings", subscriber)
    publisher.publish("greetings", Message("dropped"))
    with pytest.deprecated_call(match=r"Publisher\.queue.*Publisher\.pending\(\)"):
        queue = publisher.queue
    assert [(topic, message.payload) for topic, message in queue] == [("greetings", "dropped")]
    queue.clear()
    publisher.publish("greetings", Message("hello"))
    publisher.commit()
    assert received == ["hello"]


def test_base_is_a_publisher_that_needs_only_publish() -> None:
    with pytest.deprecated_call(match=r"pybondi\.publisher\.Base .*BasePublisher"):
        from pybondi.publisher import Base

    class Printer(Base):  # 1.2.1's Base: commit and rollback were optional
        def __init__(self) -> None:
            self.published: list[tuple[str, Any]] = []

        def publish(self, topic: str, message: Message[Any]) -> None:
            self.published.append((topic, message.payload))

    printer = Printer()
    assert isinstance(printer, BasePublisher)
    with Session(publisher=printer) as session:
        session.publisher.publish("topic", Message("hi"))
    assert printer.published == [("topic", "hi")]


def test_session_commited_is_committed() -> None:
    with pytest.deprecated_call(match=r"pybondi\.session\.Commited .*pybondi\.Committed"):
        from pybondi.session import Commited
    assert Commited is Committed


def test_enqueue_dequeue_and_run_work_the_session_queue(bus: Messagebus) -> None:
    user = _User(1)
    bus.on(Added)(lambda event: None)  # so that the session queues Added(user)
    session = Session(bus)
    session.add(user)
    with pytest.deprecated_call(match=r"Session\.enqueue\(\).*Session\.dispatch\(\)"):
        session.enqueue(Greet("ann"))
    with pytest.deprecated_call(match=r"Session\.dequeue\(\).*Session\.queue\.popleft\(\)"):
        assert session.dequeue() == Added(user)
    with pytest.deprecated_call(match=r"Session\.run\(\).*Session\.dispatch\(message\)"):
        session.run()
    assert greetings(bus) == ["hello ann"]
    assert list(session.queue) == []
    session.enqueue(Greeted("bob"))
    session.commit()  # runs what is still queued, as 1.2.1's commit did
    session.close()
    assert greetings(bus) == ["hello ann", "greeted bob"]


def test_a_factory_that_overrides_call_works_as_in_1_2_1() -> None:
    class Users(Factory[_User]):  # 1.2.1's Factory had __call__ as its abstract method
        def __call__(self, id: int) -> _User:
            return _User(id)

    # Type checkers ask for `create`, pybondi 2's hook; at run time, 1.2.1's way works.
    users = Users()  # type: ignore[abstract]
    assert users(7).id == 7
    assert users.create(8).id == 8


def test_aggregate_events_compare_as_1_2_1_s_dataclasses_did() -> None:
    user = _User(1)
    assert Added(user) == Added(user)
    assert Added(user) != Committed(user)
    assert Added(user) != Added(_User(2))
    assert len({Committed(user), Committed(user)}) == 1
