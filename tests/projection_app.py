"""A projection for `pybondi project` in tests: one row per event handled, no constraint.

The rows go to `<prefix>effects` (the prefix from $PYBONDI_TEST_PREFIX), with the event's
position, key and number, and nothing keeps a row from being written twice: a test
counts them with plain SQL, as an independent check that each event's effect happened
exactly once. `projection` has `async def` handlers (the command's default, an async
store), `sync_projection` sync ones (`--sync`); `broken` fails on every event.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from pybondi import Depends, Event, current_connection
from pybondi.persistence import StoredEvent
from pybondi.persistence.serialization import Registry
from pybondi.projection import Projection, ProjectionReset, stored_event

registry = Registry()


@registry.register(name="tests.Numbered")
@dataclass(frozen=True)
class Numbered(Event):
    key: str
    n: int


def effects_table(prefix: str, schema: str | None = None) -> sa.Table:
    return sa.Table(
        f"{prefix}effects",
        sa.MetaData(schema=schema),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("key", sa.String(50), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
    )


effects = effects_table(
    os.environ.get("PYBONDI_TEST_PREFIX", "pybondi_"), os.environ.get("PYBONDI_TEST_SCHEMA")
)

projection = Projection("effects", registry)


@projection.on
async def record(
    event: Numbered,
    connection: Any = Depends(current_connection),
    at: StoredEvent = Depends(stored_event),
) -> None:
    await connection.execute(
        effects.insert().values(position=at.position, key=event.key, n=event.n)
    )


@projection.reset
async def clear(reset: ProjectionReset, connection: Any = Depends(current_connection)) -> None:
    await connection.execute(effects.delete())


sync_projection = Projection("effects", registry)


@sync_projection.on
def record_sync(
    event: Numbered,
    connection: Any = Depends(current_connection),
    at: StoredEvent = Depends(stored_event),
) -> None:
    connection.execute(effects.insert().values(position=at.position, key=event.key, n=event.n))


broken = Projection("broken", registry)


@broken.on
def fail(event: Numbered) -> None:
    raise RuntimeError(f"cannot handle {event.n}")


not_a_projection = object()
