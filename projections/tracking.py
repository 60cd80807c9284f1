"""A tracking record of its own for a projection that keeps no tables (the dispatcher).

PostgreSQL: the library names the table after the environment (`{name}_tracking`).
SQLite: the library's one `tracking` table is shared by every projection of the file and
keyed by application name only, so this recorder renames it, as the job board's view does.
"""

# The table name in these statements is a constant of the caller, never input.
# ruff: noqa: S608

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import TrackingRecorder
from eventsourcing.sqlite import SQLiteDatastore, SQLiteFactory, SQLiteTrackingRecorder
from eventsourcing.utils import Environment

from domain.postgres import StoreFactory
from domain.settings import StoreSettings


class SQLiteOwnTracking(SQLiteTrackingRecorder):
    """The library's single-row SQLite tracking, in a table of the projection's own."""

    def __init__(self, datastore: SQLiteDatastore, *, table: str, **kwargs: Any) -> None:
        assert table.isidentifier(), "a table name, never input"
        self.table = table
        super().__init__(datastore, **kwargs)
        assert self.datastore.single_row_tracking, "one tracking row per application"
        self.insert_tracking_statement = (
            f"INSERT INTO {table} VALUES (:application_name, :notification_id) "
            "ON CONFLICT (application_name) DO UPDATE SET notification_id = :notification_id "
            f"WHERE {table}.notification_id < :notification_id "
            "RETURNING notification_id"
        )
        self.select_max_tracking_id_statement = (
            f"SELECT MAX(notification_id) FROM {table} WHERE application_name=?"
        )

    def construct_create_table_statements(self) -> list[str]:
        """The library's statements with its shared `tracking` table renamed."""
        return [
            s.replace("EXISTS tracking (", f"EXISTS {self.table} (")
            for s in super().construct_create_table_statements()
        ]


def build_tracking(store: StoreSettings, name: str) -> TrackingRecorder:
    """A tracking recorder in the event store's database, in table `{name.lower()}_tracking`."""
    env = Environment(name, {**store.eventsourcing_env(), "POSTGRES_POOL_SIZE": "1"})
    if store.event_store == "postgres":
        return StoreFactory(env).tracking_recorder()
    recorder = SQLiteOwnTracking(SQLiteFactory(env).datastore, table=f"{name.lower()}_tracking")
    recorder.create_table()
    return recorder


def close_tracking(recorder: TrackingRecorder) -> None:
    """Release the recorder's connections."""
    datastore = getattr(recorder, "datastore", None)
    if datastore is not None:
        datastore.close()
