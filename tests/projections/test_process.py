"""`python -m projections` as a process on PostgreSQL: killed mid-stream, stopped, rebuilt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO
from uuid import UUID

import psycopg
import pytest
import redis
from eventsourcing.persistence import Tracking

from domain.application import JobsApplication, ProgressReport
from domain.settings import StoreSettings
from projections.__main__ import build_view
from projections.publisher import global_stream, job_stream
from tests.conftest import POSTGRES_DSN, postgres_settings
from tests.projections.conftest import REDIS_URL, entries, spec

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 180.0  # an upper bound for a busy machine, not a speed requirement
JOBS = 3

pytestmark = pytest.mark.slow


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Process:
    """`python -m projections [command]` against a test schema and Redis prefix."""

    def __init__(self, settings: StoreSettings, prefix: str, log: Path, *args: str) -> None:
        env = {
            # Its own queues unless the test names some (one fixed name, so runs do not pile
            # up queues on the broker).
            "TRAINYARD_QUEUE_PREFIX": "test-projections-process.",
            **os.environ,
            "TRAINYARD_EVENT_STORE": "postgres",
            "TRAINYARD_POSTGRES_HOST": settings.postgres_host,
            "TRAINYARD_POSTGRES_PORT": str(settings.postgres_port),
            "TRAINYARD_POSTGRES_DBNAME": settings.postgres_dbname,
            "TRAINYARD_POSTGRES_USER": settings.postgres_user,
            "TRAINYARD_POSTGRES_PASSWORD": settings.postgres_password,
            "TRAINYARD_POSTGRES_SCHEMA": settings.postgres_schema,
            "TRAINYARD_REDIS_URL": REDIS_URL,
            "TRAINYARD_REDIS_KEY_PREFIX": prefix,
            "TRAINYARD_PROJECTION_BATCH_SIZE": "7",
            "TRAINYARD_PROJECTION_POLL_INTERVAL": "0.2",
        }
        self.log = log
        self.out: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "projections", *args],
            cwd=ROOT,
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def wait(self) -> int:
        try:
            return self.proc.wait(WAIT_S)
        finally:
            self.out.close()

    def kill(self) -> None:
        self.proc.kill()
        self.wait()


@pytest.fixture
def store(pg_schema: str) -> StoreSettings:
    return postgres_settings(pg_schema)


@pytest.fixture
def app(store: StoreSettings) -> Iterator[JobsApplication]:
    application = JobsApplication(store.eventsourcing_env())
    try:
        yield application
    finally:
        application.close()


def tracked(schema: str) -> int:
    """The job board's tracked position (0 before its process created the table)."""
    with psycopg.connect(POSTGRES_DSN) as conn:
        try:
            row = conn.execute(
                f"SELECT notification_id FROM {schema}.jobboard_tracking "
                "WHERE application_name = %s",
                ("Jobs",),
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def published_positions(app: JobsApplication) -> list[int]:
    """Every event's position except the metrics streams' Opened, which changes no row."""
    notes = app.recorder.select_notifications(start=1, limit=1_000_000)
    return [n.id for n in notes if not n.topic.endswith("JobMetrics.Opened")]


def test_a_killed_runner_resumes_with_no_duplicate_and_no_gap(
    app: JobsApplication,
    store: StoreSettings,
    prefix: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    jobs = [app.submit(spec(), client_id="client-a") for _ in range(JOBS)]
    for n, job_id in enumerate(jobs):
        app.claim(job_id, 1, f"node-{n}")
        app.report_started(job_id, 1, 1, {})
    reports: dict[UUID, int] = dict.fromkeys(jobs, 1)

    def produce(rounds: int) -> None:
        for _ in range(rounds):
            for job_id in jobs:
                seq = reports[job_id]
                batch = [ProgressReport(1, s, s * 10, {"s": s}) for s in range(seq + 1, seq + 4)]
                app.report_progress_batch(job_id, batch)
                reports[job_id] = seq + 3

    log = tmp_path / "projections.log"
    first = Process(store, prefix, log)
    start = app.recorder.max_notification_id() or 0
    wait_until(lambda: tracked(store.postgres_schema) == start, "the runner to start")
    producer = threading.Thread(target=produce, args=(60,))
    producer.start()
    try:
        wait_until(lambda: tracked(store.postgres_schema) >= start + 60, "the runner to follow")
        first.proc.send_signal(signal.SIGKILL)  # mid-stream: the producer is still appending
        assert first.wait() == -signal.SIGKILL
        killed_at = tracked(store.postgres_schema)
    finally:
        producer.join()
    assert killed_at < (app.recorder.max_notification_id() or 0)

    second = Process(store, prefix, log)
    last = app.recorder.max_notification_id() or 0
    wait_until(lambda: tracked(store.postgres_schema) == last, "the runner to catch up")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0
    assert "stopped cleanly" in log.read_text()

    view = build_view(store)
    try:
        live = view.dump()
        live_jobs, live_metrics = live
        expected = {(j, 1, s) for j in jobs for s in range(2, reports[j] + 1)}
        assert {(m["job_id"], m["attempt"], m["seq"]) for m in live_metrics} == expected
        assert len(live_metrics) == len(expected)
        assert {r["job_id"]: r["latest_seq"] for r in live_jobs} == reports
        positions = published_positions(app)
        ids = [entry_id for entry_id, _ in entries(redis_client, global_stream(prefix))]
        assert ids == [f"{p}-0" for p in positions]
        per_job = sum(int(redis_client.xlen(job_stream(prefix, str(j)))) for j in jobs)
        assert per_job == len(positions)

        # Rebuilt from the log by the CLI, the board is the same row by row.
        assert Process(store, prefix, log, "rebuild").wait() == 0
        assert view.dump() == live
    finally:
        view.close()


def test_an_event_that_does_not_fit_ends_the_process_with_a_clear_line(
    app: JobsApplication, store: StoreSettings, prefix: str, tmp_path: Path
) -> None:
    job_id = app.submit(spec(), client_id="client-a")
    app.claim(job_id, 1, "node-1")
    view = build_view(store)
    try:
        view.insert_tracking(Tracking(app.name, 3))
    finally:
        view.close()
    log = tmp_path / "projections.log"
    assert Process(store, prefix, log).wait() == 1
    text = log.read_text()
    assert "ERROR projections job board stopped after position 3: events 4..4" in text
    assert tracked(store.postgres_schema) == 3
