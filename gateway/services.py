"""What the endpoints work with, built once per process by the app's lifespan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import anyio
import anyio.to_thread
import redis.asyncio as aioredis
from eventsourcing.application import AggregateNotFoundError
from starlette.requests import HTTPConnection

from domain.application import JobsApplication
from domain.errors import JobNotFoundError
from domain.job import Job
from domain.settings import StoreSettings
from gateway.board import JobBoard
from gateway.db import Database, create_database
from gateway.fanout import Fanout
from gateway.settings import GatewaySettings
from gateway.tokens import TokenStore
from gateway.updates import UpdateHistory
from gateway.uploads import BuildUploads
from trainer.modelstore import ModelStore, ModelStoreSettings, create_model_store

T = TypeVar("T")


@dataclass
class Services:
    """The gateway's connections and the objects built on them."""

    settings: GatewaySettings
    jobs: JobsApplication
    db: Database
    tokens: TokenStore
    uploads: BuildUploads
    board: JobBoard
    history: UpdateHistory
    models: ModelStore
    redis: aioredis.Redis
    limiter: anyio.CapacityLimiter
    fanout: Fanout

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking work (database, event store, model store) in a bounded worker thread."""
        return await anyio.to_thread.run_sync(func, *args, limiter=self.limiter)

    def owned_job(self, job_id: str, client_id: str) -> Job:
        """The client's job from the event store; JobNotFoundError for anyone else's (blocks)."""
        uuid = parse_job_id(job_id)
        try:
            job: object = self.jobs.repository.get(uuid)
        except AggregateNotFoundError:
            raise JobNotFoundError(uuid) from None
        # A metrics stream's id is not a job, and another client's job does not exist for us.
        if not isinstance(job, Job) or job.client_id != client_id:
            raise JobNotFoundError(uuid)
        return job

    async def aclose(self) -> None:
        """Release everything, the event store last."""
        await self.fanout.aclose()
        await self.redis.aclose()
        await anyio.to_thread.run_sync(self.db.close)
        await anyio.to_thread.run_sync(self.jobs.close)


def parse_job_id(text: str) -> UUID:
    """A job id from a path; a malformed one is a job that does not exist."""
    try:
        return UUID(text)
    except ValueError:
        raise JobNotFoundError(NIL) from None


NIL = UUID(int=0)


def build_services(
    settings: GatewaySettings, store: StoreSettings, model_store: ModelStoreSettings
) -> Services:
    """Connect to the event store's database and build everything on it (blocks)."""
    db = create_database(store, settings.gateway_db_pool_size)
    db.open()
    try:
        tokens = TokenStore(db)
        tokens.create_table()
        uploads = BuildUploads(db)
        uploads.create_table()
        jobs = JobsApplication(store.eventsourcing_env(), max_attempts=store.max_attempts)
    except BaseException:
        db.close()
        raise
    return Services(
        settings=settings,
        jobs=jobs,
        db=db,
        tokens=tokens,
        uploads=uploads,
        board=JobBoard(db),
        history=UpdateHistory(jobs, db),
        models=create_model_store(model_store),
        redis=aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2, socket_connect_timeout=2
        ),
        limiter=anyio.CapacityLimiter(settings.gateway_db_threads),
        fanout=Fanout(settings.redis_url, settings.redis_key_prefix, settings.ws_queue_size),
    )


def services(conn: HTTPConnection) -> Services:
    """The services of the app serving this request."""
    found: object = conn.state.services
    assert isinstance(found, Services)
    return found
