"""The RabbitMQ objects the central node and the train nodes both declare, declared alike.

RabbitMQ refuses a second declaration of a queue or exchange whose arguments differ, so every
process builds them here from `domain.contracts.Topology`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

from domain.contracts import Topology

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import QuorumQueueArgs


def work_queue(topology: Topology, name: str) -> RabbitQueue:
    """A shared work queue (claims, reports, heartbeats, dispatch): quorum, delivery-limited."""
    return RabbitQueue(
        name,
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments=cast("QuorumQueueArgs", topology.work_queue_arguments()),
    )


def control_exchange(topology: Topology) -> RabbitExchange:
    """The direct exchange of control messages, routed by node id."""
    return RabbitExchange(topology.control_exchange, type=ExchangeType.DIRECT, durable=True)


def dead_letter_exchange(topology: Topology) -> RabbitExchange:
    """The fanout exchange every work queue dead-letters into."""
    return RabbitExchange(topology.dead_letter_exchange, type=ExchangeType.FANOUT, durable=True)


def dead_letter_queue(topology: Topology) -> RabbitQueue:
    """The queue that keeps dead-lettered messages, bound to `dead_letter_exchange`."""
    return RabbitQueue(topology.dead_letter_queue, queue_type=QueueType.QUORUM, durable=True)
