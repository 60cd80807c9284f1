"""A train node's own record of its runs, in Redis, so that a node restarted after a crash can
find what its predecessor left running, stop it and report it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from uuid import UUID

from redis.asyncio import Redis


@dataclass(frozen=True)
class RunRecord:
    """One attempt this node runs: where its files are, its trainer's pid and its ports."""

    job_id: str
    attempt: int
    run_dir: str
    pid: int | None = None
    port: int | None = None

    @property
    def field(self) -> str:
        """The record's field in the node's hashes."""
        return f"{self.job_id}:{self.attempt}"


class NodeState:
    """`{prefix}trainer:{node}:runs` holds run records, `...:seqs` the last seq each one used."""

    def __init__(self, redis: Redis, *, key_prefix: str, node_id: str, ttl_s: int) -> None:
        self.redis = redis
        self.runs_key = f"{key_prefix}trainer:{node_id}:runs"
        self.seqs_key = f"{key_prefix}trainer:{node_id}:seqs"
        # Kept long enough to outlive a crashed node's downtime, but not forever.
        self.ttl_s = ttl_s

    async def record(self, run: RunRecord) -> None:
        """Add or update a run record."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.runs_key, run.field, json.dumps(asdict(run)))
            pipe.expire(self.runs_key, self.ttl_s)
            await pipe.execute()

    async def used_seq(self, job_id: UUID, attempt: int, seq: int) -> None:
        """Note that `seq` is about to be sent, so a successor never sends it again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.seqs_key, f"{job_id}:{attempt}", seq)
            pipe.expire(self.seqs_key, self.ttl_s)
            await pipe.execute()

    async def last_seq(self, job_id: str, attempt: int) -> int:
        """The last seq noted for an attempt (0 if none)."""
        value = await self.redis.hget(self.seqs_key, f"{job_id}:{attempt}")
        return int(value) if value is not None else 0

    async def remove(self, job_id: str, attempt: int) -> None:
        """Forget a finished run."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.runs_key, f"{job_id}:{attempt}")
            pipe.hdel(self.seqs_key, f"{job_id}:{attempt}")
            await pipe.execute()

    async def runs(self) -> list[RunRecord]:
        """Every run recorded and not yet removed."""
        values = await self.redis.hvals(self.runs_key)
        return [RunRecord(**json.loads(value)) for value in values]
