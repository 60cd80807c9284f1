"""The train node daemon with the real RabbitMQ, Redis, central handlers and mlagents-learn."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import onnx
import pytest
from faststream import TestApp
from faststream.rabbit import RabbitBroker
from redis.asyncio import Redis

from domain.application import JobsApplication
from domain.contracts import REASON_HEADER, Cancel, Dispatch, Drain, Heartbeat, Topology
from domain.job import Job, JobStatus
from domain.spec import EnvRef, JobSpec
from handlers.app import create_app as create_central
from handlers.settings import HandlerSettings
from tests.conftest import sqlite_settings
from tests.trainer.conftest import PROJECT_ROOT, free_base_port, ppo_config
from trainer import procs
from trainer.modelstore import LocalModelStore, ModelStoreSettings
from trainer.node import create_app as create_node
from trainer.settings import NodeSettings

AMQP_URL = os.environ.get("TRAINYARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
WAIT_S = 240.0  # an upper bound for a busy machine, not a speed requirement

pytestmark = pytest.mark.slow


@dataclass
class Setup:
    """One test's installation: central handlers, event store, broker client, node settings."""

    tmp: Path
    topology: Topology
    node: NodeSettings
    models: LocalModelStore
    jobs: JobsApplication
    client: RabbitBroker

    def submit(self, max_steps: int) -> Dispatch:
        """Submit a Reach job to the event store; return the dispatch the projections would send."""
        spec = JobSpec(
            config=ppo_config("Reach", max_steps, summary_freq=500),
            env=EnvRef(builtin="reach"),
            seed=3,
        )
        job_id = self.jobs.submit(spec, "client-1")
        return Dispatch(job_id=job_id, attempt=1, spec=spec.to_dict())

    async def dispatch(self, message: Dispatch | bytes) -> None:
        """Publish to the dispatch queue, as the projections process does."""
        await self.client.publish(message, queue=self.topology.dispatch, persist=True)

    async def job(self, job_id: uuid.UUID) -> Job:
        """The job as the event store has it now."""
        return await asyncio.to_thread(self.jobs.get_job, job_id)

    async def wait_job(self, job_id: uuid.UUID, check: Callable[[Job], bool], what: str) -> Job:
        """Poll the event store until the job satisfies `check`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while True:
            job = await self.job(job_id)
            if check(job):
                return job
            if loop.time() > deadline:
                pytest.fail(f"timed out waiting for {what}; job is {job.status} ({job.reason})")
            await asyncio.sleep(0.2)

    async def wait_progress(self, job_id: uuid.UUID) -> None:
        """Wait until the event store holds a progress report of the job: training is under way."""
        await self.wait_job(job_id, lambda j: j.status is JobStatus.RUNNING, "the job to run")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (await asyncio.to_thread(self.jobs.get_metrics, job_id)).version <= 1:
            if loop.time() > deadline:
                pytest.fail("timed out waiting for a progress report")
            await asyncio.sleep(0.2)

    def leftovers(self) -> list[list[str]]:
        """Command lines of processes still running in this test's run directories."""
        return [p.cmdline() for p in procs.mentioning(str(self.tmp / "runs")) if p.is_running()]


@asynccontextmanager
async def installation(tmp_path: Path) -> AsyncIterator[Setup]:
    """Central handlers in-process on a throwaway SQLite store; queues and keys deleted after."""
    tag = uuid.uuid4().hex[:12]
    prefix, key_prefix = f"test-{tag}.", f"test:{tag}:"
    store = sqlite_settings(tmp_path)
    central = create_central(
        HandlerSettings(
            amqp_url=AMQP_URL, redis_url=REDIS_URL, queue_prefix=prefix, redis_key_prefix=key_prefix
        ),
        store,
    )
    node = NodeSettings(
        node_id=f"node-{tag}",
        trainer_slots=1,
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        queue_prefix=prefix,
        redis_key_prefix=key_prefix,
        runs_dir=tmp_path / "runs",
        builds_dir=tmp_path / "builds",
        port_base=free_base_port() // 20 * 20,
        port_blocks=4,
        heartbeat_s=1.0,
        watchdog_s=120.0,
        drain_timeout_s=0.0,
    )
    jobs = JobsApplication(store.eventsourcing_env(), max_attempts=3)
    topology = Topology(prefix)
    try:
        async with TestApp(central), RabbitBroker(AMQP_URL) as client:
            await client.start()
            yield Setup(
                tmp_path, topology, node, LocalModelStore(tmp_path / "models"), jobs, client
            )
    finally:
        jobs.close()
        await delete_installation(topology, node.node_id, key_prefix)


