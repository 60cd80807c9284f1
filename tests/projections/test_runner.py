"""The runner stops on an event it cannot apply, and only one runner is active at a time."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
from eventsourcing.persistence import Tracking

from domain.application import JobsApplication
from domain.settings import StoreSettings
from projections.__main__ import build_leader
from projections.board import JobRow, RowCache
from projections.jobboard import JobBoardView
from projections.runner import ProjectionStoppedError
from tests.projections.conftest import runner, spec


def test_an_event_that_does_not_fit_stops_the_runner_and_is_never_skipped(
    jobs_app: JobsApplication, view: JobBoardView
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")  # Submitted, Queued, Opened
    jobs_app.claim(job_id, 1, "node-1")
    # A board that believes it already applied the submit, but has no row for the job.
    view.insert_tracking(Tracking(jobs_app.name, 3))
    for _ in range(2):
        with pytest.raises(ProjectionStoppedError, match=r"after position 3: events 4\.\.4"):
            runner(jobs_app, view, None).catch_up()
        assert view.max_tracking_id(jobs_app.name) == 3
        assert view.dump() == ([], [])


def test_a_second_runner_stands_by_until_the_first_one_ends(
    jobs_app: JobsApplication, store_settings: StoreSettings
) -> None:
    first = build_leader(store_settings, jobs_app)
    second = build_leader(store_settings, jobs_app)
    try:
        assert first.acquire(threading.Event())
        give_up = threading.Event()
        timer = threading.Timer(0.3, give_up.set)
        timer.start()
        assert not second.acquire(give_up, retry_every=0.05)
        timer.join()
        first.close()
        assert second.acquire(threading.Event(), retry_every=0.05)
    finally:
        first.close()
        second.close()


def test_a_second_runner_writing_positions_already_recorded_is_refused_and_changes_nothing(
    jobs_app: JobsApplication, view: JobBoardView
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(job_id, 1, "node-1")
    # Both started before either applied anything: each believes it leads.
    first, second = runner(jobs_app, view, None), runner(jobs_app, view, None)
    first.catch_up()
    applied = view.dump()
    with pytest.raises(ProjectionStoppedError, match="could not be applied"):
        second.catch_up()
    assert view.max_tracking_id(jobs_app.name) == first.position
    assert view.dump() == applied
    assert applied[0][0]["status"] == "claimed"


def test_the_row_cache_hands_out_copies_and_forgets_the_least_recently_used() -> None:
    def row(n: int) -> JobRow:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        return JobRow(uuid.UUID(int=n), uuid.UUID(int=1000 + n), "c", "queued", 1, None, at, at)

    cache = RowCache(maxsize=2)
    cache.store([row(1), row(2)])
    rows, jobs, metrics = cache.lookup({uuid.UUID(int=1), uuid.UUID(int=3)}, {uuid.UUID(int=1002)})
    assert set(rows) == {uuid.UUID(int=1), uuid.UUID(int=2)}  # the second by its metrics id
    assert (jobs, metrics) == ({uuid.UUID(int=3)}, set())
    # A batch that fails after changing its copies leaves the cache as the table is.
    rows[uuid.UUID(int=1)].status = "running"
    again, _, _ = cache.lookup({uuid.UUID(int=1)}, set())
    assert again[uuid.UUID(int=1)].status == "queued"

    cache.store([rows[uuid.UUID(int=2)], row(3)])  # 2 was used last: 1 goes
    assert len(cache) == 2
    rows, jobs, metrics = cache.lookup(
        {uuid.UUID(int=1)}, {uuid.UUID(int=1001), uuid.UUID(int=1003)}
    )
    assert (set(rows), jobs, metrics) == (
        {uuid.UUID(int=3)},
        {uuid.UUID(int=1)},
        {uuid.UUID(int=1001)},
    )


def test_a_replay_stops_at_the_batch_that_does_not_fit_with_the_batches_before_it_recorded(
    jobs_app: JobsApplication, view: JobBoardView
) -> None:
    first = jobs_app.submit(spec(), client_id="client-a")  # events 1..3
    second = jobs_app.submit(spec(), client_id="client-a")  # events 4..6
    jobs_app.claim(first, 1, "node-1")  # 7
    jobs_app.claim(second, 1, "node-2")  # 8
    # A board that believes it applied the first submit, but has no row for it.
    view.insert_tracking(Tracking(jobs_app.name, 3))
    replaying = runner(jobs_app, view, None, batch_size=3)
    with pytest.raises(ProjectionStoppedError, match=r"after position 6: events 7\.\.8"):
        replaying.replay()
    assert view.max_tracking_id(jobs_app.name) == 6
    jobs, _ = view.dump()
    assert [(j["job_id"], j["status"]) for j in jobs] == [(second, "queued")]
