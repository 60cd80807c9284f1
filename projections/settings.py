"""Settings of the projections process, read from TRAINYARD_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProjectionSettings(BaseSettings):
    """Where the projections publish live updates and dispatches, how they batch and watch."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for live updates")
    redis_key_prefix: str = Field("trainyard:", description="prefix of every Redis key")
    stream_maxlen: int = Field(
        10_000, ge=1, description="approximate entries kept in each job's update stream"
    )
    global_stream_maxlen: int = Field(
        100_000, ge=1, description="approximate entries kept in the stream of all jobs' updates"
    )
    finished_stream_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=0,
        description="seconds a finished job's update stream is kept after its last update "
        "(0: kept until trimmed by length)",
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
    # The broker: the same names and defaults as the handlers' settings.
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    queue_prefix: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Prefix of every queue and exchange name (keeps installations apart)",
    )
    amqp_timeout_s: float = Field(
        30.0, gt=0, le=600, description="seconds to wait for a connection or a publish confirm"
    )
    dispatch_batch_size: int = Field(
        1000, ge=1, le=100_000, description="events the dispatcher reads per batch"
    )
    # The lease watchdog.
    lease_ttl_s: int = Field(
        60, ge=1, le=3600, description="a job's lease lasts this long after its last heartbeat"
    )
    watchdog_interval_s: float = Field(
        10.0, gt=0, le=3600, description="seconds between two scans of the job board"
    )
    watchdog_grace_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="an attempt with no lease is expired only when its last sign of life is "
        "older than the lease TTL plus this",
    )
    redispatch_interval_s: float = Field(
        600.0,
        gt=0,
        le=86_400,
        description="a queued attempt no node claimed for this long is dispatched again",
    )