async def delete_installation(topology: Topology, node_id: str, key_prefix: str) -> None:
    """Remove the test's queues, exchanges and Redis keys from the shared servers."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queues = (
            *topology.work_queues,
            topology.dead_letter_queue,
            topology.control_queue(node_id),
        )
        for name in queues:
            await channel.queue_delete(name)
        for exchange in (topology.dead_letter_exchange, topology.control_exchange):
            await channel.exchange_delete(exchange)
    redis = Redis.from_url(REDIS_URL)
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


async def dead_letters(topology: Topology) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every message now in the dead-letter queue."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_letter_queue, ensure=False)
        taken = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken


def model_settings(setup: Setup) -> ModelStoreSettings:
    return ModelStoreSettings(model_store="local", model_dir=setup.models.root)


async def test_a_dispatched_job_completes_and_a_malformed_one_is_dead_lettered(
    tmp_path: Path,
) -> None:
    async with installation(tmp_path) as setup:
        async with TestApp(create_node(setup.node, model_settings(setup))):
            await setup.dispatch(b'{"job_id": "not a uuid"}')
            dispatch = setup.submit(1000)
            await setup.dispatch(dispatch)

            job = await setup.wait_job(
                dispatch.job_id, lambda j: j.status.is_terminal, "the job to end"
            )

            assert job.status is JobStatus.COMPLETED, job.reason
            assert job.node_id == setup.node.node_id
            assert job.model_key is not None
            with setup.models.open(job.model_key) as reader:
                model = reader.read()
            assert reader.info.sha256 == job.model_sha256
            onnx.checker.check_model(onnx.load_from_string(model))
            metrics = await asyncio.to_thread(setup.jobs.get_metrics, dispatch.job_id)
            assert metrics.version > 1  # progress reports were recorded

            (letter,) = await dead_letters(setup.topology)
            assert letter.body == b'{"job_id": "not a uuid"}'
            reason = str((letter.headers or {})[REASON_HEADER])
            assert reason.startswith("invalid message")
            assert "job_id" in reason
        assert setup.leftovers() == []


async def test_cancel_mid_run_stops_the_run_and_the_job_is_cancelled(tmp_path: Path) -> None:
    async with (
        installation(tmp_path) as setup,
        TestApp(create_node(setup.node, model_settings(setup))),
    ):
        dispatch = setup.submit(100_000)
        await setup.dispatch(dispatch)
        await setup.wait_progress(dispatch.job_id)
        assert setup.leftovers() != []
        # The node's heartbeats keep its presence and the attempt's lease alive.
        redis = Redis.from_url(REDIS_URL)
        try:
            prefix = setup.node.redis_key_prefix
            assert await redis.get(f"{prefix}lease:{dispatch.job_id}:1") == (
                setup.node.node_id.encode()
            )
            beat = Heartbeat.model_validate_json(
                await redis.get(f"{prefix}node:{setup.node.node_id}") or b""
            )
        finally:
            await redis.aclose()
        assert (beat.slots, beat.free_slots) == (1, 0)
        assert [ref.job_id for ref in beat.running] == [dispatch.job_id]

        await asyncio.to_thread(setup.jobs.request_cancel, dispatch.job_id)
        await setup.client.publish(
            Cancel(job_id=dispatch.job_id, attempt=1),
            exchange=setup.topology.control_exchange,
            routing_key=setup.node.node_id,
        )

        job = await setup.wait_job(dispatch.job_id, lambda j: j.status.is_terminal, "the end")
        assert job.status is JobStatus.CANCELLED
        assert setup.leftovers() == []


def start_node_process(setup: Setup) -> subprocess.Popen[bytes]:
    """`faststream run trainer.node:app` with the test's settings in its environment."""
    node = setup.node
    environ = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "TRAINYARD_NODE_ID": node.node_id,
        "TRAINYARD_AMQP_URL": node.amqp_url,
        "TRAINYARD_REDIS_URL": node.redis_url,
        "TRAINYARD_QUEUE_PREFIX": node.queue_prefix,
        "TRAINYARD_REDIS_KEY_PREFIX": node.redis_key_prefix,
        "TRAINYARD_RUNS_DIR": str(node.runs_dir),
        "TRAINYARD_BUILDS_DIR": str(node.builds_dir),
        "TRAINYARD_PORT_BASE": str(node.port_base),
        "TRAINYARD_PORT_BLOCKS": str(node.port_blocks),
        "TRAINYARD_HEARTBEAT_S": "1",
        "TRAINYARD_DRAIN_TIMEOUT_S": "0",
        "TRAINYARD_MODEL_STORE": "local",
        "TRAINYARD_MODEL_DIR": str(setup.models.root),
    }
    log = (setup.tmp / "node.log").open("ab")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "faststream", "run", "trainer.node:app"],
            cwd=setup.tmp,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_a_node_restarted_after_sigkill_stops_the_lost_run_and_reports_it(
    tmp_path: Path,
) -> None:
    async with installation(tmp_path) as setup:
        first = start_node_process(setup)
        second: subprocess.Popen[bytes] | None = None
        try:
            dispatch = setup.submit(100_000)
            await setup.dispatch(dispatch)
            await setup.wait_progress(dispatch.job_id)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            # Its trainer and build live on in sessions of their own.
            assert setup.leftovers() != []

            second = start_node_process(setup)
            job = await setup.wait_job(
                dispatch.job_id, lambda j: j.attempt == 2, "the lost attempt to be reported"
            )

            assert job.status is JobStatus.QUEUED  # failed as retryable: the next attempt waits
            assert setup.leftovers() == []
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0, (setup.tmp / "node.log").read_text()[-3000:]
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
            procs.kill_all(procs.mentioning(str(tmp_path / "runs")))


