"""A transient failure is retried up to the delivery limit, not dead-lettered at once.

The failures are real: the test holds PostgreSQL's events table lock while the
app's store gives up waiting for it after one second (`lock_timeout`), or points
the app at a Redis port where nothing listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from domain.application import JobsApplication
from domain.contracts import (
    DELIVERY_LIMIT,
    REASON_HEADER,
    ClaimReply,
    ClaimRequest,
    Heartbeat,
    Started,
    StartedInfo,
)
from domain.job import JobStatus
from domain.settings import StoreSettings
from domain.spec import parse_job_spec
from handlers.settings import HandlerSettings
from tests.conftest import POSTGRES_DSN, postgres_settings, sqlite_settings
from tests.handlers.conftest import Central, eventually, running_central

CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"


class LockTimeoutStore(StoreSettings):
    """Store settings whose writers give up after waiting 1 s for the table lock."""

    def eventsourcing_env(self) -> dict[str, str]:
        """The usual environment, plus a lock timeout."""
        return {**super().eventsourcing_env(), "POSTGRES_LOCK_TIMEOUT": "1"}


class TableLock:
    """Holds the events table's lock from another connection, as a long writer would."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.conn = psycopg.connect(POSTGRES_DSN)

    def acquire(self) -> None:
        self.conn.execute(f"LOCK TABLE {self.schema}.jobs_events IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback()

    def waiters(self) -> int:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE NOT l.granted AND c.relname = 'jobs_events' AND n.nspname = %s",
                (self.schema,),
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def lock_store(pg_schema: str) -> LockTimeoutStore:
    return LockTimeoutStore(**postgres_settings(pg_schema).model_dump())


@pytest.fixture
def lock_jobs(lock_store: LockTimeoutStore) -> Iterator[JobsApplication]:
    jobs = JobsApplication(lock_store.eventsourcing_env(), max_attempts=3)
    try:
        yield jobs
    finally:
        jobs.close()


@pytest.fixture
async def locked_central(
    handler_settings: HandlerSettings, lock_store: LockTimeoutStore, lock_jobs: JobsApplication
) -> AsyncIterator[Central]:
    async with running_central(handler_settings, lock_store, lock_jobs) as central:
        yield central


@pytest.fixture
def table_lock(pg_schema: str) -> Iterator[TableLock]:
    lock = TableLock(pg_schema)
    try:
        yield lock
    finally:
        lock.release()
        lock.conn.close()


async def claimed_job(central: Central) -> UUID:
    spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})
    job_id = central.jobs.submit(spec, client_id="client-a")
    request = ClaimRequest(job_id=job_id, attempt=1, node_id="node-1")
    reply = await central.client.request(request, queue=central.topology.claims, timeout=30)
    assert ClaimReply.model_validate_json(reply.body).granted
    return job_id


def started(job_id: UUID) -> Started:
    info = StartedInfo(
        mlagents_version="1.1.0",
        torch_version="2.13.0",
        python_version="3.11",
        build_sha256="0" * 64,
        command=["mlagents-learn"],
        config={},
    )
    return Started(job_id=job_id, attempt=1, node_id="node-1", seq=1, info=info)


async def test_a_write_that_times_out_is_retried_and_lands(
    locked_central: Central, table_lock: TableLock
) -> None:
    central = locked_central
    job_id = await claimed_job(central)
    table_lock.acquire()
    await central.publish(started(job_id), central.topology.reports)
    await eventually(lambda: table_lock.waiters() > 0, "the handler to wait for the lock")
    await asyncio.sleep(1.5)  # longer than the lock timeout: at least one write has failed
    assert central.jobs.get_job(job_id).status is JobStatus.CLAIMED
    table_lock.release()

    await eventually(lambda: central.jobs.get_job(job_id).status is JobStatus.RUNNING, "started")
    assert await central.dead_letters() == []


async def test_a_failure_that_persists_is_dead_lettered_after_the_delivery_limit(
    handler_settings: HandlerSettings, tmp_path: Path
) -> None:
    # Nothing listens on port 1: every heartbeat fails to reach Redis, quickly and for real.
    settings = handler_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    store = sqlite_settings(tmp_path)
    jobs = JobsApplication(store.eventsourcing_env())
    try:
        async with running_central(settings, store, jobs) as central:
            beat = Heartbeat(node_id="node-1", slots=1, free_slots=1)
            await central.publish(beat, central.topology.heartbeats)

            [letter] = await central.wait_dead_letters(1)
            reason = str((letter.headers or {})[REASON_HEADER])
            assert reason.startswith(f"gave up after {DELIVERY_LIMIT + 1} deliveries"), reason
            assert "ConnectionError" in reason, reason
            assert Heartbeat.model_validate_json(letter.body) == beat
            job_id = await claimed_job(central)  # the other subscribers still serve
            assert central.jobs.get_job(job_id).status is JobStatus.CLAIMED
    finally:
        jobs.close()
