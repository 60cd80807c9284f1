"""The job board on PostgreSQL: rows, metric series, outbox and tracking in one transaction."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Connection, Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier
from psycopg.types.json import Jsonb

from domain.postgres import pipelined_transaction
from projections.board import (
    METRIC_COLUMNS,
    BoardBatch,
    JobRow,
    Positioned,
    RowCache,
    Update,
    ids_to_load,
    stats_json,
)
from projections.view import JOBS_TABLE, METRICS_TABLE, OUTBOX_TABLE

BACKSLASH = "\\"

_DDL = (
    "CREATE TABLE IF NOT EXISTS {schema}.{jobs} ("
    " job_id uuid PRIMARY KEY,"
    " metrics_id uuid UNIQUE,"
    " client_id text NOT NULL,"
    " status text NOT NULL,"
    " attempt integer NOT NULL,"
    " node_id text,"
    " submitted_at timestamptz NOT NULL,"
    " updated_at timestamptz NOT NULL,"
    " started_at timestamptz,"
    " finished_at timestamptz,"
    " reason text,"
    " model_key text,"
    " model_sha256 text,"
    " cancel_requested boolean NOT NULL,"
    " latest_seq integer,"
    " latest_step bigint,"
    " latest_stats jsonb,"
    " position bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS {jobs_client_index} ON {schema}.{jobs} "
    "(client_id, submitted_at DESC)",
    # The series' stats are `json` (checked, stored as text): cheaper to ingest than `jsonb`
    # in a replay, and read back whole. The one latest_stats per job above is `jsonb`.
    "CREATE TABLE IF NOT EXISTS {schema}.{metrics} ("
    " job_id uuid NOT NULL,"
    " attempt integer NOT NULL,"
    " seq integer NOT NULL,"
    " step bigint NOT NULL,"
    " stats json NOT NULL,"
    " position bigint NOT NULL,"
    " PRIMARY KEY (job_id, attempt, seq))",
    "CREATE TABLE IF NOT EXISTS {schema}.{outbox} ("
    " position bigint PRIMARY KEY,"
    " fields jsonb NOT NULL)",
    # The library's tracking insert, as a function that fails when the position is not past
    # the recorded one (another runner recorded it): a pipelined transaction then rolls back
    # without a round trip of its own to check a RETURNING row.
    "CREATE OR REPLACE FUNCTION {schema}.{track}(app text, pos bigint) RETURNS void "
    "LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO {schema}.{tracking} AS t (application_name, notification_id) VALUES (app, pos)"
    " ON CONFLICT (application_name) DO UPDATE SET notification_id = EXCLUDED.notification_id"
    " WHERE t.notification_id < EXCLUDED.notification_id;"
    " IF NOT FOUND THEN"
    "  RAISE EXCEPTION 'position % of % is already recorded', pos, app"
    "  USING ERRCODE = 'unique_violation';"
    " END IF;"
    " END $$",
)


@dataclass
class PreparedReplay:
    """A replay batch applied in memory, and the call that writes it in one transaction."""

    batch: BoardBatch
    write: Callable[[], None]


_JOB_COLUMNS = SQL(", ").join(Identifier(c) for c in JobRow.COLUMNS)
_METRIC_COLUMNS = SQL(", ").join(Identifier(c) for c in METRIC_COLUMNS)


class PostgresJobBoardView(PostgresTrackingRecorder):
    """The `jobs` and `job_metrics` tables, tracked in `jobboard_tracking`."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        names = {
            "schema": Identifier(self.datastore.schema),
            "jobs": Identifier(JOBS_TABLE),
            "metrics": Identifier(METRICS_TABLE),
            "outbox": Identifier(OUTBOX_TABLE),
            "jobs_client_index": Identifier(f"{JOBS_TABLE}_client_idx"),
            "tracking": Identifier(self.tracking_table_name),
            "track": Identifier(f"{self.tracking_table_name}_record"),
        }
        self._names = names
        self.sql_create_statements.extend(SQL(s).format(**names) for s in _DDL)
        self._select_rows = self._sql(
            "SELECT {cols} FROM {schema}.{jobs} "
            "WHERE job_id = ANY(%s::uuid[]) OR metrics_id = ANY(%s::uuid[])",
            cols=_JOB_COLUMNS,
        )
        updates = SQL(", ").join(
            SQL("{0} = EXCLUDED.{0}").format(Identifier(c)) for c in JobRow.COLUMNS[1:]
        )
        self._upsert_row = self._sql(
            "INSERT INTO {schema}.{jobs} ({cols}) VALUES ({params}) "
            "ON CONFLICT (job_id) DO UPDATE SET {updates}",
            cols=_JOB_COLUMNS,
            params=SQL(", ").join(SQL("%s") for _ in JobRow.COLUMNS),
            updates=updates,
        )
        self._insert_metrics = self._sql(
            "INSERT INTO {schema}.{metrics} ({cols}) SELECT * FROM unnest("
            "%s::uuid[], %s::integer[], %s::integer[], %s::bigint[], %s::json[], %s::bigint[])",
            cols=_METRIC_COLUMNS,
        )
        self._insert_outbox = self._sql(
            "INSERT INTO {schema}.{outbox} (position, fields) "
            "SELECT * FROM unnest(%s::bigint[], %s::jsonb[])"
        )
        self._copy_metrics = self._sql(
            "COPY {schema}.{metrics} ({cols}) FROM STDIN", cols=_METRIC_COLUMNS
        )
        self._track = self._sql("SELECT {schema}.{track}(%s, %s)")
        self._delete_outbox = self._sql("DELETE FROM {schema}.{outbox} WHERE position <= %s")

    def _sql(self, template: str, **extra: Any) -> bytes:
        # Rendered once: a composed statement is joined and its identifiers escaped again on
        # every execution, a visible share of a live batch's CPU.
        return SQL(template).format(**self._names, **extra).as_bytes()

    def project(
        self,
        events: Sequence[Positioned],
        tracking: Tracking,
        *,
        with_updates: bool,
        published_upto: int | None = None,
        cache: RowCache | None = None,
    ) -> list[Update]:
        """Apply a batch and record `tracking` in one transaction; return its updates.

        Rows in `cache` are not read again; the batch's rows go into it after the commit.
        """
        job_ids, metrics_ids = ids_to_load(events)
        rows: dict[UUID, JobRow] = {}
        if cache is not None:
            rows, job_ids, metrics_ids = cache.lookup(job_ids, metrics_ids)
        if with_updates:
            with self.datastore.get_connection() as conn:
                batch = self._apply_live(
                    conn, events, tracking, rows, job_ids, metrics_ids, published_upto
                )
        else:
            if job_ids or metrics_ids:
                with self.datastore.get_connection() as conn, conn.cursor() as curs:
                    rows.update(self._load(curs, job_ids, metrics_ids))
            prepared = self._prepare_replay(events, tracking, rows)
            prepared.write()
            batch = prepared.batch
        if cache is not None:
            cache.store(batch.rows.values())
        return batch.updates

    def _apply_live(
        self,
        conn: Connection[DictRow],
        events: Sequence[Positioned],
        tracking: Tracking,
        rows: dict[UUID, JobRow],
        job_ids: set[UUID],
        metrics_ids: set[UUID],
        published_upto: int | None = None,
    ) -> BoardBatch:
        """The live path, in one pipeline: a batch of cached jobs costs one round trip.

        Rows the cache lacks are read first (a round trip, only then); the writes, the outbox,
        the outbox rows already published and the tracking record go with the COMMIT.
        """
        with conn.cursor() as curs, pipelined_transaction(conn):
            if job_ids or metrics_ids:
                rows.update(self._load(curs, job_ids, metrics_ids))
            batch = BoardBatch(rows, with_updates=True)
            batch.apply_all(events)
            self._upsert_rows(curs, batch)
            if batch.metrics:
                # One array per column (COPY is not available in a pipeline).
                job_col, attempts, seqs, steps, stats, positions = zip(*batch.metrics, strict=True)
                curs.execute(
                    self._insert_metrics,
                    (
                        list(job_col),
                        list(attempts),
                        list(seqs),
                        list(steps),
                        [stats_json(s) for s in stats],
                        list(positions),
                    ),
                )
            if batch.updates:
                curs.execute(
                    self._insert_outbox,
                    (
                        [int(u["position"]) for u in batch.updates],
                        [json.dumps(u) for u in batch.updates],
                    ),
                )
            if published_upto is not None:
                curs.execute(self._delete_outbox, (published_upto,))
            curs.execute(self._track, (tracking.application_name, tracking.notification_id))
        return batch

    def prepare_replay(
        self,
        events: Sequence[Positioned],
        tracking: Tracking,
        cache: RowCache,
        settle: Callable[[], None],
    ) -> PreparedReplay:
        """Apply a replay batch in memory; its `write` records it, in any thread.

        Rows the cache lacks are read after `settle()`, which waits for earlier batches'
        writes. The cache is not updated: the caller decides when the rows count as written.
        """
        job_ids, metrics_ids = ids_to_load(events)
        rows, job_ids, metrics_ids = cache.lookup(job_ids, metrics_ids)
        if job_ids or metrics_ids:
            settle()
            with self.datastore.get_connection() as conn, conn.cursor() as curs:
                rows.update(self._load(curs, job_ids, metrics_ids))
        return self._prepare_replay(events, tracking, rows)

    def _prepare_replay(
        self, events: Sequence[Positioned], tracking: Tracking, rows: dict[UUID, JobRow]
    ) -> PreparedReplay:
        batch = BoardBatch(rows, with_updates=False)
        batch.apply_all(events)
        # COPY text built here: several times cheaper than psycopg's per-row adaptation or
        # arrays of JSON text, and only the JSON can hold a backslash (escaped, as COPY text
        # requires). A batch's metric rows share their row's job_id object: key the text by
        # identity (UUID hashes in Python; id() does not).
        ids = {id(row.job_id): str(row.job_id) for row in batch.rows.values()}
        copy_text = "".join(
            [
                f"{ids[id(job_id)]}\t{attempt}\t{seq}\t"
                f"{step}\t{stats_json(stats).replace(BACKSLASH, BACKSLASH * 2)}\t{position}\n"
                for job_id, attempt, seq, step, stats, position in batch.metrics
            ]
        )

        def write() -> None:
            with (
                self.datastore.get_connection() as conn,
                conn.transaction(),
                conn.cursor() as curs,
            ):
                # A commit lost in a crash loses its tracking record with it (the batch is
                # simply applied again): no need to wait for the WAL flush. Live batches
                # wait, as their updates go out after the commit.
                curs.execute("SET LOCAL synchronous_commit TO OFF")
                self._upsert_rows(curs, batch)
                if copy_text:
                    with curs.copy(self._copy_metrics) as copy:
                        copy.write(copy_text)
                curs.execute(self._track, (tracking.application_name, tracking.notification_id))

        return PreparedReplay(batch, write)

    def _load(
        self, curs: Cursor[DictRow], job_ids: set[UUID], metrics_ids: set[UUID]
    ) -> dict[UUID, JobRow]:
        curs.execute(self._select_rows, (list(job_ids), list(metrics_ids)))
        return {row["job_id"]: JobRow(**row) for row in curs.fetchall()}

    def _upsert_rows(self, curs: Cursor[DictRow], batch: BoardBatch) -> None:
        if not batch.rows:
            return
        # Every row loaded or created was touched by an event of the batch.
        rows = [row.values() for _, row in sorted(batch.rows.items())]
        stats_at = JobRow.COLUMNS.index("latest_stats")
        curs.executemany(
            self._upsert_row,
            [
                (
                    *r[:stats_at],
                    None if r[stats_at] is None else Jsonb(r[stats_at], dumps=stats_json),
                    *r[stats_at + 1 :],
                )
                for r in rows
            ],
        )

    def pending_updates(self) -> list[Update]:
        """Updates committed but maybe not yet published, in log order."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(self._sql("SELECT fields FROM {schema}.{outbox} ORDER BY position"))
            return [dict(row["fields"]) for row in curs.fetchall()]

    def drop(self, application_name: str) -> None:
        """Drop the tables and the tracking record, so a rebuild starts from the log's start."""
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(
                self._sql(
                    "DROP TABLE IF EXISTS {schema}.{jobs}, {schema}.{metrics}, {schema}.{outbox}"
                )
            )
            curs.execute(
                SQL("DELETE FROM {0}.{1} WHERE application_name = %s").format(
                    Identifier(self.datastore.schema), Identifier(self.tracking_table_name)
                ),
                (application_name,),
            )

    def dump(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every row of `jobs` and `job_metrics` as plain values, in key order."""
        with self.datastore.transaction(commit=False) as curs:
            curs.execute(
                self._sql("SELECT {cols} FROM {schema}.{jobs} ORDER BY job_id", cols=_JOB_COLUMNS)
            )
            jobs = [dict(r) for r in curs.fetchall()]
            curs.execute(
                self._sql(
                    "SELECT {cols} FROM {schema}.{metrics} ORDER BY job_id, attempt, seq",
                    cols=_METRIC_COLUMNS,
                )
            )
            metrics = [dict(r) for r in curs.fetchall()]
        return jobs, metrics

    def close(self) -> None:
        """Release the view's connections."""
        self.datastore.close()
