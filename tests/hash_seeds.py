"""The same state in processes with other hash seeds: a set's order must not reach the JSON.

    PYTHONHASHSEED=3 python -m tests.hash_seeds dump          # the JSON of shelf() and mixed()
    PYTHONHASHSEED=3 python -m tests.hash_seeds add SPEC      # store shelf() in a session
    PYTHONHASHSEED=3 python -m tests.hash_seeds read SPEC     # a session that changes nothing

Text hashes, and so the order a set of text or of frozen dataclasses iterates in, change
with PYTHONHASHSEED. `add` and `read` print the shelf's stored record afterwards, as JSON
`[version, schema, data]`. SPEC is a JSON object: `url` (empty for a MemoryStore, which
`record` then seeds, since a memory store cannot be shared between processes), `schema`,
`prefix`, and `record`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pybondi import Aggregate, Event, Messagebus, Root, Session
from pybondi.persistence import MemoryStore, Record, Records, SQLStore, Store
from pybondi.persistence.repositories import StateRepository
from pybondi.persistence.serialization import Registry


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Line:
    """A value object, as an order line is: equal by value, unorderable."""

    order: str
    sku: str
    qty: int


@dataclass(frozen=True)
class Tagged:
    name: str
    tags: frozenset[str]
    colour: Colour


@dataclass(eq=False)
class Shelf(Aggregate):
    root: Root
    lines: set[Line]
    groups: frozenset[frozenset[str]]  # sets inside a set
    tagged: set[Tagged]  # sets of objects holding sets
    pairs: set[tuple[str, int]]


@dataclass
class Mixed(Event):
    items: set[Any]


def shelf() -> Shelf:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return Shelf(
        Root("s-1"),
        lines={Line(f"o-{word}", word.upper(), len(word)) for word in words},
        groups=frozenset(frozenset(words[i : i + 3]) for i in range(0, 8, 2)),
        tagged={Tagged(w, frozenset(words[:i]), Colour.RED) for i, w in enumerate(words)},
        pairs={(word, len(word)) for word in words} | {("alpha", 1)},
    )


def mixed() -> Mixed:
    return Mixed({1, "a", None, 2.5, ("x", 1), Line("o", "s", 1), frozenset({"b", "c"})})


def registry() -> Registry:
    made = Registry()
    made.register(Shelf, name="hash.Shelf")
    made.register(Mixed, name="hash.Mixed")
    return made


STREAM = "hash.Shelf-s-1"
SEEDS = range(1, 6)


def run(seed: int, *arguments: str) -> str:
    """What this module prints, run in a process of its own with PYTHONHASHSEED=seed."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.hash_seeds", *arguments],
        check=False,  # the error below shows what the process wrote to stderr
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode:
        raise AssertionError(f"tests.hash_seeds {arguments} failed:\n{done.stderr}")
    return done.stdout


def open_store(spec: dict[str, Any]) -> Store:
    if not spec["url"]:
        store = MemoryStore()
        if spec["record"] is not None:
            version, schema, data = spec["record"]
            store.transact(lambda records: records.write(Record(STREAM, version, schema, data), 0))
        return store
    return SQLStore(spec["url"], schema=spec["schema"], prefix=spec["prefix"])


def stored(records: Records) -> list[Any]:
    record = records.read(STREAM)
    return [] if record is None else [record.version, record.schema, record.data]


def main(action: str, spec_text: str = "") -> None:
    if action == "dump":
        types = registry()
        print(types.dumps(shelf()).data)
        print(types.dumps(mixed()).data)
        return
    spec = json.loads(spec_text)
    store = open_store(spec)
    repository = StateRepository(store, Shelf, registry())
    with Session(Messagebus(), repository) as session:
        if action == "add":
            session.add(shelf())
        else:
            session.repository.get("s-1")  # and change nothing
    print(json.dumps(store.transact(stored)))
    if isinstance(store, SQLStore):
        store.dispose()


if __name__ == "__main__":
    main(*sys.argv[1:])
