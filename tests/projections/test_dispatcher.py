"""The dispatcher publishes each queued attempt and each cancel to the real RabbitMQ, tracked."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from eventsourcing.persistence import TrackingRecorder

from domain.application import JobsApplication
from domain.contracts import Cancel, Dispatch
from domain.settings import StoreSettings
from projections.dispatcher import DISPATCHER_NAME, Dispatcher, DispatcherStoppedError
from projections.tracking import build_tracking, close_tracking
from tests.conftest import postgres_settings
from tests.projections.conftest import spec
from tests.projections.rabbit import AMQP_URL, Broker, broker
from tests.projections.test_process import WAIT_S, Process


@pytest.fixture
async def rabbit() -> AsyncIterator[Broker]:
    async with broker() as state:
        yield state


@pytest.fixture
def trackings(store_settings: StoreSettings) -> Iterator[list[TrackingRecorder]]:
    """Tracking recorders opened by a test (one per dispatcher 'process'), closed afterwards."""
    opened: list[TrackingRecorder] = []
    try:
        yield opened
    finally:
        for recorder in opened:
            close_tracking(recorder)


def start_dispatcher(
    app: JobsApplication,
    store: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> Dispatcher:
    """A dispatcher as a fresh process builds it: its position read from its tracking table."""
    tracking = build_tracking(store, DISPATCHER_NAME)
    trackings.append(tracking)
    return Dispatcher(app, tracking, rabbit.publisher, batch_size=2)


async def test_a_submitted_job_is_dispatched_once_with_its_spec_even_after_restarts(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    first = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    assert await first.catch_up() == 1
    (message,) = await rabbit.take(rabbit.topology.dispatch)
    dispatch = Dispatch.model_validate(message)
    assert (dispatch.job_id, dispatch.attempt) == (job_id, 1)
    assert dispatch.spec == spec().to_dict() == jobs_app.get_job(job_id).spec
    assert dispatch.job_spec() == spec()

    # Restarted, it resumes after what it recorded: nothing is sent twice, the next job is.
    second = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    assert second.position == first.position
    assert await second.catch_up() == 0
    assert await rabbit.dispatched() == []
    other = jobs_app.submit(spec(), client_id="client-b")
    assert await second.catch_up() == 1
    assert await start_dispatcher(jobs_app, store_settings, rabbit, trackings).catch_up() == 0
    assert await rabbit.dispatched() == [(str(other), 1)]


async def test_a_crash_between_the_confirm_and_the_record_sends_the_batch_again(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    crashed = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    # Published and confirmed, then the process dies before recording the position.
    await crashed.publish(crashed.read(None))
    assert crashed.tracking.max_tracking_id(jobs_app.name) is None

    restarted = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    await restarted.catch_up()
    assert await rabbit.dispatched() == [(str(job_id), 1), (str(job_id), 1)]
    last = jobs_app.recorder.max_notification_id()
    assert restarted.tracking.max_tracking_id(jobs_app.name) == last


async def test_an_attempt_claimed_before_the_dispatcher_reaches_it_is_not_dispatched(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    claimed = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(claimed, 1, "node-1")
    waiting = jobs_app.submit(spec(), client_id="client-a")
    await start_dispatcher(jobs_app, store_settings, rabbit, trackings).catch_up()
    assert await rabbit.dispatched() == [(str(waiting), 1)]


async def test_a_cancel_request_goes_to_the_node_that_holds_the_attempt(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    holder = await rabbit.control_queue("node-1")
    bystander = await rabbit.control_queue("node-2")
    job_id = jobs_app.submit(spec(), client_id="client-a")
    dispatcher = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    await dispatcher.catch_up()
    assert await rabbit.dispatched() == [(str(job_id), 1)]
    assert jobs_app.claim(job_id, 1, "node-1").granted
    jobs_app.report_started(job_id, 1, 1, {}, node_id="node-1")
    jobs_app.request_cancel(job_id)

    await dispatcher.catch_up()
    (message,) = await rabbit.take(holder)
    assert Cancel.model_validate(message) == Cancel(job_id=job_id, attempt=1)
    assert await rabbit.take(bystander) == []
    assert await rabbit.dispatched() == []


async def test_a_cancel_for_a_node_without_a_control_queue_does_not_stop_the_dispatcher(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(job_id, 1, "gone-node")
    jobs_app.request_cancel(job_id)
    dispatcher = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    with caplog.at_level(logging.WARNING):
        await dispatcher.catch_up()
    assert f"cancel of {job_id}/1 not delivered: node gone-node has no control queue" in caplog.text
    assert dispatcher.position == jobs_app.recorder.max_notification_id()


async def test_a_dispatch_the_broker_cannot_route_stops_the_dispatcher_unrecorded(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    jobs_app.submit(spec(), client_id="client-a")
    await rabbit.channel.queue_delete(rabbit.topology.dispatch)  # e.g. deleted by an operator
    dispatcher = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    unroutable = r"after position None: events 1\.\.2 could not be dispatched: .*NO_ROUTE"
    with pytest.raises(DispatcherStoppedError, match=unroutable):
        await dispatcher.catch_up()
    assert dispatcher.tracking.max_tracking_id(jobs_app.name) is None


@pytest.mark.slow
async def test_the_process_dispatches_expires_silent_leases_and_stops_cleanly(
    pg_schema: str, rabbit: Broker, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = postgres_settings(pg_schema)
    app = JobsApplication(store.eventsourcing_env())
    for name, value in {
        "TRAINYARD_AMQP_URL": AMQP_URL,
        "TRAINYARD_QUEUE_PREFIX": rabbit.topology.prefix,
        "TRAINYARD_LEASE_TTL_S": "1",
        "TRAINYARD_WATCHDOG_GRACE_S": "0",
        "TRAINYARD_WATCHDOG_INTERVAL_S": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    log = tmp_path / "projections.log"
    process = Process(store, prefix, log)
    try:
        job_id = await asyncio.to_thread(app.submit, spec(), "client-a")
        seen: list[tuple[str, int]] = []

        async def dispatched(expected: list[tuple[str, int]]) -> bool:
            seen.extend(await rabbit.dispatched())
            return seen == expected

        await eventually(lambda: dispatched([(str(job_id), 1)]), "attempt 1 to be dispatched")
        # Claimed, and no heartbeat ever renews the lease: the watchdog re-queues the job.
        assert (await asyncio.to_thread(app.claim, job_id, 1, "node-1")).granted
        expected = [(str(job_id), 1), (str(job_id), 2)]
        await eventually(lambda: dispatched(expected), "attempt 2 to be dispatched")
        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait) == 0
    finally:
        if process.proc.poll() is None:
            process.kill()
        app.close()
    text = log.read_text()
    assert "dispatcher stopped cleanly" in text
    assert "lease watchdog stopped cleanly" in text
    assert f"lease of {job_id}/1 on node node-1 expired" in text


@pytest.mark.slow
def test_an_unreachable_broker_ends_the_process_with_a_clear_line(
    pg_schema: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINYARD_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    monkeypatch.setenv("TRAINYARD_AMQP_TIMEOUT_S", "5")
    log = tmp_path / "projections.log"
    assert Process(postgres_settings(pg_schema), prefix, log).wait() == 1
    assert "ERROR projections broker failed, stopping: " in log.read_text()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
