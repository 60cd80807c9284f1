"""The real RabbitMQ for the dispatcher and watchdog tests: a throwaway topology per test."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from domain.contracts import Topology
from projections.amqp import AmqpPublisher

AMQP_URL = os.environ.get("TRAINYARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Broker:
    """A publisher on a topology of this test alone, and a plain channel to look at it."""

    topology: Topology
    publisher: AmqpPublisher
    channel: AbstractChannel
    queues: list[str] = field(default_factory=list)

    async def control_queue(self, node_id: str) -> str:
        """Declare a node's control queue as the train node does; returns its name."""
        name = self.topology.control_queue(node_id)
        self.queues.append(name)
        queue = await self.channel.declare_queue(
            name,
            durable=True,
            arguments={"x-dead-letter-exchange": self.topology.dead_letter_exchange},
        )
        await queue.bind(self.topology.control_exchange, routing_key=node_id)
        return name

    async def take(self, queue_name: str) -> list[dict[str, Any]]:
        """Every message now in the queue (acked), as JSON, in queue order."""
        queue = await self.channel.get_queue(queue_name, ensure=False)
        bodies: list[dict[str, Any]] = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(json.loads(message.body))
        return bodies

    async def dispatched(self) -> list[tuple[str, int]]:
        """(job id, attempt) of every Dispatch now on the dispatch queue."""
        return [(m["job_id"], m["attempt"]) for m in await self.take(self.topology.dispatch)]


@asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    """An opened publisher on a fresh prefix; its queues and exchanges are deleted afterwards."""
    topology = Topology(f"test-{uuid.uuid4().hex[:12]}.")
    publisher = AmqpPublisher(AMQP_URL, topology, timeout=30)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    state = Broker(topology, publisher, channel)
    try:
        await publisher.open()
        yield state
    finally:
        await publisher.close()
        for name in [topology.dispatch, topology.dead_letter_queue, *state.queues]:
            await channel.queue_delete(name)
        for name in [topology.control_exchange, topology.dead_letter_exchange]:
            await channel.exchange_delete(name)
        await connection.close()
