"""Counting PostgreSQL round trips: libpq's trace of a psycopg connection.

Statement counts (see test_sql_store.SAVE_STATEMENTS) miss BEGIN and COMMIT, which never
pass through SQLAlchemy's cursor, and cannot tell statements sent together in one
pipeline from statements that each waited for an answer. libpq's trace lists every
protocol message, F (frontend: the client) or B (backend: the server), in order: each
run of F messages followed by the server's answer is one round trip.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from psycopg import pq

__all__ = ["count_round_trips", "traced"]


def count_round_trips(trace: str) -> int:
    """The round trips in a libpq trace: how often the client spoke after the server."""
    trips, previous = 0, None
    for line in trace.splitlines():
        direction = line[:2]
        if direction not in ("F\t", "B\t"):
            continue  # a statement's text goes on over several lines
        if direction == "F\t" and previous != "F\t":
            trips += 1
        previous = direction
    return trips


def driver_connection(transaction: Any) -> Any:
    """The psycopg connection under an `SQLTransaction`, sync or async."""
    connection = transaction.connection or transaction.aconnection.sync_connection
    return connection.connection.driver_connection


@contextmanager
def traced(transaction: Any) -> Iterator[list[int]]:
    """Trace the transaction's connection; the list gets the round trips at the end."""
    pgconn = driver_connection(transaction).pgconn
    counted: list[int] = []
    descriptor, path = tempfile.mkstemp(prefix="pybondi-trace-")
    try:
        pgconn.trace(descriptor)
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        try:
            yield counted
        finally:
            pgconn.untrace()
        with open(path, encoding="utf-8", errors="replace") as trace:
            counted.append(count_round_trips(trace.read()))
    finally:
        os.close(descriptor)
        os.unlink(path)
