"""One active runner per projection, and a way for it to wait for new events.

Two runners on one projection both try to record the same positions: one fails and dies
(the tracking record refuses a position it already has), so correctness never depended on
a lock. The lock makes the second runner a quiet standby instead: it waits for the lock
and takes over when the active runner's process (and so its session or file lock) ends.

- PostgreSQL: a session advisory lock, keyed by database schema and projection name, held
  on a dedicated connection. The same connection LISTENs on the events table's channel,
  so the runner wakes when events are committed; if the connection breaks, the lock is
  gone and the runner stops with an error instead of writing on as a second leader.
- SQLite: an exclusive `flock` on a file next to the database; new events are polled.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)


class Leader(Protocol):
    """The single-runner lock of a projection, and a waiter for new events."""

    def acquire(self, stop: threading.Event, retry_every: float = 1.0) -> bool:
        """Take the lock, waiting for it; False if `stop` was set first."""

    def wait_for_events(self, timeout: float) -> None:
        """Return when new events may have been recorded, or after `timeout` seconds."""

    def close(self) -> None:
        """Release the lock."""


def advisory_key(schema: str, projection: str) -> int:
    """A stable signed 64-bit advisory lock key for one projection in one schema."""
    digest = hashlib.sha256(f"trainyard:{schema}:{projection}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresLeader:
    """An advisory lock and LISTEN on one dedicated PostgreSQL connection."""

    def __init__(self, conninfo: dict[str, Any], schema: str, projection: str, channel: str):
        self.conninfo = conninfo
        self.key = advisory_key(schema, projection)
        self.channel = channel
        self.conn: psycopg.Connection[Any] | None = None

    def acquire(self, stop: threading.Event, retry_every: float = 1.0) -> bool:
        """Take the lock, waiting for it; False if `stop` was set first."""
        self.close()
        conn = self.conn = psycopg.connect(**self.conninfo, autocommit=True)
        said = False
        while not stop.is_set():
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            if row is not None and row[0]:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                return True
            if not said:
                log.info("another runner holds the job board lock; standing by")
                said = True
            stop.wait(retry_every)
        self.close()
        return False

    def wait_for_events(self, timeout: float) -> None:
        """Return on a NOTIFY from an events insert, or after `timeout` seconds."""
        assert self.conn is not None, "acquire() first"
        for _ in self.conn.notifies(timeout=timeout, stop_after=1):
            pass
        # Drain the rest: one read catches up on all of them.
        for _ in self.conn.notifies(timeout=0):
            pass

    def close(self) -> None:
        """Release the lock (closing the session releases it too)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class FileLeader:
    """An exclusive flock on a file, and polling (SQLite has no LISTEN)."""

    def __init__(self, path: Path, stop: threading.Event | None = None) -> None:
        self.path = path
        self.fd: int | None = None
        self._sleeper = stop or threading.Event()

    def acquire(self, stop: threading.Event, retry_every: float = 1.0) -> bool:
        """Take the lock, waiting for it; False if `stop` was set first."""
        self.close()
        self._sleeper = stop
        fd = self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        said = False
        while not stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    log.info("another runner holds %s; standing by", self.path)
                    said = True
                stop.wait(retry_every)
            else:
                return True
        self.close()
        return False

    def wait_for_events(self, timeout: float) -> None:
        """Sleep `timeout` seconds, or less if the runner is stopping."""
        self._sleeper.wait(timeout)

    def close(self) -> None:
        """Release the lock."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
