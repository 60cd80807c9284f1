"""The lease watchdog: ends attempts whose node went silent, re-sends dispatches nobody took.

Every `interval` seconds it reads the job board's unfinished jobs:

- CLAIMED or RUNNING, no Redis lease key `{prefix}lease:{job_id}:{attempt}` (heartbeats renew
  it), and no sign of life (the board row's `updated_at`: the claim, or the latest report)
  for longer than the lease TTL + grace -> `JobsApplication.expire_lease(job_id, attempt)`.
  The domain queues the next attempt (which the dispatcher then publishes), fails the job
  past the retry limit, or cancels it if a cancel was requested.
- QUEUED for longer than the redispatch interval, counted from the Queued event or from the
  watchdog's own last re-send -> its Dispatch is published again (the first one may have
  been lost or dead-lettered; a duplicate is harmless, the second claim is refused).

The board may lag the log: a decision on a stale row is checked by the domain (an expiry of
an attempt that already ended or moved on changes nothing), and a re-send only goes out if
the job, loaded from the event store, still waits with that attempt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from psycopg.sql import SQL, Identifier
from redis.asyncio import Redis

from domain.application import JobsApplication, Outcome
from domain.contracts import Dispatch
from domain.errors import InvalidTransitionError
from domain.job import JobStatus
from domain.keys import lease_key
from projections.amqp import AmqpPublisher
from projections.dispatcher import dispatch_for
from projections.jobboard import JobBoardView
from projections.leader import Leader
from projections.postgres import PostgresJobBoardView
from projections.view import JOBS_TABLE

log = logging.getLogger(__name__)

WATCHDOG_NAME = "Watchdog"
"""Names the watchdog's leader lock."""

_SELECT = (
    "SELECT job_id, status, attempt, node_id, updated_at FROM {table} "
    "WHERE status IN ('queued', 'claimed', 'running')"
)


@dataclass(frozen=True)
class BoardJob:
    """An unfinished job as the board shows it."""

    job_id: UUID
    status: JobStatus
    attempt: int
    node_id: str | None
    updated_at: datetime


def live_jobs(view: JobBoardView) -> list[BoardJob]:
    """The board's queued, claimed and running jobs."""
    if isinstance(view, PostgresJobBoardView):
        table = SQL("{}.{}").format(Identifier(view.datastore.schema), Identifier(JOBS_TABLE))
        with view.datastore.transaction(commit=False) as curs:
            curs.execute(SQL(_SELECT).format(table=table))
            rows = [tuple(r.values()) for r in curs.fetchall()]
    else:
        with view.datastore.transaction(commit=False) as c:
            c.execute(_SELECT.format(table=JOBS_TABLE))
            rows = [
                (UUID(r[0]), r[1], r[2], r[3], datetime.fromisoformat(r[4])) for r in c.fetchall()
            ]
    return [
        BoardJob(job_id, JobStatus(status), attempt, node_id, updated_at)
        for job_id, status, attempt, node_id, updated_at in rows
    ]


@dataclass
class Scan:
    """What one scan did."""

    expired: dict[tuple[UUID, int], Outcome] = field(default_factory=dict)
    redispatched: list[Dispatch] = field(default_factory=list)


class Watchdog:
    """Expires silent leases and re-sends stale dispatches, one scan per interval."""

    def __init__(
        self,
        app: JobsApplication,
        view: JobBoardView,
        redis: Redis,
        publisher: AmqpPublisher,
        *,
        key_prefix: str,
        lease_ttl_s: float,
        grace_s: float,
        redispatch_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.app = app
        self.view = view
        self.redis = redis
        self.publisher = publisher
        self.key_prefix = key_prefix
        self.silence = timedelta(seconds=lease_ttl_s + grace_s)
        self.redispatch = timedelta(seconds=redispatch_s)
        self.clock = clock
        self.resent: dict[tuple[UUID, int], datetime] = {}  # last re-send of a queued attempt

    async def scan(self, now: datetime | None = None) -> Scan:
        """Look at the board once and act on what it shows."""
        now = now or self.clock()
        jobs = await asyncio.to_thread(live_jobs, self.view)
        result = Scan()
        await self._expire(now, [j for j in jobs if j.status is not JobStatus.QUEUED], result)
        await self._redispatch(now, [j for j in jobs if j.status is JobStatus.QUEUED], result)
        return result

    async def _expire(self, now: datetime, active: list[BoardJob], result: Scan) -> None:
        silent = [j for j in active if now - j.updated_at > self.silence]
        if not silent:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in silent:
                pipe.exists(lease_key(self.key_prefix, j.job_id, j.attempt))
            alive = await pipe.execute()
        for j, has_lease in zip(silent, alive, strict=True):
            if has_lease:
                continue
            try:
                outcome = await asyncio.to_thread(self.app.expire_lease, j.job_id, j.attempt)
            except InvalidTransitionError as error:
                # The board lags: the attempt is no longer claimed or running.
                log.info("lease of %s/%s: nothing to expire: %s", j.job_id, j.attempt, error)
                continue
            result.expired[(j.job_id, j.attempt)] = outcome
            if outcome is not Outcome.APPLIED:
                # The board lags: the attempt ended or moved on, and nothing changed.
                log.info("lease of %s/%s: nothing to expire (%s)", j.job_id, j.attempt, outcome)
                continue
            log.warning(
                "lease of %s/%s on node %s expired (silent since %s)",
                j.job_id,
                j.attempt,
                j.node_id,
                j.updated_at.isoformat(),
            )

    async def _redispatch(self, now: datetime, queued: list[BoardJob], result: Scan) -> None:
        waiting = {(j.job_id, j.attempt): j for j in queued}
        # Forget attempts that stopped waiting, so the map stays as small as the queue.
        self.resent = {k: t for k, t in self.resent.items() if k in waiting}
        due = [
            key
            for key, j in waiting.items()
            if now - max(j.updated_at, self.resent.get(key, j.updated_at)) > self.redispatch
        ]
        if not due:
            return
        jobs = await asyncio.to_thread(lambda: [self.app.get_job(job_id) for job_id, _ in due])
        planned = [dispatch_for(job, attempt) for job, (_, attempt) in zip(jobs, due, strict=True)]
        dispatches = [d for d in planned if d is not None]
        if dispatches:
            await self.publisher.dispatch(dispatches)
        for key in due:
            self.resent[key] = now
        for d in dispatches:
            log.warning("dispatch of %s/%s not claimed in time: sent again", d.job_id, d.attempt)
        result.redispatched.extend(dispatches)

    async def run(
        self, leader: Leader, stop: threading.Event, interval: float, tick: float = 1.0
    ) -> None:
        """Scan every `interval` seconds until `stop` is set."""
        log.info("lease watchdog scanning every %s s", interval)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await self.scan()
            deadline = loop.time() + interval
            # Waiting on the leader's connection notices a lost lock; short ticks notice a stop.
            while not stop.is_set() and (left := deadline - loop.time()) > 0:
                await asyncio.to_thread(leader.wait_for_events, min(tick, left))
        log.info("lease watchdog stopped cleanly")
