"""Reads of the job board (`jobs`, `job_metrics`), which the projections process writes.

Both databases hold the same columns; SQLite keeps uuids, times and JSON as text. Rows
come back here as JSON-ready dicts either way. Lists are keyset-paginated: a cursor is
the last row's sort key, opaque to clients, so pages never skip or repeat a row while
new jobs arrive.
"""

# Table names come from module constants, never from input.
# ruff: noqa: S608

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from gateway.db import Database, Row
from projections.view import JOBS_TABLE, METRICS_TABLE

_JOB_COLUMNS = (
    "job_id, client_id, status, attempt, node_id, submitted_at, updated_at, started_at, "
    "finished_at, reason, model_sha256, cancel_requested, latest_seq, latest_step, "
    "latest_stats, position"
)


class BadCursorError(ValueError):
    """A pagination cursor this API did not hand out."""


@dataclass(frozen=True)
class Page:
    """One page of a list and the cursor of the next page (None on the last page)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(key: list[Any]) -> str:
    """An opaque cursor holding a row's sort key."""
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: tuple[type, ...]) -> list[Any]:
    """The sort key in a cursor, checked against the types it must hold."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (ValueError, binascii.Error) as error:
        raise BadCursorError("is not a cursor this API returned") from error
    if (
        not isinstance(key, list)
        or len(key) != len(kinds)
        or not all(
            isinstance(k, t) and not isinstance(k, bool) for k, t in zip(key, kinds, strict=True)
        )
    ):
        raise BadCursorError("is not a cursor this API returned")
    return key


def _time(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    assert isinstance(value, datetime)
    return value.isoformat()


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def job_json(row: Row) -> dict[str, Any]:
    """A `jobs` row as the API shows it."""
    status = row["status"]
    return {
        "job_id": str(row["job_id"]),
        "status": status,
        "attempt": row["attempt"],
        "node_id": row["node_id"],
        "submitted_at": _time(row["submitted_at"]),
        "updated_at": _time(row["updated_at"]),
        "started_at": _time(row["started_at"]),
        "finished_at": _time(row["finished_at"]),
        "reason": row["reason"],
        "cancel_requested": bool(row["cancel_requested"]),
        "model_sha256": row["model_sha256"],
        "latest": None
        if row["latest_seq"] is None
        else {
            "seq": row["latest_seq"],
            "step": row["latest_step"],
            "stats": _json(row["latest_stats"]),
        },
        "position": row["position"],
    }


class JobBoard:
    """What the gateway reads from the projected tables."""

    def __init__(self, db: Database) -> None:
        self.db = db
        postgres = db.dialect == "postgres"
        self._time_param = "%s::timestamptz" if postgres else "%s"
        self._uuid_param = "%s::uuid" if postgres else "%s"

    def job(self, job_id: UUID, client_id: str) -> dict[str, Any] | None:
        """The client's job as projected, or None (not projected yet, or not the client's)."""
        rows = self.db.fetchall(
            f"SELECT {_JOB_COLUMNS} FROM {{schema}}.{JOBS_TABLE} "
            f"WHERE job_id = {self._uuid_param} AND client_id = %s",
            (str(job_id), client_id),
        )
        return job_json(rows[0]) if rows else None

    def jobs(self, client_id: str, *, status: str | None, limit: int, cursor: str | None) -> Page:
        """The client's jobs, newest first."""
        where = ["client_id = %s"]
        params: list[Any] = [client_id]
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if cursor is not None:
            submitted_at, job_id = decode_cursor(cursor, (str, str))
            where.append(f"(submitted_at, job_id) < ({self._time_param}, {self._uuid_param})")
            params += [submitted_at, job_id]
        rows = self.db.fetchall(
            f"SELECT {_JOB_COLUMNS} FROM {{schema}}.{JOBS_TABLE} WHERE {' AND '.join(where)} "
            "ORDER BY submitted_at DESC, job_id DESC LIMIT %s",
            (*params, limit + 1),
        )
        items = [job_json(r) for r in rows[:limit]]
        more = len(rows) > limit
        last = items[-1] if items else None
        next_cursor = (
            encode_cursor([last["submitted_at"], last["job_id"]]) if more and last else None
        )
        return Page(items, next_cursor)

    def metrics(self, job_id: UUID, *, attempt: int | None, limit: int, cursor: str | None) -> Page:
        """The job's progress reports in (attempt, seq) order."""
        where = [f"job_id = {self._uuid_param}"]
        params: list[Any] = [str(job_id)]
        if attempt is not None:
            where.append("attempt = %s")
            params.append(attempt)
        if cursor is not None:
            after_attempt, after_seq = decode_cursor(cursor, (int, int))
            where.append("(attempt, seq) > (%s, %s)")
            params += [after_attempt, after_seq]
        rows = self.db.fetchall(
            f"SELECT attempt, seq, step, stats, position FROM {{schema}}.{METRICS_TABLE} "
            f"WHERE {' AND '.join(where)} ORDER BY attempt, seq LIMIT %s",
            (*params, limit + 1),
        )
        items = [
            {
                "attempt": r["attempt"],
                "seq": r["seq"],
                "step": r["step"],
                "stats": _json(r["stats"]),
                "position": r["position"],
            }
            for r in rows[:limit]
        ]
        more = len(rows) > limit
        next_cursor = (
            encode_cursor([items[-1]["attempt"], items[-1]["seq"]]) if more and items else None
        )
        return Page(items, next_cursor)

    def ready(self) -> None:
        """Raise unless the job board's tables are there (the projections create them)."""
        self.db.fetchall(f"SELECT 1 FROM {{schema}}.{JOBS_TABLE} LIMIT 1")
