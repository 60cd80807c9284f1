"""Node presence and job leases in Redis: ephemeral, kept alive by heartbeats, never events."""

from __future__ import annotations

from uuid import UUID

from redis.asyncio import Redis

from domain.contracts import Heartbeat
from domain.keys import lease_key, node_key


class Presence:
    """Writes `node:{id}` and `lease:{job_id}:{attempt}` keys that expire without heartbeats."""

    def __init__(self, redis: Redis, *, key_prefix: str, node_ttl_s: int, lease_ttl_s: int) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self.node_ttl_s = node_ttl_s
        self.lease_ttl_s = lease_ttl_s

    def node_key(self, node_id: str) -> str:
        """The key that says a node is live; its value is the last heartbeat (JSON)."""
        return node_key(self.key_prefix, node_id)

    def lease_key(self, job_id: UUID, attempt: int) -> str:
        """The key that says an attempt's node is alive; its value is the node id."""
        return lease_key(self.key_prefix, job_id, attempt)

    async def record(self, beat: Heartbeat) -> None:
        """Refresh the node's presence and the lease of every attempt it runs, atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.node_key(beat.node_id), beat.model_dump_json(), ex=self.node_ttl_s)
            for ref in beat.running:
                pipe.set(self.lease_key(ref.job_id, ref.attempt), beat.node_id, ex=self.lease_ttl_s)
            await pipe.execute()
