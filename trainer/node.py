"""The train node daemon: `faststream run trainer.node:app`.

It takes a dispatch only when it has a free slot (one `basic.get` per free slot: a consumer's
prefetch cannot bound the runs, because each dispatch is acked as soon as its claim is settled),
asks the central node for the claim, runs only a granted claim as a background `JobRun`, and acks
the dispatch then. Reports go to the reports queue, heartbeats (slots, running attempts) every few
seconds to the heartbeats queue. Its own control queue takes Cancel and Drain. SIGTERM drains for
up to TRAINYARD_DRAIN_TIMEOUT_S, then gives the remaining runs up (Failed, retryable). Runs are
recorded in Redis, so a node restarted after a crash stops what its predecessor left and reports
those attempts failed (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError
from faststream import AckPolicy, FastStream
from faststream.rabbit import RabbitBroker, RabbitQueue
from pydantic import ValidationError
from redis.asyncio import Redis

from domain.contracts import (
    REASON_HEADER,
    SOURCE_QUEUE_HEADER,
    AnyControl,
    AttemptRef,
    Cancel,
    ClaimReply,
    ClaimRequest,
    Dispatch,
    Drain,
    Failed,
    Heartbeat,
    Report,
    Topology,
)
from domain.rabbit import control_exchange, dead_letter_exchange, dead_letter_queue, work_queue
from trainer import procs
from trainer.archive import ArchiveLimits, ArchiveSettings
from trainer.builds import sweep_stale_fetches, sweep_unused_builds
from trainer.modelstore import ModelStore, ModelStoreSettings, create_model_store
from trainer.ports import PortAllocator
from trainer.runner import LOG_TAIL_BYTES, JobRun, RunnerConfig
from trainer.settings import NodeSettings
from trainer.state import NodeState, RunRecord

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

RunKey = tuple[UUID, int]


def control_queue(topology: Topology, node_id: str) -> RabbitQueue:
    """This node's control queue: durable, so a Cancel sent while the node restarts waits."""
    return RabbitQueue(
        topology.control_queue(node_id),
        durable=True,
        routing_key=node_id,
        arguments={"x-dead-letter-exchange": topology.dead_letter_exchange},
    )


