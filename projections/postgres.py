"""The job board on PostgreSQL: rows, metric series, outbox and tracking in one transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Jsonb

from projections.board import (
    METRIC_COLUMNS,
    BoardBatch,
    JobRow,
    Positioned,
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
)

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
        self._copy_metrics = self._sql(
            "COPY {schema}.{metrics} ({cols}) FROM STDIN", cols=_METRIC_COLUMNS
        )
        self._copy_outbox = self._sql("COPY {schema}.{outbox} (position, fields) FROM STDIN")
        self._delete_outbox = self._sql("DELETE FROM {schema}.{outbox} WHERE position <= %s")

    def _sql(self, template: str, **extra: Any) -> Composed:
        return SQL(template).format(**self._names, **extra)

    def project(
        self,
        events: Sequence[Positioned],
        tracking: Tracking,
        *,
        with_updates: bool,
        published_upto: int | None = None,
    ) -> list[Update]:
        """Apply a batch and record `tracking` in one transaction; return its updates."""
        with self.datastore.transaction(commit=True) as curs:
            if not with_updates:
                # A replay publishes nothing, and a commit lost in a crash loses its tracking
                # record with it (the batch is simply applied again): no need to wait for
                # the WAL flush. Live batches keep it, as their updates go out after commit.
                curs.execute("SET LOCAL synchronous_commit TO OFF")
            batch = BoardBatch(self._load(curs, events), with_updates=with_updates)
            batch.apply_all(events)
            self._write(curs, batch)
            if published_upto is not None:
                curs.execute(self._delete_outbox, (published_upto,))
            self._insert_tracking(curs, tracking)
        return batch.updates

    def _load(self, curs: Cursor[DictRow], events: Sequence[Positioned]) -> dict[Any, JobRow]:
        job_ids, metrics_ids = ids_to_load(events)
        if not job_ids and not metrics_ids:
            return {}
        curs.execute(self._select_rows, (list(job_ids), list(metrics_ids)))
        return {row["job_id"]: JobRow(**row) for row in curs.fetchall()}

    def _write(self, curs: Cursor[DictRow], batch: BoardBatch) -> None:
        if batch.rows:  # every row loaded or created was touched by an event of the batch
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
        if batch.metrics:
            # COPY text built here: several times cheaper than psycopg's per-row adaptation,
            # and only the JSON can hold a backslash (escaped, as COPY text requires).
            dumps = stats_json
            # A batch's metric rows share their row's job_id object: key the text by identity
            # (UUID hashes in Python; id() does not).
            ids = {id(row.job_id): str(row.job_id) for row in batch.rows.values()}
            lines = [
                f"{ids[id(job_id)]}\t{attempt}\t{seq}\t"
                f"{step}\t{dumps(stats).replace(BACKSLASH, BACKSLASH * 2)}\t{position}\n"
                for job_id, attempt, seq, step, stats, position in batch.metrics
            ]
            with curs.copy(self._copy_metrics) as copy:
                copy.write("".join(lines))
        if batch.updates:
            with curs.copy(self._copy_outbox) as copy:
                for u in batch.updates:
                    copy.write_row((int(u["position"]), json.dumps(u)))

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
