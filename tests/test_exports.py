"""The public namespace is what `__all__` says, in every public module."""

from __future__ import annotations

import importlib
import inspect
import json
import pydoc
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import fast_depends
import pytest

import pybondi
from pybondi import exceptions
from pybondi.exceptions import MissingDependency

MODULES = [
    "pybondi",
    "pybondi.current",
    "pybondi.aggregate",
    "pybondi.callbacks",
    "pybondi.depends",
    "pybondi.messaging.envelope",
    "pybondi.events",
    "pybondi.exceptions",
    "pybondi.messagebus",
    "pybondi.messages",
    "pybondi.messaging.outbox",
    "pybondi.publisher",
    "pybondi.persistence.repositories",
    "pybondi.persistence.repositories.base",
    "pybondi.persistence.repositories.eventsourced",
    "pybondi.persistence.repositories.state",
    "pybondi.persistence.repositories.table",
    "pybondi.repository",
    "pybondi.persistence.serialization",
    "pybondi.session",
    "pybondi.persistence",
    "pybondi.persistence.store",
    "pybondi.persistence.memory",
    "pybondi.persistence.sql",
    "pybondi.tracing",
    "pybondi.messaging.brokers",
    "pybondi.messaging.brokers.base",
    "pybondi.messaging.brokers.redis",
    "pybondi.messaging.brokers.redis.subscription",
    "pybondi.messaging.brokers.rabbitmq",
    "pybondi.messaging.brokers.rabbitmq.subscription",
    "pybondi.messaging.brokers.nats",
    "pybondi.messaging.brokers.nats.subscription",
    "pybondi.messaging.relay",
    "pybondi.messaging.consumer",
    "pybondi.messaging.worker",
    "pybondi.messaging.deadletters",
    "pybondi.cli",
    "pybondi.projection",
    "pybondi.projection.base",
    "pybondi.projection.progress",
    "pybondi.projection.runner",
    "pybondi.testing",
    "pybondi.testing.scenarios",
    "pybondi.testing.contracts.brokers",
    "pybondi.testing.contracts.brokertarget",
    "pybondi.testing.contracts.stores",
    "pybondi.testing.plugin",
    "pybondi.testing.runner",
    "pybondi.testing.contracts.stores.target",
    "pybondi.testing.contracts.stores.records",
    "pybondi.testing.contracts.stores.outbox",
    "pybondi.testing.contracts.stores.inbox",
    "pybondi.testing.contracts.stores.deadletters",
    "pybondi.messaging.brokers.memory",
    "pybondi.messaging.brokers.clock",
]


def imported(name: str) -> Any:
    """The module; a skip where it needs an extra not installed (the core's own venv)."""
    try:
        return importlib.import_module(name)
    except MissingDependency as missing:
        pytest.skip(str(missing))


def present(name: str) -> Any:
    """`pybondi.<name>`; a skip where its extra is not installed."""
    try:
        return getattr(pybondi, name)
    except MissingDependency as missing:
        pytest.skip(str(missing))


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_documented(name: str) -> None:
    module = imported(name)
    assert module.__doc__
    for public in module.__all__:
        try:
            value = getattr(module, public)
        except MissingDependency:
            continue  # a lazy name whose extra is not installed (the core's own venv)
        if value is fast_depends.Depends:
            continue  # fast-depends' own marker, re-exported on purpose
        assert getattr(value, "__doc__", None), f"{name}.{public} has no docstring"


# The main classes of the subpackages, importable from `pybondi`, imported on first use.
LAZY = {
    "Consumer": "pybondi.messaging.consumer",
    "EventSourcedRepository": "pybondi.persistence.repositories",
    "MemoryStore": "pybondi.persistence",
    "Outbox": "pybondi.messaging.outbox",
    "Projection": "pybondi.projection",
    "ProjectionRunner": "pybondi.projection",
    "Registry": "pybondi.persistence.serialization",
    "Relay": "pybondi.messaging.relay",
    "Retry": "pybondi.messaging.consumer",
    "SQLStore": "pybondi.persistence",
    "StateRepository": "pybondi.persistence.repositories",
    "TableRepository": "pybondi.persistence.repositories",
    "Worker": "pybondi.messaging.worker",
}

# What `import pybondi` must not load: database drivers, broker clients, pydantic.
OPTIONAL = [
    "aio_pika",
    "aiomysql",
    "aiormq",
    "aiosqlite",
    "greenlet",
    "nats",
    "psycopg",
    "pydantic",
    "pymysql",
    "redis",
    "sqlalchemy",
]


def run_python(script: str) -> str:
    """Run `script` in a fresh interpreter; return what it printed."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_package_exports_every_public_name_once() -> None:
    # isidentifier: pytest's assert rewriting of a package with a plugin adds `@py_builtins`
    exported = {name for name in dir(pybondi) if name.isidentifier() and not name.startswith("_")}
    modules = {name.split(".")[1] for name in MODULES[1:]}
    lazy = set(LAZY) - ({"SQLStore"} if find_spec("sqlalchemy") is None else set())
    assert exported - modules == set(pybondi.__all__) | lazy
    assert len(pybondi.__all__) == len(set(pybondi.__all__))


def test_every_exception_is_importable_from_pybondi() -> None:
    for name in exceptions.__all__:
        assert name in pybondi.__all__
        assert getattr(pybondi, name) is getattr(exceptions, name)


@pytest.mark.parametrize("name", sorted(LAZY))
def test_subpackage_classes_are_importable_from_pybondi(name: str) -> None:
    assert present(name) is getattr(importlib.import_module(LAZY[name]), name)
    assert name not in pybondi.__all__  # `from pybondi import *` needs no extra


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'pybondi' has no attribute 'Sesion'"):
        pybondi.Sesion  # type: ignore[attr-defined]  # noqa: B018


def test_import_pybondi_loads_no_driver_broker_client_or_pydantic() -> None:
    # fast-depends, pybondi's one dependency, may import pydantic itself when installed:
    # what counts is what `import pybondi` and the lazy names add to it.
    loaded = run_python(
        f"""
