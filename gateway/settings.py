"""Settings of the gateway process, read from TRAINYARD_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Limits of the HTTP API and where its dependencies are (besides the event store)."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    body_limit_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="largest request body accepted"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_key_prefix: str = Field("trainyard:", max_length=64, description="prefix of Redis keys")
    node_ttl_s: int = Field(
        30,
        ge=1,
        le=3600,
        description="A node counts as live this long after its last heartbeat (as the handlers)",
    )
    gateway_db_threads: int = Field(
        16, ge=1, le=200, description="threads doing database and event store work at once"
    )
    gateway_db_pool_size: int = Field(
        8, ge=1, le=100, description="PostgreSQL connections for the job board and tokens"
    )
    gateway_max_page_size: int = Field(
        500, ge=1, le=10_000, description="largest page a list endpoint returns (default 50)"
    )
    ws_queue_size: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="updates a WebSocket client may fall behind before it is closed (1013)",
    )
    ws_auth_timeout_s: float = Field(
        10.0, gt=0, le=300, description="time a WebSocket client without header has to send auth"
    )
    ws_close_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="time a slow WebSocket client gets to take its close frame, then dropped",
    )
