"""The lease watchdog expires silent attempts and re-sends dispatches, on the real services."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
import redis
from redis.asyncio import Redis

from domain.application import JobsApplication, Outcome
from domain.job import JobStatus
from domain.keys import lease_key
from domain.settings import StoreSettings
from projections.__main__ import build_lock
from projections.dispatcher import DISPATCHER_NAME, Dispatcher
from projections.jobboard import JobBoardView
from projections.tracking import build_tracking, close_tracking
from projections.view import PROJECTION_NAME
from projections.watchdog import WATCHDOG_NAME, Watchdog, live_jobs
from tests.projections.conftest import REDIS_URL, runner, spec
from tests.projections.rabbit import Broker, broker

TTL_S, GRACE_S, REDISPATCH_S = 2, 1, 5
SILENT = timedelta(seconds=TTL_S + GRACE_S + 1)  # past the lease TTL + grace


@pytest.fixture
async def rabbit() -> AsyncIterator[Broker]:
    async with broker() as state:
        yield state


@pytest.fixture
async def aredis() -> AsyncIterator[Redis]:
    client = Redis.from_url(os.environ.get("TRAINYARD_TEST_REDIS_URL", REDIS_URL))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def watchdog(
    jobs_app: JobsApplication, view: JobBoardView, aredis: Redis, rabbit: Broker, prefix: str
) -> Watchdog:
    return Watchdog(
        jobs_app,
        view,
        aredis,
        rabbit.publisher,
        key_prefix=prefix,
        lease_ttl_s=TTL_S,
        grace_s=GRACE_S,
        redispatch_s=REDISPATCH_S,
    )


@pytest.fixture
def dispatcher(
    jobs_app: JobsApplication, store_settings: StoreSettings, rabbit: Broker
) -> Iterator[Dispatcher]:
    tracking = build_tracking(store_settings, DISPATCHER_NAME)
    try:
        yield Dispatcher(jobs_app, tracking, rabbit.publisher)
    finally:
        close_tracking(tracking)


def claimed_job(app: JobsApplication, view: JobBoardView, node_id: str = "node-1") -> UUID:
    """A job claimed by `node_id`, on the board."""
    job_id = app.submit(spec(), client_id="client-a")
    assert app.claim(job_id, 1, node_id).granted
    runner(app, view, None).catch_up()
    return job_id


def claimed_at(view: JobBoardView, job_id: UUID) -> datetime:
    (job,) = [j for j in live_jobs(view) if j.job_id == job_id]
    return job.updated_at


async def test_a_silent_claim_is_expired_and_its_next_attempt_dispatched(
    jobs_app: JobsApplication,
    view: JobBoardView,
    watchdog: Watchdog,
    dispatcher: Dispatcher,
    rabbit: Broker,
) -> None:
    job_id = claimed_job(jobs_app, view)
    since = claimed_at(view, job_id)
    # A node that just claimed may not have sent its first heartbeat yet.
    young = await watchdog.scan(now=since + timedelta(seconds=TTL_S))
    assert young.expired == {}
    assert jobs_app.get_job(job_id).status is JobStatus.CLAIMED

    silent = await watchdog.scan(now=since + SILENT)
    assert silent.expired == {(job_id, 1): Outcome.APPLIED}
    job = jobs_app.get_job(job_id)
    assert (job.status, job.attempt, job.node_id) == (JobStatus.QUEUED, 2, None)
    await dispatcher.catch_up()
    assert await rabbit.dispatched() == [(str(job_id), 2)]


async def test_an_attempt_whose_lease_is_renewed_is_left_alone(
    jobs_app: JobsApplication,
    view: JobBoardView,
    watchdog: Watchdog,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = claimed_job(jobs_app, view)
    other = claimed_job(jobs_app, view, "node-2")
    redis_client.set(lease_key(prefix, job_id, 1), "node-1", ex=TTL_S * 10)
    result = await watchdog.scan(now=claimed_at(view, other) + SILENT * 100)
    assert result.expired == {(other, 1): Outcome.APPLIED}
    assert jobs_app.get_job(job_id).status is JobStatus.CLAIMED
    assert jobs_app.get_job(job_id).attempt == 1


async def test_past_the_retry_limit_the_job_fails(
    jobs_app: JobsApplication, view: JobBoardView, watchdog: Watchdog
) -> None:
    job_id = claimed_job(jobs_app, view)
    for attempt in range(1, jobs_app.max_attempts + 1):
        if attempt > 1:
            assert jobs_app.claim(job_id, attempt, f"node-{attempt}").granted
            runner(jobs_app, view, None).catch_up()
        result = await watchdog.scan(now=claimed_at(view, job_id) + SILENT)
        assert result.expired == {(job_id, attempt): Outcome.APPLIED}
        runner(jobs_app, view, None).catch_up()
    job = jobs_app.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.FAILED, 3)
    assert job.reason is not None
    assert "retry limit reached" in job.reason
    assert live_jobs(view) == []


async def test_a_dispatch_nobody_claims_is_sent_again_after_the_interval(
    jobs_app: JobsApplication,
    view: JobBoardView,
    watchdog: Watchdog,
    dispatcher: Dispatcher,
    rabbit: Broker,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    await dispatcher.catch_up()
    runner(jobs_app, view, None).catch_up()
    assert await rabbit.dispatched() == [(str(job_id), 1)]  # ... and lost, e.g. dead-lettered
    queued_at = claimed_at(view, job_id)

    assert (await watchdog.scan(now=queued_at + timedelta(seconds=1))).redispatched == []
    later = queued_at + timedelta(seconds=REDISPATCH_S + 1)
    assert len((await watchdog.scan(now=later)).redispatched) == 1
    # Counted again from the re-send: not every scan sends one more.
    assert (await watchdog.scan(now=later + timedelta(seconds=1))).redispatched == []
    again = later + timedelta(seconds=REDISPATCH_S + 1)
    assert len((await watchdog.scan(now=again)).redispatched) == 1
    assert await rabbit.dispatched() == [(str(job_id), 1), (str(job_id), 1)]

    # Once claimed, the board may still say queued: the event store says otherwise.
    assert jobs_app.claim(job_id, 1, "node-1").granted
    assert (await watchdog.scan(now=again + timedelta(days=1))).redispatched == []
    assert await rabbit.dispatched() == []


async def test_the_real_clock_expires_a_silent_attempt(
    jobs_app: JobsApplication, view: JobBoardView, watchdog: Watchdog
) -> None:
    job_id = claimed_job(jobs_app, view)
    assert (await watchdog.scan()).expired == {}
    fast = Watchdog(
        jobs_app,
        view,
        watchdog.redis,
        watchdog.publisher,
        key_prefix=watchdog.key_prefix,
        lease_ttl_s=0,
        grace_s=0,
        redispatch_s=REDISPATCH_S,
        clock=lambda: datetime.now(UTC) + timedelta(seconds=1),
    )
    assert (await fast.scan()).expired == {(job_id, 1): Outcome.APPLIED}


async def test_a_stale_board_row_changes_nothing(
    jobs_app: JobsApplication, view: JobBoardView, watchdog: Watchdog
) -> None:
    job_id = claimed_job(jobs_app, view)
    jobs_app.report_completed(job_id, 1, 1, "models/x.onnx", "0" * 64, node_id="node-1")
    # The board still shows the claim: the event store knows the attempt ended.
    result = await watchdog.scan(now=claimed_at(view, job_id) + SILENT)
    assert result.expired == {(job_id, 1): Outcome.IGNORED}
    assert jobs_app.get_job(job_id).status is JobStatus.COMPLETED


def test_one_watchdog_and_one_dispatcher_run_beside_the_job_board(
    jobs_app: JobsApplication, store_settings: StoreSettings
) -> None:
    names = [PROJECTION_NAME, DISPATCHER_NAME, WATCHDOG_NAME]
    active = [build_lock(store_settings, jobs_app, name) for name in names]
    standby = build_lock(store_settings, jobs_app, WATCHDOG_NAME)
    try:
        assert all(lock.acquire(threading.Event()) for lock in active)
        give_up = threading.Event()
        timer = threading.Timer(0.3, give_up.set)
        timer.start()
        assert not standby.acquire(give_up, retry_every=0.05)
        timer.join()
        active[-1].close()
        assert standby.acquire(threading.Event(), retry_every=0.05)
    finally:
        for lock in [*active, standby]:
            lock.close()