import json, sys
import fast_depends
before = set(sys.modules)
import pybondi
print(json.dumps(sorted(set(sys.modules) - before)))
from pybondi import {", ".join(name for name in LAZY if name != "SQLStore")}
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    )
    for line in loaded.splitlines():
        imported = {name.split(".")[0] for name in json.loads(line)}
        assert not imported & set(OPTIONAL), imported & set(OPTIONAL)


def test_a_lazy_name_whose_extra_is_missing_says_which_extra_to_install() -> None:
    # A fresh interpreter in which SQLAlchemy cannot be imported, as without the extras.
    printed = run_python(
        """
import pydoc, sys
sys.modules["sqlalchemy"] = None
import pybondi
print("SQLStore" in dir(pybondi), "Worker" in dir(pybondi))
pydoc.render_doc(pybondi)  # gets every name dir() lists
from pybondi import Worker, StateRepository
try:
    from pybondi import SQLStore
except ImportError as error:
    print(type(error).__name__, error)
"""
    )
    listed, error = printed.splitlines()
    assert listed == "False True"  # dir() leaves out what cannot be imported
    assert error.startswith("MissingDependency")
    assert "pip install 'pybondi[sqlite]'" in error


# Depends is fast-depends' own; current_session and current_connection are functions.
CLASSES = sorted({*pybondi.__all__, *LAZY} - {"Depends", "current_connection", "current_session"})


@pytest.mark.parametrize("name", CLASSES)
def test_inspect_finds_the_source_of_every_class(name: str) -> None:
    # inspect looks for a class in the file of sys.modules[cls.__module__] (by name on
    # 3.11 and 3.12, by __firstlineno__ on 3.13, which assigning __module__ deletes): so
    # classes keep the module that defines them.
    cls = present(name)
    assert re.search(rf"^class {cls.__name__}\b", inspect.getsource(cls), flags=re.MULTILINE)


def test_help_and_reprs_name_public_modules() -> None:
    # `help("pybondi.Session")` and `python -m pydoc pybondi.Session` show the name used.
    text = pydoc.plain(pydoc.render_doc("pybondi.Session"))
    assert text.startswith("Python Library Documentation: class Session in pybondi\n")
    assert "\npybondi.Session = class Session(" in text
    # `help(pybondi)` documents every class of __all__ as pybondi's.
    package = pydoc.plain(pydoc.render_doc(pybondi))
    for name in CLASSES:
        if name in pybondi.__all__:
            assert re.search(rf"^    (class )?{name}[ (]", package, flags=re.MULTILINE), name
    # A repr names the class where it is defined, a public module one can import it from,
    # as in pybondi 1.2.1.
    assert repr(pybondi.Session) == "<class 'pybondi.session.Session'>"
    for name in CLASSES:
        if name == "SQLStore" and find_spec("sqlalchemy") is None:
            continue  # the core's own venv
        cls = getattr(pybondi, name)
        assert not any(part.startswith("_") for part in cls.__module__.split("."))
        assert pydoc.locate(f"{cls.__module__}.{cls.__qualname__}") is cls


@pytest.mark.skipif(find_spec("mypy") is None, reason="mypy is a dev tool (pybondi[dev])")
def test_type_checkers_see_every_name_and_reject_a_misspelled_one(tmp_path: Path) -> None:
    # Each `# type: ignore` must be needed (--strict warns about unused ones): a name that
    # a type checker saw as Any would make its line pass, and mypy fail.
    names = sorted({*exceptions.__all__, *LAZY})
    deprecated = ["Base", "Commited"]
    script = "\n".join(
        [
            "import pybondi",
            f"from pybondi import {', '.join(names)}",
            "from pybondi.publisher import Base",
            "from pybondi.session import Commited",
            "",
            "store: MemoryStore = MemoryStore()",
            "registry: Registry = Registry()",
            "retry: Retry = Retry(attempts=3)",
            "events: list[pybondi.Event] = [Commited(pybondi.Aggregate())]",
            "",
            "class Printer(Base):",
            "    def publish(self, topic: str, message: pybondi.Message[str]) -> None:",
            "        print(topic, message.payload)",
            "",
            "def describe(error: PybondiError) -> str:",
            "    return str(error)",
            "",
            *(
                f"{name}_is_typed: int = {name}  # type: ignore[assignment]"
                for name in [*names, *deprecated]
            ),
            "pybondi.Sesion  # type: ignore[attr-defined]",
            "",
        ]
    )
    (tmp_path / "user.py").write_text(script)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(
        [*mypy, "user.py"],
        cwd=tmp_path,  # away from the project's mypy settings
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_imports() -> None:
    from pybondi import Command
    from pybondi.aggregate import Aggregate, Root  # noqa: F401
    from pybondi.messagebus import Command, Depends, Event, Messagebus  # noqa: F401, F811
    from pybondi.publisher import Depends, Message, Publisher  # noqa: F401, F811
    from pybondi.repository import Repository  # noqa: F401
    from pybondi.session import Session  # noqa: F401
