"""Settings of a train node (`faststream run trainer.node:app`), read from TRAINYARD_* variables."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


def default_node_id() -> str:
    """The host name, as a node id: stable across restarts, so a restart finds its runs."""
    name = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:128].lstrip("-_.:")
    return name or "train-node"


class NodeSettings(BaseSettings):
    """Who the node is, how much it runs at once, and where its broker, Redis and files are."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    node_id: str = Field(
        default_factory=default_node_id,
        pattern=NODE_ID_PATTERN,
        description="This node's id (default: the host name); unique among live nodes",
    )
    trainer_slots: int = Field(1, ge=1, le=64, description="Jobs the node runs at once")
    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    queue_prefix: str = Field(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Prefix of every queue and exchange name (keeps installations apart)",
    )
    redis_key_prefix: str = Field("trainyard:", max_length=64, description="Prefix of Redis keys")
    runs_dir: Path = Field(Path("var/runs"), description="Each attempt's trainer files go here")
    builds_dir: Path = Field(
        Path("var/builds"), description="Environment builds: built-ins, and uploads by sha256"
    )
    builds_keep_days: float = Field(
        14.0, ge=0, description="Uploaded builds no run used this many days are deleted (0: never)"
    )
    port_base: int = Field(
        20000, ge=1024, le=65000, description="First port of the blocks given to runs"
    )
    port_blocks: int = Field(
        64, ge=1, le=1000, description="Port blocks (20 ports each), shared by nodes on a host"
    )
    heartbeat_s: float = Field(5.0, gt=0, le=300, description="Seconds between heartbeats")
    watchdog_s: float = Field(
        300.0, gt=0, description="A run with no new stats and no log output this long fails"
    )
    stop_grace_s: float = Field(
        15.0, ge=0, le=600, description="Seconds a stopped trainer gets to save before SIGKILL"
    )
    drain_timeout_s: float = Field(
        600.0, ge=0, description="On SIGTERM, seconds to let running jobs finish before giving up"
    )
    claim_timeout_s: float = Field(
        30.0, gt=0, le=600, description="Seconds to wait for the central node's claim reply"
    )
    dispatch_poll_s: float = Field(
        0.5, gt=0, le=60, description="Seconds between looks at an empty dispatch queue"
    )
    timeout_wait_s: int | None = Field(
        None, ge=1, le=3600, description="mlagents-learn --timeout-wait (unset: its 60 s)"
    )
    run_state_ttl_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long Redis keeps a crashed node's run records"
    )
