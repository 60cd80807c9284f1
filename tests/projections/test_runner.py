"""The runner stops on an event it cannot apply, and only one runner is active at a time."""

from __future__ import annotations

import threading

import pytest
from eventsourcing.persistence import Tracking

from domain.application import JobsApplication
from domain.settings import StoreSettings
from projections.__main__ import build_leader
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
