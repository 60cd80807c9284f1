"""The Redis keys of node presence and attempt leases, written by the handlers from heartbeats.

Read by the lease watchdog (a lease gone means the attempt's node went silent) and the
gateway (`GET /nodes`). They expire without heartbeats and are never events.
"""

from __future__ import annotations

from uuid import UUID


def node_keys(prefix: str) -> str:
    """What every node's presence key starts with; the node id follows."""
    return f"{prefix}node:"


def node_key(prefix: str, node_id: str) -> str:
    """The key that says a node is live; its value is the node's last heartbeat (JSON)."""
    return f"{node_keys(prefix)}{node_id}"


def lease_key(prefix: str, job_id: UUID, attempt: int) -> str:
    """The key that says an attempt's node is alive; its value is the node id."""
    return f"{prefix}lease:{job_id}:{attempt}"
