"""Plain SQL on the event store's database (PostgreSQL or SQLite) for the gateway's own reads.

The gateway reads the job board, the event log with its positions, and its client tokens
with small queries of its own. Queries are written once with `%s` placeholders and a
`{schema}.` prefix on table names; the SQLite flavour rewrites both. Every call blocks:
callers run it in a worker thread.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from domain.postgres import ddl_lock_key
from domain.settings import StoreSettings

Row = dict[str, Any]


class MissingTableError(Exception):
    """A table the query needs is not there (the job board before the projections ran)."""


class Database(abc.ABC):
    """A connection source for short statements, each in its own transaction."""

    dialect: str

    @abc.abstractmethod
    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one query, as dicts."""

    @abc.abstractmethod
    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement and commit; the number of rows it changed."""

    def create(self, statement: str) -> None:
        """Run a `CREATE ... IF NOT EXISTS`, safe while other processes run it too."""
        self.execute(statement)

    @abc.abstractmethod
    def open(self) -> None:
        """Get ready to serve (connect a pool)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every connection."""


class PostgresDatabase(Database):
    """A psycopg connection pool on the event store's schema."""

    dialect = "postgres"

    def __init__(self, store: StoreSettings, pool_size: int) -> None:
        self.schema = store.postgres_schema
        self.pool = ConnectionPool(
            kwargs={
                "host": store.postgres_host,
                "port": store.postgres_port,
                "dbname": store.postgres_dbname,
                "user": store.postgres_user,
                "password": store.postgres_password,
                "row_factory": dict_row,
            },
            min_size=1,
            max_size=pool_size,
            open=False,
            name="gateway",
        )

    def _sql(self, statement: str) -> sql.Composed:
        # The schema name is validated as an identifier by StoreSettings; quote it anyway.
        return sql.SQL(statement).format(schema=sql.Identifier(self.schema))

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one query, as dicts."""
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            try:
                cur.execute(self._sql(statement), params)
            except pg_errors.UndefinedTable as error:
                raise MissingTableError(str(error).splitlines()[0]) from error
            return list(cur.fetchall())

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement and commit; the number of rows it changed."""
        with self.pool.connection() as conn, conn.cursor() as cur:
            cur.execute(self._sql(statement), params)
            return cur.rowcount

    def create(self, statement: str) -> None:
        """Run a `CREATE ... IF NOT EXISTS` under the schema's DDL lock (see StoreFactory).

        Two concurrent first `CREATE TABLE IF NOT EXISTS` of one table fail one of them
        (gateway workers start together).
        """
        with self.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (ddl_lock_key(self.schema),))
            cur.execute(self._sql(statement))

    def open(self) -> None:
        """Open the pool and wait for its first connection (fails fast on a bad address)."""
        self.pool.open(wait=True, timeout=10)

    def close(self) -> None:
        """Close the pool."""
        self.pool.close()


class SQLiteDatabase(Database):
    """A connection per call to the event store's SQLite file (cheap, and thread-safe)."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def _sql(statement: str) -> str:
        return statement.replace("{schema}.", "").replace("%s", "?")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def fetchall(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one query, as dicts."""
        conn = self._connect()
        try:
            return [dict(row) for row in conn.execute(self._sql(statement), tuple(params))]
        except sqlite3.OperationalError as error:
            if str(error).startswith("no such table"):
                raise MissingTableError(str(error)) from error
            raise
        finally:
            conn.close()

    def execute(self, statement: str, params: Sequence[Any] = ()) -> int:
        """Run one statement and commit; the number of rows it changed."""
        conn = self._connect()
        try:
            with conn:
                return conn.execute(self._sql(statement), tuple(params)).rowcount
        finally:
            conn.close()

    def open(self) -> None:
        """Make sure the file's directory exists; SQLite creates the file on first use."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        """Nothing stays open between calls."""


def create_database(store: StoreSettings, pool_size: int = 8) -> Database:
    """The event store's database, as the settings name it; nothing connects until `open`."""
    if store.event_store == "postgres":
        return PostgresDatabase(store, pool_size)
    return SQLiteDatabase(store.sqlite_path)