async def test_sigterm_gives_a_running_job_up_as_retryable_and_exits(tmp_path: Path) -> None:
    async with installation(tmp_path) as setup:
        node = start_node_process(setup)  # with TRAINYARD_DRAIN_TIMEOUT_S=0
        try:
            dispatch = setup.submit(100_000)
            await setup.dispatch(dispatch)
            await setup.wait_progress(dispatch.job_id)

            node.send_signal(signal.SIGTERM)

            assert await asyncio.to_thread(node.wait, 120) == 0
            job = await setup.job(dispatch.job_id)
            assert (job.status, job.attempt) == (JobStatus.QUEUED, 2)
            assert setup.leftovers() == []
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=30)
            procs.kill_all(procs.mentioning(str(tmp_path / "runs")))


async def test_drain_finishes_the_running_job_claims_nothing_new_and_exits(
    tmp_path: Path,
) -> None:
    async with installation(tmp_path) as setup:
        node = start_node_process(setup)
        try:
            running = setup.submit(1500)
            await setup.dispatch(running)
            await setup.wait_progress(running.job_id)

            await setup.client.publish(
                Drain(),
                exchange=setup.topology.control_exchange,
                routing_key=setup.node.node_id,
            )
            waiting = setup.submit(1000)
            await setup.dispatch(waiting)

            assert await asyncio.to_thread(node.wait, WAIT_S) == 0
            assert (await setup.job(running.job_id)).status is JobStatus.COMPLETED
            assert (await setup.job(waiting.job_id)).status is JobStatus.QUEUED
            assert setup.leftovers() == []
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=30)
            procs.kill_all(procs.mentioning(str(tmp_path / "runs")))
