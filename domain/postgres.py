"""A PostgreSQL application recorder that saves a batch of events in one round trip.

The library's recorder sends a batch as one array of a composite type, which psycopg
escapes field by field in Python: for a batch of progress reports that costs more than
the insert itself. Four arrays (ids, versions, topics, states) carry the same rows and
dump several times faster.

The library's save also waits for the server five times: it syncs its pipeline after
the INSERT, and psycopg's transaction block syncs again when it starts and ends. Here
the whole transaction goes in one pipeline with one sync (`pipelined_transaction`). The
statements are the library's own — the table lock that keeps notification ids in commit
order, NOTIFY, returning the ids — and a unique violation (another writer saved the same
aggregate version first) still surfaces as the library's `IntegrityError`.

`StoreFactory` is the library's PostgreSQL factory with one change: recorders create their
tables, types and functions one process at a time (every process of an installation does it
at start). Both are selected by topic in `StoreSettings.eventsourcing_env()`; nothing in the
domain imports them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import psycopg
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InterfaceError,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import (
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresFactory,
    TPostgresTrackingRecorder,
)
from eventsourcing.utils import retry
from psycopg import Connection, Cursor
from psycopg.errors import PipelineAborted
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composable, Identifier


class ArrayInsertRecorder(PostgresApplicationRecorder):
    """PostgresApplicationRecorder with a faster batch insert."""

    def __init__(
        self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"
    ) -> None:
        super().__init__(datastore, events_table_name=events_table_name)
        self.insert_events_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%s::{id_type}[], %s::bigint[], %s::text[], %s::bytea[]) "
            "RETURNING notification_id"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
            id_type=Identifier(self.datastore.originator_id_type),
        )
        # The save's statements rendered once (a composed statement is joined and its
        # identifiers escaped again on every execution).
        self._insert_arrays = self.insert_events_statement.as_bytes()
        self._lock_statements = [_rendered(s) for s in self.lock_table_statements]
        self._notify = SQL("NOTIFY {0}").format(Identifier(self.channel_name)).as_bytes()

    def _insert_stored_events(
        self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent], **_: Any
    ) -> None:
        # The library's `_lock_table` and `_notify_channel`, with the statements rendered once.
        for statement in self._lock_statements:
            curs.execute(statement, prepare=True)
        curs.execute(self._notify)
        curs.execute(
            self._insert_arrays,
            (
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ),
        )

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """Insert the events in one transaction; their notification ids."""
        if self.datastore.enable_db_functions:
            return cast("Sequence[int] | None", super().insert_events(stored_events, **kwargs))
        if not stored_events:
            return None
        return cast("Sequence[int]", self._insert_in_one_round_trip(stored_events, **kwargs))

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_in_one_round_trip(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        """BEGIN, the lock, NOTIFY, the INSERT and COMMIT in one round trip.

        A failure is raised inside `get_connection`, which translates it: a unique violation
        (another writer saved the same aggregate version first) becomes `IntegrityError`.
        """
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            with pipelined_transaction(conn):
                self._insert_events(curs, stored_events, **kwargs)
                self._insert_stored_events(curs, stored_events, **kwargs)
            return self._fetch_ids_after_insert_events(curs, stored_events, **kwargs)


@contextlib.contextmanager
def pipelined_transaction(conn: Connection[Any]) -> Iterator[None]:
    """A transaction whose statements, BEGIN and COMMIT included, go in one pipeline.

    The statements executed in the block are sent with one sync at its end: one round trip,
    unless the block itself fetches a result (which syncs there). psycopg's own
    `Connection.transaction()` in pipeline mode syncs when it starts and again when it ends.
    If a statement fails, the server skips the rest up to the sync (COMMIT too, so nothing
    is committed) and psycopg raises the failure there; the transaction, left aborted, is
    rolled back and the failure re-raised. An exception from the block rolls back too.
    """
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
    except psycopg.Error as error:
        _roll_back(conn)
        raise _first_failure(error) from None
    except BaseException:
        _roll_back(conn)
        raise


def _rendered(statement: object) -> bytes:
    if isinstance(statement, Composable):
        return statement.as_bytes()
    if isinstance(statement, str):
        return statement.encode()
    assert isinstance(statement, bytes), statement
    return statement


def _first_failure(error: psycopg.Error) -> psycopg.Error:
    """The statement failure behind `error`, not the skipping of the statements after it.

    When psycopg meets the failure before the end of the pipeline's results, it goes on
    collecting the rest, and the skipped COMMIT's `PipelineAborted` is raised with the
    failure as its context.
    """
    cause: BaseException | None = error
    while isinstance(cause, PipelineAborted):
        cause = cause.__context__
    return cause if isinstance(cause, psycopg.Error) else error


def _roll_back(conn: Connection[Any]) -> None:
    """End the failed transaction, or close the connection so the pool replaces it."""
    if conn.closed or conn.info.transaction_status is TransactionStatus.IDLE:
        return
    try:
        conn.rollback()
    except psycopg.Error:
        conn.close()


def ddl_lock_key(schema: str) -> int:
    """The advisory lock key under which one schema's tables are created."""
    digest = hashlib.sha256(f"trainyard:ddl:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class StoreFactory(PostgresFactory):
    """The library's PostgreSQL factory; its recorders create their tables one at a time.

    Every process of an installation (gateway workers, handlers, projections) creates the
    tables it uses when it starts, and they start together. The library's statements are
    idempotent one at a time but not concurrently: PostgreSQL refuses two concurrent
    `CREATE OR REPLACE FUNCTION` of one function ("tuple concurrently updated"), and two
    concurrent first `CREATE TABLE IF NOT EXISTS` of one table with a unique violation. A
    session advisory lock per schema, held while a recorder creates its tables, serializes them.
    """

    def application_recorder(self) -> ApplicationRecorder:
        """The events recorder, its tables created under the schema's DDL lock."""
        with self._ddl_lock():
            return super().application_recorder()

    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        """An aggregate recorder (snapshots), its table created under the schema's DDL lock."""
        with self._ddl_lock():
            return super().aggregate_recorder(purpose)

    def tracking_recorder(
        self, tracking_recorder_class: type[TPostgresTrackingRecorder] | None = None
    ) -> TPostgresTrackingRecorder:
        """A tracking recorder (or view), its tables created under the schema's DDL lock."""
        with self._ddl_lock():
            return super().tracking_recorder(tracking_recorder_class)

    @contextlib.contextmanager
    def _ddl_lock(self) -> Iterator[None]:
        if not self.env_create_table():
            yield
            return
        key = ddl_lock_key(self.datastore.schema)
        # A connection of its own: creating the tables takes others from the pool meanwhile.
        with self.datastore.get_connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                with contextlib.suppress(psycopg.Error):  # a broken session holds no lock
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
