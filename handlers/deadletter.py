"""What happens to a message its handler could not process: retry it, or dead-letter it with why.

A message that can never succeed (not JSON, failing validation, naming an unknown
job, breaking a lifecycle rule) is published to the dead-letter exchange with the
reason in the `x-trainyard-reason` header, and only then acked: RabbitMQ's own
dead-lettering on reject would record only "rejected", and quorum queues
dead-letter at most once, so a rejected message could be lost without trace.
A transient failure (the database is down or busy, concurrent writers kept
conflicting, Redis is unreachable) is nacked back to the queue until its last
allowed delivery, which dead-letters it the same way; the queue's
`x-delivery-limit` remains the backstop for a handler that dies mid-message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from types import TracebackType
from typing import Any, Final

import psycopg
import redis.exceptions
from aio_pika import IncomingMessage
from eventsourcing import persistence
from faststream import BaseMiddleware, ContextRepo
from faststream.exceptions import HandlerException, NackMessage
from faststream.rabbit import RabbitBroker
from pydantic import ValidationError

from domain.contracts import DELIVERY_LIMIT, REASON_HEADER, SOURCE_QUEUE_HEADER, Topology
from domain.errors import ConcurrencyConflictError, TrainyardError
from domain.rabbit import dead_letter_exchange

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    ConcurrencyConflictError,
    persistence.OperationalError,
    persistence.InterfaceError,
    psycopg.OperationalError,  # includes psycopg_pool.PoolTimeout
    psycopg.InterfaceError,
    sqlite3.OperationalError,  # "database is locked"
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)
MAX_REASON: Final = 4000


def reason_for(error: BaseException) -> str:
    """A one-line reason for a human reading the dead-letter queue."""
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()
        )
        text = f"invalid message: {problems}"
    elif isinstance(error, json.JSONDecodeError | UnicodeDecodeError):
        text = f"invalid message: not JSON ({error})"
    elif isinstance(error, TrainyardError):
        text = f"unprocessable: {type(error).__name__}: {error}"
    else:
        text = f"handler error: {type(error).__name__}: {error}"
    return text[:MAX_REASON]


def delivery_count(message: IncomingMessage) -> int:
    """How many times this message was delivered before (quorum queues count returns)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


class DeadLetterPolicy:
    """Builds the per-message middleware; holds what it needs to dead-letter."""

    def __init__(self, broker: RabbitBroker, topology: Topology) -> None:
        self.broker = broker
        self.topology = topology
        self.exchange = dead_letter_exchange(topology)

    def __call__(self, msg: Any, /, *, context: ContextRepo) -> _DeadLetterMiddleware:
        """A middleware for one message."""
        return _DeadLetterMiddleware(msg, context=context, policy=self)

    async def dead_letter(self, message: IncomingMessage, reason: str) -> None:
        """Publish a copy of `message` to the dead-letter exchange, with the reason."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REASON_HEADER] = reason
        headers[SOURCE_QUEUE_HEADER] = message.routing_key or ""
        await self.broker.publish(
            message.body,
            exchange=self.exchange,
            routing_key=message.routing_key or "",
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            persist=True,
        )
        logger.warning(
            "dead-lettered message %s from %s: %s", message.message_id, message.routing_key, reason
        )


class _DeadLetterMiddleware(BaseMiddleware):
    """Settles a failed message: nack for a retry, or dead-letter it and ack."""

    def __init__(self, msg: Any, /, *, context: ContextRepo, policy: DeadLetterPolicy) -> None:
        super().__init__(msg, context=context)
        self.policy = policy

    async def after_processed(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> bool | None:
        """Decide what a failure means; the acknowledgement middleware then settles it."""
        if exc_val is None or isinstance(exc_val, HandlerException | asyncio.CancelledError):
            return False
        if not isinstance(exc_val, Exception) or not isinstance(self.msg, IncomingMessage):
            return False
        deliveries = delivery_count(self.msg) + 1
        if isinstance(exc_val, TRANSIENT_ERRORS):
            if deliveries <= DELIVERY_LIMIT:
                logger.info("transient error on delivery %d, requeued: %r", deliveries, exc_val)
                raise NackMessage(requeue=True) from exc_val
            reason = f"gave up after {deliveries} deliveries: {reason_for(exc_val)}"
        else:
            reason = reason_for(exc_val)
        try:
            await self.policy.dead_letter(self.msg, reason[:MAX_REASON])
        except Exception as error:
            # Not stored anywhere yet: keep the original for another try.
            logger.error("could not dead-letter (%r), requeued: %s", error, reason)
            raise NackMessage(requeue=True) from error
        # Suppressed: the acknowledgement middleware acks it, as the copy is safely stored.
        return True
