"""The job board and its live updates, driven by JobsApplication commands (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from eventsourcing.persistence import Tracking

from domain.application import JobsApplication, ProgressReport
from domain.job import JobStatus
from projections.__main__ import build_view
from projections.jobboard import JobBoardView
from projections.postgres import PostgresJobBoardView
from projections.publisher import StreamPublisher, global_stream, job_stream
from projections.runner import rebuild
from tests.conftest import postgres_settings, sqlite_settings
from tests.projections.conftest import (
    all_entries,
    job_entries,
    job_row,
    metric_rows,
    runner,
    spec,
)
from tests.roundtrips import count_round_trips

STATS = {"Environment/Cumulative Reward": 0.5, "Policy/Entropy": 1.25}


def test_a_whole_lifecycle_lands_on_the_board_and_in_the_streams_in_order(
    jobs_app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    follow = runner(jobs_app, view, publisher)
    follow.catch_up()
    assert job_row(view, job_id)["status"] == "queued"

    assert jobs_app.claim(job_id, 1, "node-1").granted
    jobs_app.report_started(job_id, 1, 1, {"mlagents": "1.1.0"})
    # Out of order: seq 4 arrives before seq 3; the latest is still the highest seq.
    jobs_app.report_progress_batch(
        job_id,
        [
            ProgressReport(1, 2, 100, STATS),
            ProgressReport(1, 4, 300, {"r": 3.0}),
            ProgressReport(1, 3, 200, {"r": 2.0}),
        ],
    )
    follow.catch_up()
    row = job_row(view, job_id)
    assert (row["status"], row["node_id"], row["attempt"]) == ("running", "node-1", 1)
    assert (row["latest_seq"], row["latest_step"], row["latest_stats"]) == (4, 300, {"r": 3.0})
    assert row["started_at"] is not None

    jobs_app.report_completed(job_id, 1, 5, "jobs/a/Reach.onnx", "ab" * 32)
    follow.catch_up()
    row = job_row(view, job_id)
    assert row["status"] == JobStatus.COMPLETED.value
    assert (row["model_key"], row["model_sha256"]) == ("jobs/a/Reach.onnx", "ab" * 32)
    assert row["finished_at"] is not None
    assert row["client_id"] == "client-a"
    assert [(m["seq"], m["step"]) for m in metric_rows(view, job_id)] == [
        (2, 100),
        (3, 200),
        (4, 300),
    ]
    assert metric_rows(view, job_id)[0]["stats"] == STATS

    updates = job_entries(redis_client, prefix, job_id)
    assert [u["type"] for u in updates] == [
        "submitted",
        "queued",
        "claimed",
        "started",
        "progress",
        "progress",
        "progress",
        "completed",
    ]
    assert [u["seq"] for u in updates if u["type"] == "progress"] == ["2", "4", "3"]
    assert updates[-1]["model_sha256"] == "ab" * 32
    assert updates[-1]["status"] == "completed"
    assert updates[2]["node_id"] == "node-1"
    # The global stream holds the same entries, with the log position as the entry id.
    everything = all_entries(redis_client, prefix)
    assert [fields for _, fields in everything] == updates
    assert [entry_id for entry_id, _ in everything] == [f"{u['position']}-0" for u in updates]
    assert row["position"] == int(updates[-1]["position"])


def test_a_lost_lease_shows_the_second_attempt(
    jobs_app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(job_id, 1, "node-1")
    jobs_app.report_started(job_id, 1, 1, {})
    jobs_app.report_progress(job_id, 1, 2, 50, STATS)
    jobs_app.expire_lease(job_id, 1)
    follow = runner(jobs_app, view, publisher)
    follow.catch_up()
    row = job_row(view, job_id)
    assert (row["status"], row["attempt"], row["node_id"]) == ("queued", 2, None)
    assert row["latest_step"] is None  # the new attempt has not reported yet
    assert "node-1" in row["reason"]

    jobs_app.claim(job_id, 2, "node-2")
    jobs_app.report_started(job_id, 2, 1, {})
    jobs_app.report_progress(job_id, 2, 2, 70, STATS)
    follow.catch_up()
    row = job_row(view, job_id)
    assert (row["status"], row["attempt"], row["node_id"]) == ("running", 2, "node-2")
    assert row["latest_step"] == 70
    assert [(m["attempt"], m["seq"]) for m in metric_rows(view, job_id)] == [(1, 2), (2, 2)]
    updates = job_entries(redis_client, prefix, job_id)
    assert [(u["type"], u["attempt"]) for u in updates[-5:]] == [
        ("lease_expired", "1"),
        ("queued", "2"),
        ("claimed", "2"),
        ("started", "2"),
        ("progress", "2"),
    ]


def test_updates_committed_before_a_crash_are_published_once_after_it(
    jobs_app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(job_id, 1, "node-1")
    runner(jobs_app, view, publisher).catch_up()
    jobs_app.report_started(job_id, 1, 1, {})
    jobs_app.report_progress(job_id, 1, 2, 10, STATS)
    # A runner that commits its batch and dies before it reaches Redis.
    crashed = runner(jobs_app, view, None, batch_size=100)
    events = crashed.read(crashed.position)
    view.project(events, Tracking(jobs_app.name, events[-1][1]), with_updates=True)
    assert [u["type"] for u in job_entries(redis_client, prefix, job_id)][-1] == "claimed"

    for _ in range(2):  # a second restart finds them published already: no duplicates
        restarted = runner(jobs_app, view, StreamPublisher(redis_client, prefix=prefix))
        restarted.publish_pending()
        restarted.catch_up()
    types = [u["type"] for u in job_entries(redis_client, prefix, job_id)]
    assert types == ["submitted", "queued", "claimed", "started", "progress"]
    assert len(all_entries(redis_client, prefix)) == len(types)


def test_the_outbox_keeps_only_updates_not_yet_published(
    jobs_app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")  # 3 events, 2 updates
    jobs_app.claim(job_id, 1, "node-1")
    jobs_app.report_started(job_id, 1, 1, {})
    for seq in range(2, 9):
        jobs_app.report_progress(job_id, 1, seq, seq * 10, STATS)
    follow = runner(jobs_app, view, publisher, batch_size=3)
    follow.catch_up()
    published = all_entries(redis_client, prefix)
    assert len(published) == 11
    # Each batch's transaction drops what the batches before it published: the last batch's
    # updates are all that is left (published too; a restart would find them there).
    pending = view.pending_updates()
    assert 0 < len(pending) <= 3
    assert pending == [fields for _, fields in published[-len(pending) :]]


def test_a_live_batch_of_jobs_already_seen_waits_for_postgres_once(
    pg_schema: str, publisher: StreamPublisher, tmp_path: Path
) -> None:
    store = postgres_settings(pg_schema)
    app = JobsApplication(store.eventsourcing_env())
    view = build_view(store)
    assert isinstance(view, PostgresJobBoardView)
    try:
        job_id = app.submit(spec(), client_id="client-a")
        app.claim(job_id, 1, "node-1")
        follow = runner(app, view, publisher)
        follow.catch_up()
        app.report_started(job_id, 1, 1, {})
        app.report_progress(job_id, 1, 2, 20, STATS)
        events = follow.read(follow.position)
        with count_round_trips(view.datastore, tmp_path) as trips:
            follow.apply(events)
        assert trips.count == 1  # writes, outbox, tracking and COMMIT together

        app.report_progress(job_id, 1, 3, 30, STATS)
        fresh = runner(app, view, publisher)  # a new runner has not seen the job's row
        events = fresh.read(fresh.position)
        with count_round_trips(view.datastore, tmp_path) as trips:
            fresh.apply(events)
        assert trips.count == 2
        assert job_row(view, job_id)["latest_seq"] == 3
    finally:
        view.close()
        app.close()


@pytest.mark.parametrize("rebuild_batch", [1000, 4])
def test_rebuild_equals_the_live_board(
    jobs_app: JobsApplication, view: JobBoardView, rebuild_batch: int
) -> None:
    follow = runner(jobs_app, view, None, batch_size=3)
    jobs = [jobs_app.submit(spec(), client_id=f"client-{n}") for n in range(3)]
    follow.catch_up()
    for n, job_id in enumerate(jobs):
        jobs_app.claim(job_id, 1, f"node-{n}")
        jobs_app.report_started(job_id, 1, 1, {})
        follow.catch_up()
        jobs_app.report_progress_batch(
            job_id, [ProgressReport(1, s, s * 10, {"s": s}) for s in range(2, 9)]
        )
    follow.catch_up()
    jobs_app.report_completed(jobs[0], 1, 20, "m/0.onnx", "0" * 64)
    jobs_app.expire_lease(jobs[1], 1)
    jobs_app.request_cancel(jobs[2])
    jobs_app.report_cancelled(jobs[2], 1, 20)
    follow.catch_up()
    live_jobs, live_metrics = view.dump()
    assert len(live_jobs) == 3
    assert len(live_metrics) == 21

    progress = rebuild(jobs_app, view, batch_size=rebuild_batch)
    assert progress.batches == -(-progress.events // rebuild_batch)
    assert progress.position == jobs_app.recorder.max_notification_id()
    rebuilt_jobs, rebuilt_metrics = view.dump()
    for live, rebuilt in zip(live_jobs, rebuilt_jobs, strict=True):
        assert live == rebuilt
    for live, rebuilt in zip(live_metrics, rebuilt_metrics, strict=True):
        assert live == rebuilt
    assert {r["status"] for r in rebuilt_jobs} == {"completed", "queued", "cancelled"}


def test_stats_json_cannot_hold_become_null_and_odd_text_survives(
    jobs_app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    job_id = jobs_app.submit(spec(), client_id="client-a")
    jobs_app.claim(job_id, 1, "node-1")
    jobs_app.report_started(job_id, 1, 1, {})
    note = 'tab\there \\ "quoted"\nnew line, é, 训练'
    jobs_app.report_progress(
        job_id, 1, 2, 10, {"Losses/Value Loss": float("nan"), "x": float("-inf"), "note": note}
    )
    runner(jobs_app, view, publisher).catch_up()
    expected = {"Losses/Value Loss": None, "x": None, "note": note}
    assert metric_rows(view, job_id)[0]["stats"] == expected
    assert job_row(view, job_id)["latest_stats"] == expected
    assert json.loads(job_entries(redis_client, prefix, job_id)[-1]["stats"]) == expected
    live = view.dump()
    rebuild(jobs_app, view)
    assert view.dump() == live


def test_a_finished_jobs_stream_expires_and_a_running_jobs_does_not(
    jobs_app: JobsApplication,
    view: JobBoardView,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    publisher = StreamPublisher(redis_client, prefix=prefix, finished_ttl_s=3600)
    finished = jobs_app.submit(spec(), client_id="client-a")
    running = jobs_app.submit(spec(), client_id="client-a")
    for job_id in (finished, running):
        assert jobs_app.claim(job_id, 1, "node-1").granted
        jobs_app.report_started(job_id, 1, 1, {"mlagents": "1.1.0"})
    jobs_app.report_completed(finished, 1, 2, "jobs/a/Reach.onnx", "ab" * 32)
    runner(jobs_app, view, publisher).catch_up()

    finished_ttl = redis_client.ttl(job_stream(prefix, str(finished)))
    assert isinstance(finished_ttl, int)
    assert 3500 < finished_ttl <= 3600
    assert redis_client.ttl(job_stream(prefix, str(running))) == -1  # no expiry while it runs
    assert redis_client.ttl(global_stream(prefix)) == -1
    # Everything was still published, the finished job's completion included.
    assert job_entries(redis_client, prefix, finished)[-1]["type"] == "completed"


def test_streams_left_by_a_deleted_event_store_give_way_to_the_new_one(
    tmp_path: Path, redis_client: redis.Redis, prefix: str
) -> None:
    # A local data directory removed and started afresh: Redis still holds the old log's
    # streams, whose ids would make it refuse the new log's updates as already published.
    job_ids = []
    for name, others in (("old", 3), ("new", 0)):
        (tmp_path / name).mkdir()
        store = sqlite_settings(tmp_path / name)
        app = JobsApplication(store.eventsourcing_env(), max_attempts=3)
        view = build_view(store)
        try:
            for n in range(others):
                app.submit(spec(), client_id="client-a", request_id=f"other-{n}")
            job_ids.append(app.submit(spec(), client_id="client-a", request_id="same-request"))
            follow = runner(app, view, StreamPublisher(redis_client, prefix=prefix))
            follow.publish_pending()  # what a starting runner does first
            follow.catch_up()
        finally:
            view.close()
            app.close()
    # The job id (derived from the same request id) shows the new log's history only.
    updates = job_entries(redis_client, prefix, job_ids[-1])
    assert [(u["type"], u["position"]) for u in updates] == [("submitted", "1"), ("queued", "2")]
    assert [entry_id for entry_id, _ in all_entries(redis_client, prefix)] == ["1-0", "2-0"]
