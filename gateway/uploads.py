"""Which client uploaded which build: a client trains on, and sees, only builds it uploaded.

A build is stored once, under its sha256, whoever uploads it; this table records each client
that uploaded it. A job naming `env: {sha256: ...}` is refused at submission (422) unless its
client uploaded that build, and `GET /builds/{sha256}` answers 404 for anyone else's.
"""

# Table names in these statements are module constants, never input.
# ruff: noqa: S608

from __future__ import annotations

from datetime import UTC, datetime

from gateway.db import Database

UPLOADS_TABLE = "build_uploads"
_DDL = (
    f"CREATE TABLE IF NOT EXISTS {{schema}}.{UPLOADS_TABLE} ("
    " sha256 text NOT NULL,"
    " client_id text NOT NULL,"
    " uploaded_at text NOT NULL,"
    " PRIMARY KEY (sha256, client_id))"
)


class BuildUploads:
    """The `build_uploads` table in the event store's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_table(self) -> None:
        """Create the table if it is not there yet."""
        self.db.create(_DDL)

    def record(self, sha256: str, client_id: str) -> None:
        """`client_id` uploaded the build `sha256` (again: nothing changes)."""
        self.db.execute(
            f"INSERT INTO {{schema}}.{UPLOADS_TABLE} (sha256, client_id, uploaded_at) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (sha256, client_id, datetime.now(UTC).isoformat()),
        )

    def uploaded(self, sha256: str, client_id: str) -> bool:
        """Whether `client_id` uploaded the build `sha256`."""
        rows = self.db.fetchall(
            f"SELECT 1 AS found FROM {{schema}}.{UPLOADS_TABLE} "
            "WHERE sha256 = %s AND client_id = %s",
            (sha256, client_id),
        )
        return bool(rows)
