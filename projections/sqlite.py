"""The job board on SQLite (local mode): the same tables as on PostgreSQL, in the store's file."""

# Table and column names in these statements are module constants, never input.
# ruff: noqa: S608

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Tracking
from eventsourcing.sqlite import SQLiteCursor, SQLiteDatastore, SQLiteTrackingRecorder

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
from projections.view import JOBS_TABLE, METRICS_TABLE, OUTBOX_TABLE, TRACKING_TABLE

_UUIDS = frozenset({"job_id", "metrics_id"})
_TIMES = frozenset({"submitted_at", "updated_at", "started_at", "finished_at"})
_JSON = frozenset({"latest_stats", "stats"})
_JOB_COLUMNS = ", ".join(JobRow.COLUMNS)
_METRIC_COLUMNS = ", ".join(METRIC_COLUMNS)

_DDL = [
    f"CREATE TABLE IF NOT EXISTS {JOBS_TABLE} ("
    " job_id TEXT PRIMARY KEY, metrics_id TEXT UNIQUE, client_id TEXT NOT NULL,"
    " status TEXT NOT NULL, attempt INTEGER NOT NULL, node_id TEXT,"
    " submitted_at TEXT NOT NULL, updated_at TEXT NOT NULL, started_at TEXT, finished_at TEXT,"
    " reason TEXT, model_key TEXT, model_sha256 TEXT, cancel_requested INTEGER NOT NULL,"
    " latest_seq INTEGER, latest_step INTEGER, latest_stats TEXT, position INTEGER NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {JOBS_TABLE}_client_idx ON {JOBS_TABLE} "
    "(client_id, submitted_at DESC)",
    f"CREATE TABLE IF NOT EXISTS {METRICS_TABLE} ("
    " job_id TEXT NOT NULL, attempt INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " step INTEGER NOT NULL, stats TEXT NOT NULL,"
    " position INTEGER NOT NULL, PRIMARY KEY (job_id, attempt, seq)) WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS {OUTBOX_TABLE} ("
    " position INTEGER PRIMARY KEY, fields TEXT NOT NULL)",
]


