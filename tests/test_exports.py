"""The public namespace is what `__all__` says, in every public module."""

from __future__ import annotations

import importlib

import fast_depends
import pytest

import pybondi

MODULES = [
    "pybondi",
    "pybondi.aggregate",
    "pybondi.callbacks",
    "pybondi.depends",
    "pybondi.envelope",
    "pybondi.events",
    "pybondi.exceptions",
    "pybondi.messagebus",
    "pybondi.messages",
    "pybondi.outbox",
    "pybondi.publisher",
    "pybondi.repositories",
    "pybondi.repository",
    "pybondi.serialization",
    "pybondi.session",
    "pybondi.stores",
    "pybondi.stores.base",
    "pybondi.stores.memory",
    "pybondi.stores.sql",
    "pybondi.tracing",
    "pybondi.brokers",
    "pybondi.brokers.base",
    "pybondi.brokers.redis",
    "pybondi.brokers.rabbitmq",
    "pybondi.brokers.nats",
    "pybondi.relay",
    "pybondi.consumer",
    "pybondi.worker",
    "pybondi.deadletters",
    "pybondi.cli",
    "pybondi.testing",
    "pybondi.testing.scenarios",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
    for public in module.__all__:
        value = getattr(module, public)
        if value is fast_depends.Depends:
            continue  # fast-depends' own marker, re-exported on purpose
        assert getattr(value, "__doc__", None), f"{name}.{public} has no docstring"


def test_package_exports_every_public_name_once() -> None:
    exported = {name for name in dir(pybondi) if not name.startswith("_")}
    modules = {name.split(".")[1] for name in MODULES[1:]}
    assert exported - modules == set(pybondi.__all__)
    assert len(pybondi.__all__) == len(set(pybondi.__all__))


def test_public_classes_show_the_package_name() -> None:
    assert repr(pybondi.Session) == "<class 'pybondi.Session'>"


def test_readme_imports() -> None:
    from pybondi import Command
    from pybondi.aggregate import Aggregate, Root  # noqa: F401
    from pybondi.messagebus import Command, Depends, Event, Messagebus  # noqa: F401, F811
    from pybondi.publisher import Depends, Message, Publisher  # noqa: F401, F811
    from pybondi.repository import Repository  # noqa: F401
    from pybondi.session import Session  # noqa: F401
