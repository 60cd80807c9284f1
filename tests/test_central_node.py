"""The central node as processes: `faststream run handlers.app:app` and `python -m projections`.

Driven only by the messages a train node publishes; observed through the job board,
the Redis Streams and the event store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID

import psycopg
import pytest
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from domain.application import JobsApplication
from domain.contracts import (
    ClaimReply,
    ClaimRequest,
    Completed,
    Heartbeat,
    Progress,
    Started,
    StartedInfo,
    Topology,
)
from domain.job import JobStatus
from domain.metrics import JobMetrics
from domain.settings import StoreSettings
from domain.spec import parse_job_spec
from tests.conftest import POSTGRES_DSN, postgres_settings
from tests.handlers.conftest import AMQP_URL, REDIS_URL, delete_topology, eventually
from tests.processes import (
    Process,
    central_env,
    queues_exist,
    start_handlers,
    start_projections,
)

pytestmark = pytest.mark.slow

SHA = "ab" * 32
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"


@dataclass
class System:
    """The running central node and what a test drives and inspects it with."""

    store: StoreSettings
    topology: Topology
    key_prefix: str
    jobs: JobsApplication
    client: RabbitBroker
    redis: Redis
    handlers: Process

    def submit(self) -> UUID:
        spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})
        return self.jobs.submit(spec, client_id="client-a")

    async def claim(self, job_id: UUID, attempt: int, node_id: str) -> ClaimReply:
        request = ClaimRequest(job_id=job_id, attempt=attempt, node_id=node_id)
        reply = await self.client.request(request, queue=self.topology.claims, timeout=60)
        return ClaimReply.model_validate_json(reply.body)

    async def report(self, message: Any) -> None:
        await self.client.publish(message, queue=self.topology.reports, persist=True)

    def board(self, job_id: UUID) -> tuple[str, int, str | None] | None:
        """(status, attempt, node) of the job on the job board."""
        with psycopg.connect(POSTGRES_DSN) as conn:
            row = conn.execute(
                f"SELECT status, attempt, node_id FROM {self.store.postgres_schema}.jobs "
                "WHERE job_id = %s",
                (job_id,),
            ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    async def updates(self, job_id: UUID) -> list[tuple[str, dict[str, str]]]:
        """The job's Redis Stream: (entry id, fields) in order."""
        key = f"{self.key_prefix}jobs:{job_id}:updates"
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await self.redis.xrange(key))
        return [
            (str(i, "utf-8"), {str(k, "utf-8"): str(v, "utf-8") for k, v in fields.items()})
            for i, fields in entries
        ]


def started(job_id: UUID, attempt: int, node: str, seq: int = 1) -> Started:
    info = StartedInfo(
        mlagents_version="1.1.0",
        torch_version="2.13.0",
        python_version="3.11.7",
        build_sha256=SHA,
        command=["mlagents-learn", "config.yaml"],
        config={"behaviors": {"Reach": {"trainer_type": "ppo"}}},
    )
    return Started(job_id=job_id, attempt=attempt, node_id=node, seq=seq, info=info)


def progress(job_id: UUID, attempt: int, node: str, seq: int) -> Progress:
    stats = {"Environment/Cumulative Reward": seq / 10}
    return Progress(
        job_id=job_id, attempt=attempt, node_id=node, seq=seq, step=seq * 100, stats=stats
    )


