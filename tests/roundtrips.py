"""Counting how often a client waits for PostgreSQL: libpq's own protocol trace.

Every connection a datastore hands out while counting is traced. A round trip is the client
sending messages and then reading the server's: each turn from frontend to backend messages in
the trace. (Counting ReadyForQuery would miss a pipeline's mid-way fetch, which asks for the
results so far with a Flush, not a Sync.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from eventsourcing.postgres import PostgresDatastore


class RoundTrips:
    """The number of times the client waited for the server while counting."""

    def __init__(self) -> None:
        self.count = 0


@contextmanager
def count_round_trips(datastore: PostgresDatastore, directory: Path) -> Iterator[RoundTrips]:
    """Trace every connection `datastore` hands out meanwhile; count the server's replies."""
    original: Callable[[], AbstractContextManager[psycopg.Connection[Any]]] = (
        datastore.get_connection
    )
    traces: dict[int, tuple[psycopg.Connection[Any], int, Path]] = {}

    @contextmanager
    def traced() -> Iterator[psycopg.Connection[Any]]:
        with original() as conn:
            if id(conn) not in traces:
                path = directory / f"trace-{len(traces)}.txt"
                with path.open("w") as file:
                    fd = os.dup(file.fileno())
                conn.pgconn.trace(fd)
                traces[id(conn)] = (conn, fd, path)
            yield conn

    result = RoundTrips()
    datastore.get_connection = traced  # type: ignore[method-assign]
    try:
        yield result
    finally:
        datastore.get_connection = original  # type: ignore[method-assign,assignment]
        for conn, fd, path in traces.values():
            conn.pgconn.untrace()  # flushes the trace
            os.close(fd)
            result.count += _turns(path.read_text())


def _turns(trace: str) -> int:
    turns, last = 0, ""
    for line in trace.splitlines():
        direction = line.split("\t")[1] if "\t" in line else ""
        if direction == "B" and last == "F":
            turns += 1
        if direction in ("F", "B"):
            last = direction
    return turns
