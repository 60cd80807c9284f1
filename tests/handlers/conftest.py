"""The handlers app running in-process on the real RabbitMQ, Redis and event store."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from faststream import TestApp
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from domain.application import JobsApplication
from domain.contracts import Topology
from domain.settings import StoreSettings
from handlers.app import create_app
from handlers.settings import HandlerSettings

AMQP_URL = os.environ.get("TRAINYARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WAIT_S = 180.0  # an upper bound for a busy machine, not a speed requirement


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll `check` until it holds; fail with `what` if it never does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Central:
    """The running handlers app, and what a test needs to drive and inspect it."""

    settings: HandlerSettings
    topology: Topology
    client: RabbitBroker  # what a train node would use
    jobs: JobsApplication  # the test's own view of the same event store
    redis: Redis

    async def dead_letters(self) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every message now in the dead-letter queue."""
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(self.topology.dead_letter_queue, ensure=False)
            taken = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
            return taken

    async def wait_dead_letters(self, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Collect dead letters until there are `count` of them."""
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def enough() -> bool:
            taken.extend(await self.dead_letters())
            return len(taken) >= count

        await eventually(enough, f"{count} dead letters")
        return taken

    async def publish(self, message: Any, queue: str, **options: Any) -> None:
        """Publish as a train node does, confirmed by the broker."""
        await self.client.publish(message, queue=queue, persist=True, **options)


async def delete_topology(topology: Topology) -> None:
    """Remove the test's queues and exchanges from the shared RabbitMQ."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in (*topology.work_queues, topology.dead_letter_queue):
            await channel.queue_delete(name)
        for exchange in (topology.dead_letter_exchange, topology.control_exchange):
            await channel.exchange_delete(exchange)


@pytest.fixture
def handler_settings() -> HandlerSettings:
    """Settings with queue names and Redis keys of this test only."""
    tag = uuid.uuid4().hex[:12]
    return HandlerSettings(
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        queue_prefix=f"test-{tag}.",
        redis_key_prefix=f"test:{tag}:",
        lease_ttl_s=60,
        node_ttl_s=30,
        claims_prefetch=8,
        reports_prefetch=1,
        heartbeats_prefetch=16,
    )


@pytest.fixture
def test_jobs(store_settings: StoreSettings) -> Iterator[JobsApplication]:
    """The test's own JobsApplication on the store the app uses."""
    jobs = JobsApplication(store_settings.eventsourcing_env(), max_attempts=3)
    try:
        yield jobs
    finally:
        jobs.close()


@asynccontextmanager
async def running_central(
    settings: HandlerSettings, store: StoreSettings, jobs: JobsApplication
) -> AsyncIterator[Central]:
    """Start the handlers app in-process; delete its queues and Redis keys afterwards."""
    topology = Topology(settings.queue_prefix)
    app = create_app(settings, store)
    redis = Redis.from_url(REDIS_URL)
    try:
        async with TestApp(app), RabbitBroker(AMQP_URL) as client:
            await client.start()
            yield Central(settings, topology, client, jobs, redis)
    finally:
        keys = [k async for k in redis.scan_iter(match=f"{settings.redis_key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await delete_topology(topology)


@pytest.fixture
async def central(
    handler_settings: HandlerSettings, store_settings: StoreSettings, test_jobs: JobsApplication
) -> AsyncIterator[Central]:
    """The handlers app started in-process, and a train node's broker client."""
    async with running_central(handler_settings, store_settings, test_jobs) as running:
        yield running