@pytest.fixture
async def system(
    pg_schema: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[System]:
    """Handlers and projections as processes on a throwaway schema, queues and Redis keys.

    Settings given as the fixture's indirect parameter override the defaults below.
    """
    tag = uuid.uuid4().hex[:12]
    store = postgres_settings(pg_schema)
    topology = Topology(f"test-{tag}.")
    key_prefix = f"test:{tag}:"
    env = {
        **central_env(store, topology, key_prefix, AMQP_URL, REDIS_URL),
        "TRAINYARD_LEASE_TTL_S": "2",
        "TRAINYARD_WATCHDOG_INTERVAL_S": "0.5",
        "TRAINYARD_WATCHDOG_GRACE_S": "1",
        "TRAINYARD_PROJECTION_POLL_INTERVAL": "0.2",
        **getattr(request, "param", {}),
    }
    jobs = JobsApplication(store.eventsourcing_env())
    # The event store's tables exist before either process starts.
    handlers = start_handlers(env, tmp_path / "handlers.log")
    projections = start_projections(env, tmp_path / "projections.log")
    redis = Redis.from_url(REDIS_URL)
    try:
        await eventually(lambda: queues_exist(AMQP_URL, topology), "the handlers' queues")
        async with RabbitBroker(AMQP_URL) as client:
            await client.start()
            yield System(store, topology, key_prefix, jobs, client, redis, handlers)
    finally:
        handlers.stop()
        projections.stop()
        jobs.close()
        keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await delete_topology(topology)


async def test_a_whole_lifecycle_lands_on_the_board_and_in_the_stream_in_order(
    system: System,
) -> None:
    job_id = system.submit()
    assert (await system.claim(job_id, 1, "node-1")).granted
    await system.report(started(job_id, 1, "node-1"))
    for seq in range(2, 6):
        await system.report(progress(job_id, 1, "node-1", seq))
    await system.report(
        Completed(
            job_id=job_id, attempt=1, node_id="node-1", seq=6, model_key="m.onnx", model_sha256=SHA
        )
    )

    await eventually(lambda: system.board(job_id) == ("completed", 1, "node-1"), "completed")

    async def all_published() -> bool:
        return len(await system.updates(job_id)) >= 9

    await eventually(all_published, "every update in the job's stream")
    updates = await system.updates(job_id)
    assert [fields["type"] for _, fields in updates] == [
        "submitted",
        "queued",
        "claimed",
        "started",
        "progress",
        "progress",
        "progress",
        "progress",
        "completed",
    ]
    positions = [int(fields["position"]) for _, fields in updates]
    assert positions == sorted(positions)
    assert [i for i, _ in updates] == [f"{p}-0" for p in positions]
    assert [fields.get("seq") for _, fields in updates if fields["type"] == "progress"] == [
        "2",
        "3",
        "4",
        "5",
    ]
    assert updates[-1][1]["model_sha256"] == SHA


async def test_a_lost_lease_requeues_and_the_old_attempt_changes_nothing(system: System) -> None:
    job_id = system.submit()
    assert (await system.claim(job_id, 1, "node-1")).granted
    await system.report(started(job_id, 1, "node-1"))
    # node-1 sends no heartbeat: its lease is never set, so the watchdog expires the attempt.
    await eventually(lambda: system.board(job_id) == ("queued", 2, None), "attempt 2 queued")

    assert not (await system.claim(job_id, 1, "node-1")).granted
    assert (await system.claim(job_id, 2, "node-2")).granted
    beat = Heartbeat(
        node_id="node-2", slots=1, free_slots=0, running=[{"job_id": job_id, "attempt": 2}]
    )
    await system.client.publish(beat, queue=system.topology.heartbeats, persist=True)
    late = Completed(
        job_id=job_id, attempt=1, node_id="node-1", seq=9, model_key="old.onnx", model_sha256=SHA
    )
    await system.report(late)
    await system.report(started(job_id, 2, "node-2"))

    def node_2_started() -> bool:
        return system.jobs.get_job(job_id).started

    await eventually(node_2_started, "node-2's start report")
    job = system.jobs.get_job(job_id)
    assert (job.status, job.attempt, job.node_id) == (JobStatus.RUNNING, 2, "node-2")
    assert job.model_key is None, "a report of the lost attempt changed the job"
    await eventually(lambda: system.board(job_id) == ("running", 2, "node-2"), "board attempt 2")


# No heartbeat renews the attempt's lease, and no report arrives while the handlers restart:
# a long grace keeps the watchdog from queueing the next attempt meanwhile, which would make
# every later report stale.
@pytest.mark.parametrize(
    "system", [{"TRAINYARD_WATCHDOG_GRACE_S": "600"}], ids=["long-grace"], indirect=True
)
async def test_a_handler_killed_mid_stream_loses_and_duplicates_nothing(system: System) -> None:
    job_id = system.submit()
    assert (await system.claim(job_id, 1, "node-1")).granted
    await system.report(started(job_id, 1, "node-1"))
    count = 600

    async def send_all() -> None:
        # A steady stream, so the kill lands while reports are still arriving and in flight.
        for seq in range(2, 2 + count):
            await system.report(progress(job_id, 1, "node-1", seq))
            await asyncio.sleep(0.005)

    sender = asyncio.create_task(send_all())
    await eventually(lambda: system.jobs.get_metrics(job_id).count >= 20, "some reports applied")
    system.handlers.kill()
    done_before_kill = system.jobs.get_metrics(job_id).count
    still_sending = not sender.done()
    system.handlers.start()
    await sender

    await eventually(lambda: system.jobs.get_metrics(job_id).count >= count, "every report")
    metrics_id = system.jobs.get_metrics(job_id).id
    reported = [
        e.seq
        for e in system.jobs.repository.event_store.get(metrics_id)
        if isinstance(e, JobMetrics.Reported)
    ]
    assert sorted(reported) == list(range(2, 2 + count)), "a report was lost or recorded twice"
    assert still_sending, "the handler was killed after every report was sent"
    assert done_before_kill < count
