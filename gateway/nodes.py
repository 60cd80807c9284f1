"""`GET /nodes`: the live train nodes, from the presence keys the handlers keep in Redis.

A train node is live while its key `{prefix}node:{node_id}` exists: the handlers write the
node's last heartbeat there with an expiry of TRAINYARD_NODE_TTL_S, renewed by every heartbeat.
The keys are found with SCAN (never KEYS, which blocks Redis) and read in batches.

A client sees every node's slots and how many jobs it runs, but the ids of its own jobs only:
ownership of each running job is looked up on the job board, and in the event store for a job
the board has not caught up with.
"""

# Table names come from module constants, never from input.
# ruff: noqa: S608

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from eventsourcing.application import AggregateNotFoundError
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from domain.contracts import Heartbeat
from domain.job import Job
from domain.keys import node_keys
from gateway.auth import client_id
from gateway.db import MissingTableError
from gateway.services import Services, services
from projections.view import JOBS_TABLE

log = logging.getLogger(__name__)

SCAN_COUNT = 1000  # keys Redis looks at per SCAN call
READ_BATCH = 500  # keys read per MGET
OWNER_BATCH = 500  # job ids per job board query
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True)
class LiveNode:
    """A node's last heartbeat and how long its presence key has left to live."""

    heartbeat: Heartbeat
    expires_in_ms: int | None  # None: the key has no expiry (not written by the handlers)


def _text(key: bytes | str) -> str:
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else key


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def read_nodes(redis: aioredis.Redis, key_prefix: str) -> list[LiveNode]:
    """Every node with a live presence key, by node id; malformed values are logged and skipped."""
    prefix = node_keys(key_prefix)
    pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + "*"
    # SCAN may return a key more than once.
    keys = sorted({_text(k) async for k in redis.scan_iter(match=pattern, count=SCAN_COUNT)})
    nodes: list[LiveNode] = []
    for batch in _batches(keys, READ_BATCH):
        # One transaction, so each value goes with the expiry it was written with.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.mget(batch)
            for key in batch:
                pipe.pttl(key)
            values, *ttls = await pipe.execute()
        for key, value, ttl in zip(batch, values, ttls, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            node = _parse(key, key.removeprefix(prefix), value, ttl)
            if node is not None:
                nodes.append(node)
    return sorted(nodes, key=lambda n: n.heartbeat.node_id)


def _parse(key: str, node_id: str, value: bytes | str, ttl_ms: int) -> LiveNode | None:
    try:
        beat = Heartbeat.model_validate_json(value)
    except ValidationError as error:
        log.warning(
            "skipping %s: its value is not a heartbeat (%d errors, first: %s)",
            key,
            error.error_count(),
            error.errors()[0]["msg"],
        )
        return None
    if beat.node_id != node_id:
        log.warning("skipping %s: it holds the heartbeat of node %r", key, beat.node_id)
        return None
    return LiveNode(beat, ttl_ms if ttl_ms >= 0 else None)


def owned_jobs(svc: Services, client: str, job_ids: Iterable[UUID]) -> set[UUID]:
    """The ones among `job_ids` that belong to `client` (blocks: run it in a worker thread)."""
    wanted = set(job_ids)
    owners: dict[UUID, str] = {}
    param = "%s::uuid" if svc.db.dialect == "postgres" else "%s"
    try:
        for batch in _batches(sorted(wanted), OWNER_BATCH):
            rows = svc.db.fetchall(
                f"SELECT job_id, client_id FROM {{schema}}.{JOBS_TABLE} "
                f"WHERE job_id IN ({', '.join([param] * len(batch))})",
                [str(job_id) for job_id in batch],
            )
            owners.update({UUID(str(row["job_id"])): row["client_id"] for row in rows})
    except MissingTableError:
        pass  # the projections never ran: the event store answers for every job
    # A job claimed before the board caught up with it: ask the event store.
    for job_id in wanted - owners.keys():
        try:
            job: object = svc.jobs.repository.get(job_id)
        except AggregateNotFoundError:
            continue
        if isinstance(job, Job):
            owners[job_id] = job.client_id
    return {job_id for job_id, owner in owners.items() if owner == client}


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def node_json(node: LiveNode, own: set[UUID], now: datetime, ttl_s: int) -> dict[str, Any]:
    """A node as a client sees it: the ids of the client's own jobs only."""
    beat = node.heartbeat
    expires_at = last_seen = None
    if node.expires_in_ms is not None:
        expires = now + timedelta(milliseconds=node.expires_in_ms)
        expires_at = _iso(expires)
        # The key was written with an expiry of ttl_s; more time left than that means the
        # handlers run with another TRAINYARD_NODE_TTL_S, and the time of the heartbeat is unknown.
        if node.expires_in_ms <= ttl_s * 1000:
            last_seen = _iso(expires - timedelta(seconds=ttl_s))
    return {
        "node_id": beat.node_id,
        "slots": beat.slots,
        "free_slots": beat.free_slots,
        "draining": beat.draining,
        "running_jobs": len(beat.running),
        "jobs": [
            {"job_id": str(ref.job_id), "attempt": ref.attempt}
            for ref in beat.running
            if ref.job_id in own
        ],
        "last_seen": last_seen,
        "expires_at": expires_at,
    }


async def list_nodes(request: Request) -> Response:
    """The live train nodes, their slots and the jobs they run.
    ---
    summary: List the live train nodes
    description: >-
      Every train node whose last heartbeat has not expired, by node id: its slots, whether
      it is draining, how many jobs it runs, and which of them are the caller's (other
      clients' job ids are never shown). 503 while Redis, which holds node presence, does
      not answer.
    responses:
      '200': {description: The live nodes, content: {application/json: {schema: {$ref: '#/components/schemas/NodeList'}}}}
      '401': {$ref: '#/components/responses/Error'}
      '503': {$ref: '#/components/responses/Error'}
    """  # noqa: E501
    svc = services(request)
    nodes = await read_nodes(svc.redis, svc.settings.redis_key_prefix)
    now = datetime.now(UTC)
    running = {ref.job_id for node in nodes for ref in node.heartbeat.running}
    own = await svc.run(owned_jobs, svc, client_id(request), running) if running else set()
    ttl_s = svc.settings.node_ttl_s
    return JSONResponse({"nodes": [node_json(node, own, now, ttl_s) for node in nodes]})
