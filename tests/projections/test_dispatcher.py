"""The dispatcher publishes each queued attempt and each cancel to the real RabbitMQ, tracked."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import TrackingRecorder

from domain.application import JobsApplication, Outcome
from domain.contracts import Cancel, Dispatch
from domain.settings import StoreSettings
from projections.__main__ import build_lock
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
    **options: Any,
) -> Dispatcher:
    """A dispatcher as a fresh process builds it: its position read from its tracking table."""
    tracking = build_tracking(store, DISPATCHER_NAME)
    trackings.append(tracking)
    return Dispatcher(app, tracking, rabbit.publisher, batch_size=2, **options)


def start_job(app: JobsApplication, job_id: UUID, node_id: str = "node-1") -> None:
    """Attempt 1 of the job claimed by `node_id` and started, so that it reports progress."""
    assert app.claim(job_id, 1, node_id).granted
    app.report_started(job_id, 1, 1, {}, node_id=node_id)


def report_progress(
    app: JobsApplication, job_id: UUID, count: int, node_id: str = "node-1"
) -> None:
    """`count` progress reports of attempt 1, one event each."""
    seq = app.get_metrics(job_id).version
    for i in range(count):
        outcome = app.report_progress(job_id, 1, seq + i + 1, i, {"loss": 0.5}, node_id=node_id)
        assert outcome is Outcome.APPLIED


# Bounds no test reaches by itself: a position is recorded only when a batch sends, or on stop.
NEVER_DUE = {"record_after_s": 3600.0, "record_after_events": 1_000_000}


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

    # Restarted, it resumes after what it recorded (the batch that sent, not the events after
    # it that sent nothing): nothing is sent twice, the next job is.
    second = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    assert second.position == first.recorded
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
    batch = crashed.read(None)
    await crashed.publish(batch)
    assert crashed.tracking.max_tracking_id(jobs_app.name) is None

    restarted = start_dispatcher(jobs_app, store_settings, rabbit, trackings, **NEVER_DUE)
    await restarted.catch_up()
    assert await rabbit.dispatched() == [(str(job_id), 1), (str(job_id), 1)]
    # Sent again, and this time recorded right after the confirm.
    assert restarted.tracking.max_tracking_id(jobs_app.name) == batch[-1].id
    assert restarted.position == jobs_app.recorder.max_notification_id()


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


async def test_progress_advances_no_record_and_a_crash_re_reads_it_sending_nothing_twice(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    holder = await rabbit.control_queue("node-1")
    job_id = jobs_app.submit(spec(), client_id="client-a")
    crashed = start_dispatcher(jobs_app, store_settings, rabbit, trackings, **NEVER_DUE)
    assert await crashed.catch_up() == 1  # attempt 1, sent and recorded
    assert await rabbit.dispatched() == [(str(job_id), 1)]
    start_job(jobs_app, job_id)
    assert await crashed.catch_up() == 0
    recorded = crashed.tracking.max_tracking_id(jobs_app.name)
    assert recorded is not None
    writes = crashed.records

    report_progress(jobs_app, job_id, 7)
    assert await crashed.catch_up() == 0
    last = jobs_app.recorder.max_notification_id()
    assert last is not None
    assert last >= recorded + 7
    # Read past every progress event, yet not one write to the tracking record.
    assert crashed.position == last
    assert crashed.tracking.max_tracking_id(jobs_app.name) == recorded
    assert crashed.records == writes

    # The process dies: the restarted dispatcher re-reads the progress and sends nothing.
    restarted = start_dispatcher(jobs_app, store_settings, rabbit, trackings, **NEVER_DUE)
    assert restarted.position == recorded
    assert await restarted.catch_up() == 0
    assert restarted.position == last
    assert await rabbit.dispatched() == []
    assert await rabbit.take(holder) == []

    # Nothing after the window is missed: a cancel sent is recorded right after its confirm.
    report_progress(jobs_app, job_id, 3)
    jobs_app.request_cancel(job_id)
    assert await restarted.catch_up() == 1
    (message,) = await rabbit.take(holder)
    assert Cancel.model_validate(message) == Cancel(job_id=job_id, attempt=1)
    last = jobs_app.recorder.max_notification_id()
    assert restarted.tracking.max_tracking_id(jobs_app.name) == restarted.position == last
    again = start_dispatcher(jobs_app, store_settings, rabbit, trackings, **NEVER_DUE)
    assert await again.catch_up() == 0
    assert await rabbit.take(holder) == []


async def test_an_unrecorded_position_is_recorded_once_it_is_far_or_old_enough(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    dispatcher = start_dispatcher(
        jobs_app,
        store_settings,
        rabbit,
        trackings,
        record_after_s=3600.0,
        record_after_events=10,
    )
    await dispatcher.catch_up()
    start_job(jobs_app, job_id)
    await dispatcher.catch_up()
    recorded = dispatcher.tracking.max_tracking_id(jobs_app.name)
    assert recorded is not None

    report_progress(jobs_app, job_id, 4)
    await dispatcher.catch_up()
    assert dispatcher.tracking.max_tracking_id(jobs_app.name) == recorded
    report_progress(jobs_app, job_id, 20)  # 24 events past the record: the bound is 10
    await dispatcher.catch_up()
    far = dispatcher.tracking.max_tracking_id(jobs_app.name)
    assert far is not None
    assert far - recorded >= 10
    assert dispatcher.position is not None
    assert dispatcher.position - far < 10  # never 10 events or more behind after a batch
    # Once per 10 events at most, not once per batch of 2.
    assert dispatcher.records - 1 <= (dispatcher.position - recorded) // 10

    # Once the last record is old enough, an idle dispatcher records where it is.
    report_progress(jobs_app, job_id, 3)
    await dispatcher.catch_up()
    assert dispatcher.tracking.max_tracking_id(jobs_app.name) == far
    dispatcher.record_after_s = 0.0
    assert await dispatcher.catch_up() == 0  # nothing new to read
    last = jobs_app.recorder.max_notification_id()
    assert dispatcher.tracking.max_tracking_id(jobs_app.name) == last


async def test_a_clean_stop_records_the_position_reached(
    jobs_app: JobsApplication,
    store_settings: StoreSettings,
    rabbit: Broker,
    trackings: list[TrackingRecorder],
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    dispatcher = start_dispatcher(jobs_app, store_settings, rabbit, trackings, **NEVER_DUE)
    lock = build_lock(store_settings, jobs_app, DISPATCHER_NAME)
    stop = threading.Event()
    try:
        assert await asyncio.to_thread(lock.acquire, stop)
        running = asyncio.create_task(dispatcher.run(lock, stop, idle_wait=0.05))
        await eventually(async_true(lambda: dispatcher.published == 1), "the job to be sent")
        recorded = dispatcher.tracking.max_tracking_id(jobs_app.name)
        await asyncio.to_thread(start_job, jobs_app, job_id)
        await asyncio.to_thread(report_progress, jobs_app, job_id, 5)
        last = jobs_app.recorder.max_notification_id()
        await eventually(async_true(lambda: dispatcher.position == last), "the progress read")
        assert dispatcher.tracking.max_tracking_id(jobs_app.name) == recorded != last
        stop.set()
        await running
    finally:
        stop.set()
        await asyncio.to_thread(lock.close)
    assert dispatcher.tracking.max_tracking_id(jobs_app.name) == last
    restarted = start_dispatcher(jobs_app, store_settings, rabbit, trackings)
    assert restarted.position == last
    assert await restarted.catch_up() == 0
    assert await rabbit.dispatched() == [(str(job_id), 1)]


def async_true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


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
