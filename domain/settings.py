"""Settings of the event store and the job rules, read from TRAINYARD_* variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class StoreSettings(BaseSettings):
    """Where the event store lives and the rules every job follows."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    event_store: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite (embedded default) or postgres"
    )
    sqlite_path: Path = Field(Path("var/trainyard.sqlite3"), description="SQLite database file")
    postgres_host: str = "127.0.0.1"
    postgres_port: int = Field(5432, ge=1, le=65535)
    postgres_dbname: str = "trainyard"
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_schema: str = Field("public", description="schema holding every table")
    postgres_pool_size: int = Field(5, ge=1, le=100)
    max_attempts: int = Field(
        3, ge=1, le=100, description="attempts a job gets before it fails (lease expiry)"
    )

    @field_validator("postgres_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if not _SCHEMA_NAME.match(value):
            raise ValueError("must be a lowercase SQL identifier (letters, digits, underscore)")
        return value

    def eventsourcing_env(self) -> dict[str, str]:
        """The environment the `eventsourcing` library reads its persistence settings from."""
        if self.event_store == "sqlite":
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            return {
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(self.sqlite_path),
                "SQLITE_LOCK_TIMEOUT": "10",
            }
        return {
            "PERSISTENCE_MODULE": "domain.postgres:StoreFactory",
            "POSTGRES_HOST": self.postgres_host,
            "POSTGRES_PORT": str(self.postgres_port),
            "POSTGRES_DBNAME": self.postgres_dbname,
            "POSTGRES_USER": self.postgres_user,
            "POSTGRES_PASSWORD": self.postgres_password,
            "POSTGRES_SCHEMA": self.postgres_schema,
            "POSTGRES_POOL_SIZE": str(self.postgres_pool_size),
            "APPLICATION_RECORDER_TOPIC": "domain.postgres:ArrayInsertRecorder",
        }