def _to_db(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in _UUIDS:
        return str(value)
    if column in _TIMES:
        return value.isoformat()
    if column in _JSON:
        return stats_json(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _from_db(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in _UUIDS:
        return UUID(value)
    if column in _TIMES:
        return datetime.fromisoformat(value)
    if column in _JSON:
        return json.loads(value)
    if column == "cancel_requested":
        return bool(value)
    return value


class SQLiteJobBoardView(SQLiteTrackingRecorder):
    """The `jobs` and `job_metrics` tables, tracked in `jobboard_tracking`.

    The library's SQLite tracking table is one `tracking` table for every projection in
    the file, keyed by the application name only: two projections of the Jobs application
    would overwrite each other's position. This view keeps its own tracking table.
    """

    def __init__(self, datastore: SQLiteDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        assert self.datastore.single_row_tracking, "the job board tracks one row per application"
        self.insert_tracking_statement = (
            f"INSERT INTO {TRACKING_TABLE} VALUES (:application_name, :notification_id) "
            "ON CONFLICT (application_name) DO UPDATE SET notification_id = :notification_id "
            f"WHERE {TRACKING_TABLE}.notification_id < :notification_id "
            "RETURNING notification_id"
        )
        self.select_max_tracking_id_statement = (
            f"SELECT MAX(notification_id) FROM {TRACKING_TABLE} WHERE application_name=?"
        )
        params = ", ".join("?" for _ in JobRow.COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in JobRow.COLUMNS[1:])
        self._upsert_row = (
            f"INSERT INTO {JOBS_TABLE} ({_JOB_COLUMNS}) VALUES ({params}) "
            f"ON CONFLICT (job_id) DO UPDATE SET {updates}"
        )
        self._insert_metric = (
            f"INSERT INTO {METRICS_TABLE} ({_METRIC_COLUMNS}) "
            f"VALUES ({', '.join('?' for _ in METRIC_COLUMNS)})"
        )

    def construct_create_table_statements(self) -> list[str]:
        """The library's statements with its shared `tracking` table renamed, plus ours."""
        statements = [
            s.replace("EXISTS tracking (", f"EXISTS {TRACKING_TABLE} (")
            for s in super().construct_create_table_statements()
        ]
        return statements + _DDL

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
        with self.datastore.transaction(commit=True) as c:
            # Take the write lock before reading: a read transaction that later writes fails at
            # once ("database is locked", no busy wait) if another process wrote in between.
            c.execute(f"DELETE FROM {OUTBOX_TABLE} WHERE 0")
            if job_ids or metrics_ids:
                rows.update(self._load(c, job_ids, metrics_ids))
            batch = BoardBatch(rows, with_updates=with_updates)
            batch.apply_all(events)
            self._write(c, batch)
            if published_upto is not None:
                c.execute(f"DELETE FROM {OUTBOX_TABLE} WHERE position <= ?", (published_upto,))
            self._insert_tracking(c, tracking)
        if cache is not None:
            cache.store(batch.rows.values())
        return batch.updates

    def _load(
        self, c: SQLiteCursor, job_ids: set[UUID], metrics_ids: set[UUID]
    ) -> dict[UUID, JobRow]:
        c.execute(
            f"SELECT {_JOB_COLUMNS} FROM {JOBS_TABLE} "
            "WHERE job_id IN (SELECT value FROM json_each(?)) "
            "OR metrics_id IN (SELECT value FROM json_each(?))",
            (json.dumps([str(i) for i in job_ids]), json.dumps([str(i) for i in metrics_ids])),
        )
        rows = [
            JobRow(**{col: _from_db(col, row[col]) for col in JobRow.COLUMNS})
            for row in c.fetchall()
        ]
        return {row.job_id: row for row in rows}

    def _write(self, c: SQLiteCursor, batch: BoardBatch) -> None:
        if batch.rows:  # every row loaded or created was touched by an event of the batch
            c.executemany(
                self._upsert_row,
                [
                    tuple(
                        _to_db(col, v) for col, v in zip(JobRow.COLUMNS, row.values(), strict=True)
                    )
                    for _, row in sorted(batch.rows.items())
                ],
            )
        if batch.metrics:
            dumps = stats_json
            c.executemany(
                self._insert_metric,
                [
                    (str(job_id), attempt, seq, step, dumps(stats), position)
                    for job_id, attempt, seq, step, stats, position in batch.metrics
                ],
            )
        if batch.updates:
            c.executemany(
                f"INSERT INTO {OUTBOX_TABLE} (position, fields) VALUES (?, ?)",
                [(int(u["position"]), json.dumps(u)) for u in batch.updates],
            )

    def pending_updates(self) -> list[Update]:
        """Updates committed but maybe not yet published, in log order."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT fields FROM {OUTBOX_TABLE} ORDER BY position")
            return [json.loads(row[0]) for row in c.fetchall()]

    def drop(self, application_name: str) -> None:
        """Drop the tables and the tracking record, so a rebuild starts from the log's start."""
        with self.datastore.transaction(commit=True) as c:
            for table in (JOBS_TABLE, METRICS_TABLE, OUTBOX_TABLE):
                c.execute(f"DROP TABLE IF EXISTS {table}")
            c.execute(
                f"DELETE FROM {TRACKING_TABLE} WHERE application_name = ?", (application_name,)
            )

    def dump(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every row of `jobs` and `job_metrics` as plain values, in key order."""
        with self.datastore.transaction(commit=False) as c:
            c.execute(f"SELECT {_JOB_COLUMNS} FROM {JOBS_TABLE} ORDER BY job_id")
            jobs = [{k: _from_db(k, r[k]) for k in JobRow.COLUMNS} for r in c.fetchall()]
            c.execute(
                f"SELECT {_METRIC_COLUMNS} FROM {METRICS_TABLE} ORDER BY job_id, attempt, seq"
            )
            metrics = [{k: _from_db(k, r[k]) for k in METRIC_COLUMNS} for r in c.fetchall()]
        return jobs, metrics

    def close(self) -> None:
        """Release the view's connections."""
        self.datastore.close()
