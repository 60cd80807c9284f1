"""The handlers process: train-node claims, reports and heartbeats in, commands and Redis keys out.

Run it with `faststream run handlers.app:app`. `create_app` is the composition
root; nothing connects until the app starts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import TYPE_CHECKING

from faststream import AckPolicy, FastStream
from faststream.rabbit import (
    Channel,
    RabbitBroker,
)
from faststream.rabbit.annotations import RabbitMessage
from faststream.specification import AsyncAPI
from redis.asyncio import Redis

from domain.application import JobsApplication
from domain.contracts import (
    AnyControl,
    AnyReport,
    ClaimReply,
    ClaimRequest,
    Dispatch,
    Heartbeat,
    Topology,
)
from domain.errors import JobNotFoundError
from domain.rabbit import control_exchange, dead_letter_exchange, dead_letter_queue, work_queue
from domain.settings import StoreSettings
from handlers.batcher import ReportBatcher
from handlers.deadletter import DeadLetterPolicy
from handlers.presence import Presence
from handlers.settings import HandlerSettings

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# The AsyncAPI document names this server rather than the configured URL (which holds a password).
SPEC_SERVER = "amqp://rabbitmq:5672/"


class Runtime:
    """The process's connections: opened on startup, closed after the broker stops."""

    def __init__(self, settings: HandlerSettings, store: StoreSettings) -> None:
        self.settings = settings
        self.store = store
        self._jobs: JobsApplication | None = None
        self._presence: Presence | None = None
        self.reports = ReportBatcher(lambda: self.jobs, max_batch=settings.reports_prefetch)

    @property
    def jobs(self) -> JobsApplication:
        """The application every report and claim goes through."""
        assert self._jobs is not None, "the app has not started"
        return self._jobs

    @property
    def presence(self) -> Presence:
        """Node presence and leases in Redis."""
        assert self._presence is not None, "the app has not started"
        return self._presence

    async def open(self) -> None:
        """Open the event store (it may create its tables) and the Redis client."""
        env = self.store.eventsourcing_env()
        self._jobs = await asyncio.to_thread(
            JobsApplication, env, max_attempts=self.store.max_attempts
        )
        self._presence = Presence(
            Redis.from_url(self.settings.redis_url),
            key_prefix=self.settings.redis_key_prefix,
            node_ttl_s=self.settings.node_ttl_s,
            lease_ttl_s=self.settings.lease_ttl_s,
        )

    async def close(self) -> None:
        """Close what open() opened."""
        if self._presence is not None:
            await self._presence.redis.aclose()
            self._presence = None
        if self._jobs is not None:
            await asyncio.to_thread(self._jobs.close)
            self._jobs = None


async def declare_topology(broker: RabbitBroker, topology: Topology) -> None:
    """Declare what must exist before the first message fails or is published."""
    dlx = await broker.declare_exchange(dead_letter_exchange(topology))
    dlq = await broker.declare_queue(dead_letter_queue(topology))
    await dlq.bind(dlx)
    # Dispatches published before any train node starts must not be dropped.
    await broker.declare_queue(work_queue(topology, topology.dispatch))
    await broker.declare_exchange(control_exchange(topology))


def create_app(
    settings: HandlerSettings | None = None, store: StoreSettings | None = None
) -> FastStream:
    """Build the broker, its subscribers and the app; connects only when the app starts."""
    settings = settings or HandlerSettings()
    store = store or StoreSettings()
    topology = Topology(settings.queue_prefix)
    runtime = Runtime(settings, store)

    broker = RabbitBroker(
        settings.amqp_url,
        # "Received"/"Processed" for every message is too much at hundreds of reports a
        # second (about a tenth of the process's CPU); failures are still logged as errors.
        log_level=logging.DEBUG,
        specification_url=SPEC_SERVER,
        description="Trainyard central node: claims, reports and heartbeats from train nodes",
    )
    broker.add_middleware(DeadLetterPolicy(broker, topology))

    @broker.subscriber(
        work_queue(topology, topology.claims),
        channel=Channel(prefetch_count=settings.claims_prefetch),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        title="claims",
    )
    def on_claim(request: ClaimRequest) -> ClaimReply:
        """Grant an attempt to exactly one node; the reply goes to the request's reply-to."""
        try:
            result = runtime.jobs.claim(request.job_id, request.attempt, request.node_id)
        except JobNotFoundError as error:
            # The node waits for an answer, and "no" lets it drop the dispatch at once.
            return ClaimReply(granted=False, reason=str(error))
        return ClaimReply(granted=result.granted, reason=result.reason)

    @broker.subscriber(
        work_queue(topology, topology.reports),
        channel=Channel(prefetch_count=settings.reports_prefetch),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        title="reports",
    )
    async def on_report(report: AnyReport, message: RabbitMessage) -> None:
        """Record a started, progress, completed, failed or cancelled report as events."""
        # A job's reports are applied in delivery order; consecutive progress reports of a
        # job that arrive together are recorded by one command (see handlers/batcher.py).
        order = message.raw_message.delivery_tag or 0
        outcome = await runtime.reports.apply(report, order)
        logger.debug(
            "%s %s/%s seq %s: %s", report.kind, report.job_id, report.attempt, report.seq, outcome
        )

    @broker.subscriber(
        work_queue(topology, topology.heartbeats),
        channel=Channel(prefetch_count=settings.heartbeats_prefetch),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        title="heartbeats",
    )
    async def on_heartbeat(beat: Heartbeat) -> None:
        """Refresh the node's presence and its attempts' leases (not events)."""
        await runtime.presence.record(beat)

    # Documented only: the claim reply goes to the request's reply-to address; the projections
    # process publishes dispatch and control messages, which the train nodes consume.
    broker.publisher(
        "amq.rabbitmq.reply-to",
        title="claims-reply",
        schema=ClaimReply,
        description="The answer to a claim, sent to the requester's reply-to queue",
    )
    broker.publisher(
        topology.dispatch,
        title="dispatch",
        schema=Dispatch,
        description="A queued attempt, for whichever train node claims it first",
    )
    broker.publisher(
        exchange=control_exchange(topology),
        routing_key="node-id",
        title="control",
        schema=AnyControl,
        description="Cancel or drain, routed to one node's control queue by its node id",
    )

    app = FastStream(
        broker,
        specification=AsyncAPI(
            title="Trainyard",
            version="0.1.0",
            description="Messages between the central node and the train nodes",
        ),
    )

    @app.on_startup
    async def start() -> None:
        await runtime.open()
        await broker.connect()
        await declare_topology(broker, topology)

    @app.after_shutdown
    async def stop() -> None:
        await runtime.close()

    return app


app = create_app()


@app.after_startup
async def settle_heap() -> None:
    """Keep what start-up built out of the garbage collector's way from here on.

    Imports and connections leave ~100,000 long-lived objects; every full collection walks
    them all and stalls message handling for tens of milliseconds. Frozen, they are skipped.
    Only this process's app does this (tests build their own apps with `create_app`).
    """
    gc.collect()
    gc.freeze()
