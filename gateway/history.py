"""A job's recorded history for the audit: its events and its metrics stream's, in log order.

Positions are notification ids: the place of each event in the application's log, the
same numbers the job board's `position` columns and the live update streams' entry ids
carry. The library reads an aggregate's events without them, and its notification log
reads the whole log, not one aggregate's; so this reads the two streams' rows (and their
notification ids) from the recorder's events table in one indexed query, and decodes
them with the application's own mapper (upcasting, decompression, decryption included).
"""

# The table name is the recorder's own, never input.
# ruff: noqa: S608

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification

from domain.application import JobsApplication
from domain.metrics import metrics_id_for
from gateway.db import Database

_HIDDEN = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def jsonable(value: Any) -> Any:
    """An event attribute as JSON: uuids and times as strings, containers recursively."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return value


class History:
    """Reads one job's two event streams, with positions, from the events table."""

    def __init__(self, app: JobsApplication, db: Database) -> None:
        self.app = app
        self.db = db
        table: str = getattr(app.recorder, "events_table_name")  # noqa: B009
        if db.dialect == "postgres":
            self._select = (
                "SELECT notification_id AS position, originator_id, originator_version, "
                f"topic, state FROM {{schema}}.{table} "
                "WHERE originator_id IN (%s::uuid, %s::uuid) AND notification_id > %s "
                "ORDER BY notification_id LIMIT %s"
            )
        else:
            self._select = (
                "SELECT rowid AS position, originator_id, originator_version, topic, state "
                f"FROM {table} WHERE originator_id IN (%s, %s) AND rowid > %s "
                "ORDER BY rowid LIMIT %s"
            )
        self._postgres = db.dialect == "postgres"

    def events(self, job_id: UUID, *, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` events of the job and its metrics stream after position `after`."""
        ids = (job_id, metrics_id_for(job_id))
        params = [str(i) if self._postgres else i.hex for i in ids]
        rows = self.db.fetchall(self._select, (*params, after, limit))
        return [self._event(row, job_id) for row in rows]

    def _event(self, row: dict[str, Any], job_id: UUID) -> dict[str, Any]:
        notification = Notification(
            id=row["position"],
            originator_id=UUID(str(row["originator_id"])),
            originator_version=row["originator_version"],
            topic=row["topic"],
            state=bytes(row["state"]),
        )
        event = self.app.mapper.to_domain_event(notification)
        data = {k: jsonable(v) for k, v in vars(event).items() if k not in _HIDDEN}
        return {
            "position": notification.id,
            "stream": "job" if event.originator_id == job_id else "metrics",
            "version": event.originator_version,
            "type": type(event).__qualname__,
            "timestamp": jsonable(getattr(event, "timestamp", None)),
            "data": data,
        }
