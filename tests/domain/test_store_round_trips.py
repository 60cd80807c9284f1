"""How often a progress report waits for PostgreSQL, and the one-round-trip save's guarantees.

Round trips are counted from libpq's own protocol trace of every connection the
application uses: each ReadyForQuery the server sends ends one wait of the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, StoredEvent

from domain.application import JobsApplication, Outcome, ProgressReport
from domain.postgres import ArrayInsertRecorder
from tests.conftest import postgres_settings
from tests.domain.test_jobs import running
from tests.roundtrips import RoundTrips, count_round_trips


@pytest.fixture
def pg_app(pg_schema: str) -> Iterator[JobsApplication]:
    app = JobsApplication(postgres_settings(pg_schema).eventsourcing_env())
    try:
        yield app
    finally:
        app.close()


@contextmanager
def round_trips(app: JobsApplication, directory: Path) -> Iterator[RoundTrips]:
    """Count the round trips of the application's store (events and snapshots share it)."""
    recorder = app.recorder
    assert isinstance(recorder, ArrayInsertRecorder)
    assert app.snapshots is not None
    assert getattr(app.snapshots.recorder, "datastore", None) is recorder.datastore
    with count_round_trips(recorder.datastore, directory) as trips:
        yield trips


def test_a_progress_report_waits_for_the_store_twice(
    pg_app: JobsApplication, tmp_path: Path
) -> None:
    job_id = running(pg_app)
    assert pg_app.report_progress(job_id, 1, 2, 20, {}) is Outcome.APPLIED  # caches the metrics
    with round_trips(pg_app, tmp_path) as trips:
        assert pg_app.report_progress(job_id, 1, 3, 30, {}) is Outcome.APPLIED
    # one to bring the job up to date, one to save the report
    assert trips.count == 2
    with round_trips(pg_app, tmp_path) as trips:
        outcomes = pg_app.report_progress_batch(
            job_id, [ProgressReport(1, s, s, {}) for s in range(4, 54)]
        )
    assert outcomes == [Outcome.APPLIED] * 50
    assert trips.count == 2
    assert pg_app.get_metrics(job_id).count == 52


def test_a_duplicate_report_waits_for_the_store_once(
    pg_app: JobsApplication, tmp_path: Path
) -> None:
    job_id = running(pg_app)
    pg_app.report_progress(job_id, 1, 2, 20, {})
    with round_trips(pg_app, tmp_path) as trips:
        assert pg_app.report_progress(job_id, 1, 2, 20, {}) is Outcome.DUPLICATE
    assert trips.count == 1


def stored(originator_id: UUID, version: int) -> StoredEvent:
    return StoredEvent(originator_id, version, "tests:Event", b"{}")


def test_a_save_is_one_round_trip_and_returns_the_notification_ids(
    pg_app: JobsApplication, tmp_path: Path
) -> None:
    recorder = pg_app.recorder
    assert isinstance(recorder, ArrayInsertRecorder)
    stream = uuid4()
    before = recorder.max_notification_id() or 0
    with round_trips(pg_app, tmp_path) as trips:
        ids = recorder.insert_events([stored(stream, 1), stored(stream, 2), stored(stream, 3)])
    assert trips.count == 1
    assert ids == [before + 1, before + 2, before + 3]
    assert [n.id for n in recorder.select_notifications(before + 1, 10)] == ids


def test_a_save_that_collides_with_another_writer_raises_integrity_error_and_saves_nothing(
    pg_app: JobsApplication,
) -> None:
    recorder = pg_app.recorder
    assert isinstance(recorder, ArrayInsertRecorder)
    stream, other = uuid4(), uuid4()
    recorder.insert_events([stored(stream, 1)])
    for _ in range(3):  # more than once: every connection of the pool stays usable
        with pytest.raises(IntegrityError):
            recorder.insert_events([stored(other, 1), stored(stream, 2), stored(stream, 1)])
        assert recorder.select_events(other) == []
        assert [e.originator_version for e in recorder.select_events(stream)] == [1]
    # the store takes the next save as usual, and returns its notification id
    last = recorder.max_notification_id()
    assert last is not None
    (notification_id,) = recorder.insert_events([stored(stream, 2)]) or []
    assert notification_id > last
    assert recorder.max_notification_id() == notification_id
    with recorder.datastore.get_connection() as conn:
        assert conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
