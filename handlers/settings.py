"""Settings of the handlers process, read from TRAINYARD_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class HandlerSettings(BaseSettings):
    """Where the broker and Redis are, how queues are named, and how long presence lasts."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    queue_prefix: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Prefix of every queue and exchange name (keeps installations apart)",
    )
    redis_key_prefix: str = Field("trainyard:", max_length=64, description="Prefix of Redis keys")
    lease_ttl_s: int = Field(
        60, ge=1, le=3600, description="A job's lease lasts this long after its last heartbeat"
    )
    node_ttl_s: int = Field(
        30, ge=1, le=3600, description="A node counts as live this long after its last heartbeat"
    )
    claims_prefetch: int = Field(8, ge=1, le=1000, description="Claims handled at once")
    reports_prefetch: int = Field(
        64,
        ge=1,
        le=1000,
        description="Reports in flight at once (and the most progress reports recorded by "
        "one command); each job's reports are still applied in delivery order",
    )
    heartbeats_prefetch: int = Field(16, ge=1, le=1000, description="Heartbeats handled at once")
