"""What the `pybondi project` tests share: a store of a test's own, and the command.

`Setup` makes the store's tables and tests/projection_app.py's effects table, appends
numbered events, starts `python -m pybondi project ...` on them, and reads back the
effects (one row per event handled, written by the projection) with plain SQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from pybondi.persistence import SQLStore, StoredEvent
from tests.backends import Backend
from tests.projection_app import Numbered, effects_table, registry

ROOT = Path(__file__).parent.parent
WAIT = 60.0  # seconds at most for the command to catch up: a busy machine is slow


class Setup:
    """A store of the test's own, the effects table, and the command line for it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.prefix = f"c{uuid.uuid4().hex[:8]}_"
        store = backend.store(prefix=self.prefix)
        assert isinstance(store, SQLStore)
        self.store = store
        store.create_tables()
        self.effects = effects_table(self.prefix, backend.namespace)
        assert isinstance(store.engine, sa.Engine)
        self.effects.metadata.create_all(store.engine)

    def append(self, count: int, start: int = 0) -> None:
        rows = []
        for n in range(start, start + count):
            serialized = registry.dumps(Numbered(f"k{n % 3}", n))
            rows.append(StoredEvent(f"numbers-{n}", 1, serialized.name, 1, serialized.data))
        self.store.transact(lambda records: records.append(rows))

    def command(self, *arguments: str) -> list[str]:
        schema = ["--schema", self.backend.namespace] if self.backend.namespace else []
        return [
            sys.executable, "-m", "pybondi", "project", *arguments, "--store",
            self.backend.url, "--prefix", self.prefix, *schema, "--idle", "0.05",
            "--report-every", "0", "--grace", "5",
        ]  # fmt: skip

    def start(self, *arguments: str, stderr: IO[str] | None = None) -> subprocess.Popen[str]:
        environment = {
            **os.environ,
            "PYBONDI_TEST_PREFIX": self.prefix,
            "PYBONDI_TEST_SCHEMA": self.backend.namespace or "",
        }
        if not self.backend.namespace:
            del environment["PYBONDI_TEST_SCHEMA"]
        return subprocess.Popen(
            self.command(*arguments), cwd=ROOT, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE,
        )  # fmt: skip

    def rows(self) -> list[Any]:
        with self.store.engine.connect() as connection:  # type: ignore[union-attr]
            return list(connection.execute(sa.select(self.effects.c.position)))

    def checkpoint(self, name: str = "effects") -> Any:
        return self.store.transact(lambda records: records.projections.get(name))

    def wait_for(self, rows: int, process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            checkpoint = self.checkpoint()
            if len(self.rows()) == rows and checkpoint and checkpoint.position == rows:
                return
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        raise AssertionError(f"the command did not catch up to {rows} within {WAIT} s")


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr
