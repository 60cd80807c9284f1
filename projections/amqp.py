"""Dispatch and control messages to RabbitMQ, each confirmed by the broker before it counts.

The channel has publisher confirms and `on_return_raises`, and every publish is
`mandatory`: a message the broker cannot route (no queue bound) raises instead of being
silently returned, and a publish returns only once the broker has taken responsibility
for it (for the quorum dispatch queue: written on a majority of its replicas).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aio_pika.exceptions import PublishError

from domain.contracts import Cancel, Dispatch, Topology

log = logging.getLogger(__name__)


class AmqpPublisher:
    """One connection and one confirming channel; `open()` declares what it publishes to."""

    def __init__(self, url: str, topology: Topology, *, timeout: float = 30.0) -> None:
        self.url = url
        self.topology = topology
        self.timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._control: AbstractExchange | None = None

    async def open(self) -> None:
        """Connect and declare the dead-letter exchange and queue, dispatch queue and control."""
        # Not a robust connection: a lost connection fails the publish, and the process stops
        # with an error rather than carrying on with publishes that may never be confirmed.
        self._connection = await aio_pika.connect(self.url, timeout=self.timeout)
        channel = self._channel = self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await channel.initialize(timeout=self.timeout)
        t = self.topology
        dlx = await channel.declare_exchange(
            t.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await channel.declare_queue(
            t.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(dlx)
        # The same arguments as handlers.app.work_queue and the train node declare: RabbitMQ
        # refuses a redeclaration with other arguments (PRECONDITION_FAILED).
        await channel.declare_queue(t.dispatch, durable=True, arguments=t.work_queue_arguments())
        self._control = await channel.declare_exchange(
            t.control_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )

    @property
    def channel(self) -> AbstractChannel:
        """The confirming channel."""
        assert self._channel is not None, "open() first"
        return self._channel

    @staticmethod
    def _message(body: str, message_id: str) -> aio_pika.Message:
        return aio_pika.Message(
            body.encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
        )

    async def dispatch(self, dispatches: Sequence[Dispatch]) -> None:
        """Publish dispatches to the dispatch queue; return once the broker confirmed them all."""
        exchange = self.channel.default_exchange
        # Confirms are pipelined: one round trip for the whole batch, not one per message.
        await asyncio.gather(
            *(
                exchange.publish(
                    self._message(d.model_dump_json(), f"{d.job_id}:{d.attempt}"),
                    routing_key=self.topology.dispatch,
                    mandatory=True,
                    timeout=self.timeout,
                )
                for d in dispatches
            )
        )

    async def cancel(self, cancel: Cancel, node_id: str) -> bool:
        """Send a Cancel to one node's control queue; False if the node has no control queue."""
        assert self._control is not None, "open() first"
        try:
            await self._control.publish(
                self._message(cancel.model_dump_json(), f"{cancel.job_id}:{cancel.attempt}:cancel"),
                routing_key=node_id,
                mandatory=True,
                timeout=self.timeout,
            )
        except PublishError:
            return False
        return True

    async def close(self) -> None:
        """Close the channel and the connection."""
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
            self._channel = None
            self._control = None
