"""Settings of the projections process, read from TRAINYARD_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProjectionSettings(BaseSettings):
    """Where the projections publish live updates, and how they batch."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for live updates")
    redis_key_prefix: str = Field("trainyard:", description="prefix of every Redis key")
    stream_maxlen: int = Field(
        10_000, ge=1, description="approximate entries kept in each job's update stream"
    )
    global_stream_maxlen: int = Field(
        100_000, ge=1, description="approximate entries kept in the stream of all jobs' updates"
    )
    projection_batch_size: int = Field(
        1000, ge=1, le=100_000, description="events applied per projection transaction"
    )
    projection_rebuild_batch_size: int = Field(
        10_000, ge=1, le=100_000, description="events applied per transaction in a rebuild"
    )
    projection_poll_interval: float = Field(
        0.5,
        gt=0,
        le=60,
        description="seconds between reads when idle (SQLite polls; "
        "PostgreSQL wakes on NOTIFY and reads at least this often)",
    )
