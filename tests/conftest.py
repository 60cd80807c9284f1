"""Fixtures shared by every test: throwaway stores on the real PostgreSQL, and SQLite files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from domain.application import JobsApplication
from domain.settings import StoreSettings

POSTGRES_DSN = os.environ.get(
    "TRAINYARD_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=postgres"
)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema in the `test` database, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def postgres_settings(schema: str) -> StoreSettings:
    """Store settings for a throwaway schema of the test database."""
    conninfo = psycopg.conninfo.conninfo_to_dict(POSTGRES_DSN)
    return StoreSettings(
        event_store="postgres",
        postgres_host=str(conninfo.get("host", "127.0.0.1")),
        postgres_port=int(conninfo.get("port") or 5432),
        postgres_dbname=str(conninfo.get("dbname", "test")),
        postgres_user=str(conninfo.get("user", "postgres")),
        postgres_password=str(conninfo.get("password", "")),
        postgres_schema=schema,
    )


def sqlite_settings(directory: Path) -> StoreSettings:
    """Store settings for a SQLite file in a temporary directory."""
    return StoreSettings(event_store="sqlite", sqlite_path=directory / "events.sqlite3")


@pytest.fixture(params=["sqlite", "postgres"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """Each test using this runs against SQLite and against the real PostgreSQL."""
    if request.param == "sqlite":
        return sqlite_settings(tmp_path)
    schema: str = request.getfixturevalue("pg_schema")
    return postgres_settings(schema)


@pytest.fixture
def jobs_app(store_settings: StoreSettings) -> Iterator[JobsApplication]:
    """A JobsApplication on a fresh store."""
    app = JobsApplication(store_settings.eventsourcing_env(), max_attempts=3)
    try:
        yield app
    finally:
        app.close()