def _tail(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            file.seek(0, 2)
            file.seek(max(0, file.tell() - LOG_TAIL_BYTES))
            return file.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


class TrainNode:
    """The node's runs, slots and background loops; `start()` and `shutdown()` bracket them."""

    def __init__(
        self,
        settings: NodeSettings,
        store: ModelStore,
        broker: RabbitBroker,
        archive_limits: ArchiveLimits | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.topology = Topology(settings.queue_prefix)
        self.ports = PortAllocator(settings.port_base, blocks=settings.port_blocks)
        self.runner_config = RunnerConfig(
            runs_root=settings.runs_dir.resolve(),
            builds_dir=settings.builds_dir.resolve(),
            node_id=settings.node_id,
            watchdog_s=settings.watchdog_s,
            grace_s=settings.stop_grace_s,
            timeout_wait_s=settings.timeout_wait_s,
            archive_limits=archive_limits or ArchiveLimits(),
        )
        self.runs: dict[RunKey, JobRun] = {}
        self.tasks: dict[RunKey, asyncio.Task[None]] = {}
        self.draining = False
        self.on_drained: list[Callable[[], None]] = []  # called once a drain has ended every run
        self.on_fatal: list[Callable[[], None]] = []  # called when a background loop fails
        self._claiming = 0
        self._changed = asyncio.Event()  # a slot freed, or the node began draining
        self._loops: list[asyncio.Task[None]] = []
        self._redis: Redis | None = None
        self._state: NodeState | None = None

    @property
    def state(self) -> NodeState:
        """The node's run records in Redis."""
        assert self._state is not None, "the node has not started"
        return self._state

    @property
    def free_slots(self) -> int:
        """Slots neither running nor being claimed."""
        return max(0, self.settings.trainer_slots - len(self.runs) - self._claiming)

    async def start(self) -> None:
        """Declare the topology, clean up after a predecessor, then take dispatches."""
        self._redis = Redis.from_url(self.settings.redis_url)
        self._state = NodeState(
            self._redis,
            key_prefix=self.settings.redis_key_prefix,
            node_id=self.settings.node_id,
            ttl_s=self.settings.run_state_ttl_s,
        )
        await self._declare()
        await self.recover()
        swept = await asyncio.to_thread(sweep_stale_fetches, self.runner_config.builds_dir)
        if swept:
            logger.info("removed %d leftovers of build fetches cut short", swept)
        await self._sweep_unused_builds()
        self._loops = [
            asyncio.create_task(self._pull_dispatches(), name="dispatch"),
            asyncio.create_task(self._heartbeats(), name="heartbeat"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A node that silently stopped taking work or sending heartbeats would look alive.
        logger.error(
            "the %s loop failed; stopping the node", task.get_name(), exc_info=task.exception()
        )
        self.draining = True
        for callback in self.on_fatal:
            callback()

    async def _declare(self) -> None:
        dlx = await self.broker.declare_exchange(dead_letter_exchange(self.topology))
        dlq = await self.broker.declare_queue(dead_letter_queue(self.topology))
        await dlq.bind(dlx)
        for name in self.topology.work_queues:
            await self.broker.declare_queue(work_queue(self.topology, name))
        await self.broker.declare_exchange(control_exchange(self.topology))

    async def recover(self) -> None:
        """Stop every run a crashed predecessor left, and report each failed (retryable)."""
        for record in await self.state.runs():
            leftovers = await asyncio.to_thread(procs.mentioning, f"{record.run_dir}{os.sep}")
            survivors = await asyncio.to_thread(procs.kill_all, leftovers)
            if survivors:
                logger.error("could not kill %s of %s", survivors, record.run_dir)
            seq = await self.state.last_seq(record.job_id, record.attempt) + 1
            await self.publish(
                Failed(
                    job_id=UUID(record.job_id),
                    attempt=record.attempt,
                    node_id=self.settings.node_id,
                    seq=seq,
                    reason=f"train node {self.settings.node_id} restarted after a crash; "
                    f"the run it left ({len(leftovers)} processes) was stopped",
                    log_tail=_tail(f"{record.run_dir}/trainer.log"),
                    retryable=True,
                )
            )
            await self.state.remove(record.job_id, record.attempt)
            logger.warning("reported lost run %s/%s failed", record.job_id, record.attempt)

    async def publish(self, report: Report) -> None:
        """Send a report; its seq is noted first, so that no successor reuses it."""
        await self.state.used_seq(report.job_id, report.attempt, report.seq)
        await self.broker.publish(report, queue=self.topology.reports, persist=True)

    # --- dispatches and claims ------------------------------------------------

    async def _pull_dispatches(self) -> None:
        queue = await self.broker.declare_queue(work_queue(self.topology, self.topology.dispatch))
        while not self.draining:
            self._changed.clear()
            if self.free_slots <= 0:
                await self._changed.wait()
                continue
            try:
                message = await queue.get(no_ack=False, fail=False)
            except AMQPError as error:
                logger.warning("could not read the dispatch queue: %r", error)
                message = None
            if message is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.settings.dispatch_poll_s)
                continue
            self._claiming += 1
            try:
                await self._take(message)
            except (AMQPError, ConnectionError) as error:
                # Unacked, the dispatch returns to the queue when the channel recovers.
                logger.warning("dispatch not settled: %r", error)
            finally:
                self._claiming -= 1

    async def _take(self, message: AbstractIncomingMessage) -> None:
        try:
            dispatch = Dispatch.model_validate_json(message.body)
        except ValidationError as error:
            await self._dead_letter(message, f"invalid message: {error}")
            await message.ack()
            return
        if (dispatch.job_id, dispatch.attempt) in self.runs:
            await message.ack()  # redelivered while it runs here
            return
        request = ClaimRequest(
            job_id=dispatch.job_id, attempt=dispatch.attempt, node_id=self.settings.node_id
        )
        try:
            response = await self.broker.request(
                request, queue=self.topology.claims, timeout=self.settings.claim_timeout_s
            )
            reply = ClaimReply.model_validate_json(response.body)
        except (TimeoutError, AMQPError, ValidationError) as error:
            # Unsettled: back to the queue for this node or another one to try again.
            logger.warning("claim of %s/%s failed: %r", dispatch.job_id, dispatch.attempt, error)
            await message.nack(requeue=True)
            return
        if not reply.granted:
            logger.info("claim of %s/%s refused: %s", dispatch.job_id, dispatch.attempt, reply)
            await message.ack()
            return
        self._start_run(dispatch)
        await message.ack()

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:4000]
        headers[SOURCE_QUEUE_HEADER] = self.topology.dispatch
        await self.broker.publish(
            message.body,
            exchange=dead_letter_exchange(self.topology),
            routing_key=self.topology.dispatch,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            persist=True,
        )
        logger.warning("dead-lettered dispatch %s: %s", message.message_id, reason[:300])

    # --- runs -----------------------------------------------------------------

    def _start_run(self, dispatch: Dispatch) -> None:
        key = (dispatch.job_id, dispatch.attempt)
        run = JobRun(
            dispatch,
            self.runner_config,
            self.ports,
            self.store,
            self.publish,
            on_launch=self._launched,
        )
        self.runs[key] = run
        self.tasks[key] = asyncio.create_task(self._run(key, run), name=f"run {key}")

    async def _sweep_unused_builds(self) -> None:
        """Delete uploaded builds no run used for `builds_keep_days` (at start, after runs)."""
        try:
            removed = await asyncio.to_thread(
                sweep_unused_builds,
                self.runner_config.builds_dir,
                self.settings.builds_keep_days,
            )
        except OSError as error:
            logger.warning("could not sweep unused builds: %s", error)
            return
        for sha256 in removed:
            logger.info(
                "deleted build %s: no run used it in %g days",
                sha256,
                self.settings.builds_keep_days,
            )

    def _record(self, run: JobRun) -> RunRecord:
        return RunRecord(
            job_id=str(run.dispatch.job_id),
            attempt=run.dispatch.attempt,
            run_dir=str(run.run_dir),
            pid=run.pid,
            port=run.port_block.base if run.port_block else None,
        )

    async def _launched(self, run: JobRun) -> None:
        await self.state.record(self._record(run))

    async def _run(self, key: RunKey, run: JobRun) -> None:
        ended = False
        try:
            # Recorded before anything starts, so a crash at any later moment is found.
            await self.state.record(self._record(run))
            await run.run()
            ended = True
        except Exception:
            # The terminal report did not go out; the record stays for the next start to report.
            logger.exception("run %s/%s ended without its report", *key)
        finally:
            del self.runs[key]
            del self.tasks[key]
            self._changed.set()
        if ended:
            await self.state.remove(str(key[0]), key[1])
        await self._sweep_unused_builds()
        if self.draining and not self.runs:
            for callback in self.on_drained:
                callback()

    # --- heartbeats and control -----------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """The node's current heartbeat."""
        return Heartbeat(
            node_id=self.settings.node_id,
            slots=self.settings.trainer_slots,
            free_slots=0 if self.draining else self.free_slots,
            running=[AttemptRef(job_id=job, attempt=attempt) for job, attempt in self.runs],
            draining=self.draining,
        )

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.broker.publish(self.heartbeat(), queue=self.topology.heartbeats)
            except AMQPError as error:
                logger.warning("heartbeat not sent: %r", error)
            await asyncio.sleep(self.settings.heartbeat_s)

    def control(self, message: Cancel | Drain) -> None:
        """Act on a control message from the central node."""
        if isinstance(message, Drain):
            logger.info("draining: %d runs to finish", len(self.runs))
            self.draining = True
            self._changed.set()
            if not self.runs:
                for callback in self.on_drained:
                    callback()
            return
        run = self.runs.get((message.job_id, message.attempt))
        if run is None:
            logger.info("cancel of %s/%s: not running here", message.job_id, message.attempt)
            return
        run.cancel()

    async def shutdown(self) -> None:
        """Finish running jobs for up to the drain timeout, then give the rest up."""
        self.draining = True
        self._changed.set()
        pending = set(self.tasks.values())
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=self.settings.drain_timeout_s)
        for run in list(self.runs.values()):
            run.abandon(f"train node {self.settings.node_id} shut down before the run ended")
        if pending:
            await asyncio.wait(pending)
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

    async def close(self) -> None:
        """Close the Redis client."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def create_app(
    settings: NodeSettings | None = None,
    model_store: ModelStoreSettings | None = None,
    archive: ArchiveSettings | None = None,
) -> FastStream:
    """Build the node, its broker and control subscriber; connects only when the app starts."""
    settings = settings or NodeSettings()
    store = create_model_store(model_store or ModelStoreSettings())
    topology = Topology(settings.queue_prefix)
    broker = RabbitBroker(settings.amqp_url, description=f"Trainyard train node {settings.node_id}")
    node = TrainNode(settings, store, broker, (archive or ArchiveSettings()).limits())

    @broker.subscriber(
        control_queue(topology, settings.node_id),
        exchange=control_exchange(topology),
        ack_policy=AckPolicy.REJECT_ON_ERROR,
        title="control",
    )
    async def on_control(message: AnyControl) -> None:
        """Cancel one of this node's runs, or drain the node."""
        node.control(message)

    app = FastStream(broker)
    node.on_drained.append(app.exit)
    node.on_fatal.append(app.exit)

    @app.on_startup
    async def start() -> None:
        await broker.connect()
        await node.start()

    @app.on_shutdown
    async def stop() -> None:
        await node.shutdown()

    @app.after_shutdown
    async def close() -> None:
        await node.close()

    return app


app = create_app()
