"""The job lifecycle and its rules, through JobsApplication on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.application import JobsApplication, Outcome, ProgressReport
from domain.errors import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    JobTerminalError,
    NotClaimHolderError,
)
from domain.job import Job, JobStatus
from domain.metrics import JobMetrics
from domain.settings import StoreSettings
from domain.spec import JobSpec, parse_job_spec

CONFIG = """
behaviors:
  Reach:
    trainer_type: ppo
    hyperparameters: {batch_size: 64, buffer_size: 640}
    network_settings: {hidden_units: 32, num_layers: 1}
    max_steps: 5000
"""


def spec(seed: int = 1) -> JobSpec:
    return parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}, "seed": seed})


def submit(app: JobsApplication, request_id: str | None = None) -> UUID:
    return app.submit(spec(), client_id="client-a", request_id=request_id)


def running(app: JobsApplication, node: str = "node-1") -> UUID:
    job_id = submit(app)
    assert app.claim(job_id, 1, node).granted
    assert app.report_started(job_id, 1, 1, {"mlagents": "1.1.0"}) is Outcome.APPLIED
    return job_id


def replay(events: Iterable[Any]) -> Any:
    """Rebuild an aggregate from every one of its events, ignoring snapshots."""
    state = None
    for e in events:
        state = e.mutate(state)
    assert state is not None
    return state


def history(app: JobsApplication, job_id: UUID) -> list[str]:
    return [type(e).__name__ for e in app.repository.event_store.get(job_id)]


def test_a_submitted_job_is_queued_with_its_spec(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    job = jobs_app.get_job(job_id)
    assert job.status is JobStatus.QUEUED
    assert job.attempt == 1
    assert job.client_id == "client-a"
    assert parse_job_spec(job.spec) == spec()
    assert history(jobs_app, job_id) == ["Submitted", "Queued"]


def test_the_whole_lifecycle_is_recorded_in_order(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    jobs_app.report_progress(job_id, 1, 2, 1000, {"Environment/Cumulative Reward": 0.5})
    outcome = jobs_app.report_completed(job_id, 1, 3, "jobs/x/1/Reach.onnx", "ab" * 32)
    assert outcome is Outcome.APPLIED
    job = jobs_app.get_job(job_id)
    assert job.status is JobStatus.COMPLETED
    assert job.model_key == "jobs/x/1/Reach.onnx"
    assert history(jobs_app, job_id) == ["Submitted", "Queued", "Claimed", "Started", "Completed"]
    assert jobs_app.get_metrics(job_id).count == 1


def test_repeating_a_submit_with_the_same_request_id_names_the_same_job(
    jobs_app: JobsApplication,
) -> None:
    first = submit(jobs_app, request_id="r-1")
    again = submit(jobs_app, request_id="r-1")
    assert first == again
    assert history(jobs_app, first) == ["Submitted", "Queued"]
    assert submit(jobs_app, request_id="r-2") != first


def test_a_request_id_reused_with_another_spec_is_refused(jobs_app: JobsApplication) -> None:
    submit(jobs_app, request_id="r-1")
    with pytest.raises(IdempotencyConflictError):
        jobs_app.submit(spec(seed=2), client_id="client-a", request_id="r-1")


def test_an_unknown_job_raises_not_found(jobs_app: JobsApplication) -> None:
    with pytest.raises(JobNotFoundError):
        jobs_app.get_job(uuid4())
    with pytest.raises(JobNotFoundError):
        jobs_app.report_started(uuid4(), 1, 1, {})


def test_a_claim_is_granted_once_and_again_only_to_its_holder(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    assert jobs_app.claim(job_id, 1, "node-1").granted
    assert jobs_app.claim(job_id, 1, "node-1").granted  # redelivered claim: same answer
    refused = jobs_app.claim(job_id, 1, "node-2")
    assert not refused.granted
    assert "node-1" in refused.reason
    assert history(jobs_app, job_id).count("Claimed") == 1


def test_a_claim_for_another_attempt_is_refused(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    result = jobs_app.claim(job_id, 2, "node-1")
    assert not result.granted
    assert "stale" in result.reason


def test_concurrent_claims_grant_exactly_one_node(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    results: dict[str, bool] = {}
    barrier = threading.Barrier(4)

    def claim(node: str) -> None:
        barrier.wait()
        results[node] = jobs_app.claim(job_id, 1, node).granted

    threads = [threading.Thread(target=claim, args=(f"node-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results.values()) == 1
    holder = next(node for node, granted in results.items() if granted)
    assert jobs_app.get_job(job_id).node_id == holder


def test_a_duplicate_report_changes_nothing(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    version = jobs_app.get_job(job_id).version
    assert jobs_app.report_started(job_id, 1, 1, {"mlagents": "1.1.0"}) is Outcome.DUPLICATE
    assert jobs_app.report_progress(job_id, 1, 2, 10, {}) is Outcome.APPLIED
    assert jobs_app.report_progress(job_id, 1, 2, 10, {}) is Outcome.DUPLICATE
    assert jobs_app.get_job(job_id).version == version
    assert jobs_app.get_metrics(job_id).count == 1


def test_progress_out_of_order_is_all_recorded_once(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    order = [5, 3, 2, 4, 7, 6, 3, 5]
    outcomes = [jobs_app.report_progress(job_id, 1, s, s * 100, {}) for s in order]
    assert outcomes.count(Outcome.APPLIED) == 6
    assert outcomes.count(Outcome.DUPLICATE) == 2
    assert jobs_app.get_metrics(job_id).count == 6


def test_nothing_leaves_a_terminal_state(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    jobs_app.report_failed(job_id, 1, 2, "mlagents-learn exited with 1", {"exit_code": 1})
    job = jobs_app.get_job(job_id)
    assert job.status is JobStatus.FAILED
    assert job.reason == "mlagents-learn exited with 1"
    assert jobs_app.report_completed(job_id, 1, 3, "k", "0" * 64) is Outcome.IGNORED
    assert jobs_app.expire_lease(job_id, 1) is Outcome.IGNORED
    assert not jobs_app.claim(job_id, 1, "node-1").granted
    with pytest.raises(JobTerminalError):
        jobs_app.request_cancel(job_id)
    assert jobs_app.get_job(job_id).status is JobStatus.FAILED


def test_cancelling_a_queued_job_cancels_it_at_once(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    assert jobs_app.request_cancel(job_id) is JobStatus.CANCELLED
    assert jobs_app.request_cancel(job_id) is JobStatus.CANCELLED  # repeat: no change
    assert history(jobs_app, job_id) == ["Submitted", "Queued", "Cancelled"]
    assert not jobs_app.claim(job_id, 1, "node-1").granted


def test_cancelling_a_running_job_asks_its_node(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    assert jobs_app.request_cancel(job_id) is JobStatus.RUNNING
    assert jobs_app.get_job(job_id).cancel_requested
    assert jobs_app.report_cancelled(job_id, 1, 2) is Outcome.APPLIED
    assert jobs_app.get_job(job_id).status is JobStatus.CANCELLED
    assert history(jobs_app, job_id)[-2:] == ["CancelRequested", "Cancelled"]


def test_a_node_cannot_cancel_a_job_nobody_asked_to_cancel(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    with pytest.raises(InvalidTransitionError):
        jobs_app.report_cancelled(job_id, 1, 2)


def test_a_lost_lease_requeues_the_next_attempt_and_stale_reports_change_nothing(
    jobs_app: JobsApplication,
) -> None:
    job_id = running(jobs_app, "node-1")
    assert jobs_app.expire_lease(job_id, 1) is Outcome.APPLIED
    job = jobs_app.get_job(job_id)
    assert (job.status, job.attempt, job.node_id) == (JobStatus.QUEUED, 2, None)
    assert jobs_app.claim(job_id, 2, "node-2").granted
    version = jobs_app.get_job(job_id).version
    assert jobs_app.report_completed(job_id, 1, 9, "k", "0" * 64) is Outcome.STALE
    assert jobs_app.report_progress(job_id, 1, 8, 100, {}) is Outcome.STALE
    assert jobs_app.expire_lease(job_id, 1) is Outcome.STALE
    assert jobs_app.get_job(job_id).version == version
    # seq 1 of attempt 2 is new, although attempt 1 used it
    assert jobs_app.report_started(job_id, 2, 1, {}) is Outcome.APPLIED


def test_the_retry_limit_fails_the_job(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    for attempt in (1, 2, 3):
        assert jobs_app.claim(job_id, attempt, f"node-{attempt}").granted
        jobs_app.expire_lease(job_id, attempt)
    job = jobs_app.get_job(job_id)
    assert job.status is JobStatus.FAILED
    assert job.attempt == 3
    assert job.reason is not None
    assert "retry limit" in job.reason


def test_a_retryable_failure_requeues_while_attempts_remain(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    jobs_app.report_failed(job_id, 1, 2, "node shutting down", retryable=True)
    job = jobs_app.get_job(job_id)
    assert (job.status, job.attempt) == (JobStatus.QUEUED, 2)


def test_a_lease_lost_while_cancelling_ends_cancelled(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    jobs_app.request_cancel(job_id)
    jobs_app.expire_lease(job_id, 1)
    assert jobs_app.get_job(job_id).status is JobStatus.CANCELLED


def test_progress_sent_before_completion_but_arriving_after_is_kept(
    jobs_app: JobsApplication,
) -> None:
    job_id = running(jobs_app)
    jobs_app.report_completed(job_id, 1, 5, "k", "0" * 64)
    assert jobs_app.report_progress(job_id, 1, 4, 400, {}) is Outcome.APPLIED
    assert jobs_app.report_progress(job_id, 1, 6, 600, {}) is Outcome.IGNORED
    assert jobs_app.get_job(job_id).status is JobStatus.COMPLETED


def test_progress_before_a_claim_is_not_recorded(jobs_app: JobsApplication) -> None:
    job_id = submit(jobs_app)
    assert jobs_app.report_progress(job_id, 1, 2, 10, {}) is Outcome.IGNORED
    assert jobs_app.get_metrics(job_id).count == 0


def test_a_batch_of_progress_reports_is_saved_in_one_go(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    reports = [ProgressReport(1, seq, seq * 10, {"loss": 0.1}) for seq in range(2, 502)]
    outcomes = jobs_app.report_progress_batch(job_id, [*reports, reports[0]])
    assert outcomes[:-1] == [Outcome.APPLIED] * 500
    assert outcomes[-1] is Outcome.DUPLICATE
    assert jobs_app.get_metrics(job_id).count == 500
    assert jobs_app.get_metrics(job_id).last_step == 5010


def test_long_runs_do_not_grow_the_job_stream_and_metrics_are_snapshotted(
    jobs_app: JobsApplication,
) -> None:
    job_id = running(jobs_app)
    job_version = jobs_app.get_job(job_id).version
    for start in range(2, 1002, 250):
        batch = [ProgressReport(1, s, s, {"reward": float(s)}) for s in range(start, start + 250)]
        jobs_app.report_progress_batch(job_id, batch)
    assert jobs_app.get_job(job_id).version == job_version
    assert jobs_app.snapshots is not None
    snapshots = list(jobs_app.snapshots.get(jobs_app.get_metrics(job_id).id))
    assert snapshots, "the metrics stream was never snapshotted"
    latest = snapshots[-1].originator_version
    assert jobs_app.get_metrics(job_id).version - latest < JobsApplication.SNAPSHOT_INTERVAL
    # loading from the snapshot gives the same state as replaying every event
    replayed = replay(jobs_app.repository.event_store.get(jobs_app.get_metrics(job_id).id))
    assert replayed.__dict__ == jobs_app.get_metrics(job_id).__dict__


def test_concurrent_progress_writers_lose_no_report(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    barrier = threading.Barrier(4)

    def write(offset: int) -> None:
        barrier.wait()
        for i in range(25):
            seq = 2 + offset + 4 * i
            jobs_app.report_progress(job_id, 1, seq, seq, {})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    metrics = jobs_app.get_metrics(job_id)
    assert metrics.count == 100
    stored = list(jobs_app.repository.event_store.get(metrics.id))
    assert len(stored) == 101  # Opened + 100 reports, none lost, none twice


def test_events_replay_to_the_same_state(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app)
    jobs_app.expire_lease(job_id, 1)
    jobs_app.claim(job_id, 2, "node-2")
    jobs_app.report_completed(job_id, 2, 1, "k", "1" * 64)
    rebuilt = replay(jobs_app.repository.event_store.get(job_id))
    assert isinstance(rebuilt, Job)
    assert rebuilt.__dict__ == jobs_app.get_job(job_id).__dict__


def test_a_report_from_a_node_without_the_claim_is_refused(jobs_app: JobsApplication) -> None:
    job_id = running(jobs_app, "node-1")
    with pytest.raises(NotClaimHolderError):
        jobs_app.report_completed(job_id, 1, 2, "k", "0" * 64, node_id="node-2")
    assert jobs_app.report_progress(job_id, 1, 3, 30, {}, node_id="node-2") is Outcome.IGNORED
    assert jobs_app.get_metrics(job_id).count == 0
    assert jobs_app.get_job(job_id).status is JobStatus.RUNNING
    assert jobs_app.report_completed(job_id, 1, 2, "k", "0" * 64, node_id="node-1") is (
        Outcome.APPLIED
    )


def test_a_start_report_arriving_after_completion_is_kept_for_the_audit(
    jobs_app: JobsApplication,
) -> None:
    job_id = submit(jobs_app)
    assert jobs_app.claim(job_id, 1, "node-1").granted
    jobs_app.report_completed(job_id, 1, 9, "k", "0" * 64, node_id="node-1")
    info = {"mlagents": "1.1.0", "build_sha256": "ab" * 32}
    assert jobs_app.report_started(job_id, 1, 1, info, node_id="node-1") is Outcome.APPLIED
    assert jobs_app.report_started(job_id, 1, 1, info, node_id="node-1") is Outcome.DUPLICATE
    assert jobs_app.get_job(job_id).status is JobStatus.COMPLETED
    assert history(jobs_app, job_id)[-2:] == ["Completed", "Started"]
    # ...but not one sent after the final report
    assert jobs_app.report_started(job_id, 1, 10, info) is Outcome.IGNORED


@pytest.fixture
def replica(store_settings: StoreSettings) -> Iterator[JobsApplication]:
    """A second JobsApplication on the same store, as another handlers process would be."""
    app = JobsApplication(store_settings.eventsourcing_env(), max_attempts=3)
    try:
        yield app
    finally:
        app.close()


def recorded_reports(app: JobsApplication, job_id: UUID) -> list[tuple[int, int]]:
    """(attempt, seq) of every progress report in the store, in order."""
    metrics_id = app.get_metrics(job_id).id
    events = app.repository.event_store.get(metrics_id)
    return [(e.attempt, e.seq) for e in events if isinstance(e, JobMetrics.Reported)]


def test_two_replicas_interleaving_reports_record_each_exactly_once(
    jobs_app: JobsApplication, replica: JobsApplication
) -> None:
    job_id = running(jobs_app)
    for seq in range(2, 42):
        app = jobs_app if seq % 2 else replica
        assert app.report_progress(job_id, 1, seq, seq, {}) is Outcome.APPLIED
        # a redelivery to the other replica changes nothing
        other = replica if app is jobs_app else jobs_app
        assert other.report_progress(job_id, 1, seq, seq, {}) is Outcome.DUPLICATE
    assert recorded_reports(jobs_app, job_id) == [(1, seq) for seq in range(2, 42)]
    assert jobs_app.get_metrics(job_id).count == replica.get_metrics(job_id).count == 40


def test_two_replicas_writing_one_job_at_once_lose_no_report(
    jobs_app: JobsApplication, replica: JobsApplication
) -> None:
    job_id = running(jobs_app)
    barrier = threading.Barrier(4)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []

    def write(app: JobsApplication, offset: int) -> None:
        barrier.wait()
        try:
            for i in range(20):
                seq = 2 + offset + 2 * i
                # each report reaches both replicas, as after a redelivery
                outcomes.append(app.report_progress(job_id, 1, seq, seq, {}))
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=write, args=(app, offset))
        for app in (jobs_app, replica)
        for offset in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(recorded_reports(jobs_app, job_id)) == [(1, seq) for seq in range(2, 42)]
    assert outcomes.count(Outcome.APPLIED) == 40
    assert outcomes.count(Outcome.DUPLICATE) == 40


def test_a_stale_cached_metrics_state_neither_repeats_nor_refuses_a_report(
    jobs_app: JobsApplication, replica: JobsApplication
) -> None:
    job_id = running(jobs_app)
    # the replica caches the stream, then falls behind
    assert replica.report_progress(job_id, 1, 2, 20, {}) is Outcome.APPLIED
    assert jobs_app.report_progress(job_id, 1, 3, 30, {}) is Outcome.APPLIED
    assert jobs_app.report_progress(job_id, 1, 4, 40, {}) is Outcome.APPLIED
    # a report the replica has not seen but the store has is not recorded again...
    assert replica.report_progress(job_id, 1, 3, 30, {}) is Outcome.DUPLICATE
    # ...and one nobody has seen is recorded
    batch = [ProgressReport(1, 4, 40, {}), ProgressReport(1, 5, 50, {})]
    assert jobs_app.report_progress(job_id, 1, 6, 60, {}) is Outcome.APPLIED
    assert replica.report_progress_batch(job_id, batch) == [Outcome.DUPLICATE, Outcome.APPLIED]
    assert recorded_reports(jobs_app, job_id) == [(1, 2), (1, 3), (1, 4), (1, 6), (1, 5)]

    # the job moves to attempt 2 elsewhere; the replica's cache still holds attempt 1
    assert jobs_app.expire_lease(job_id, 1) is Outcome.APPLIED
    assert jobs_app.claim(job_id, 2, "node-2").granted
    assert jobs_app.report_progress(job_id, 2, 2, 20, {}) is Outcome.APPLIED
    # seq 3 of attempt 2 is new, though attempt 1 had a seq 3
    assert replica.report_progress(job_id, 2, 3, 30, {}) is Outcome.APPLIED
    assert replica.report_progress(job_id, 2, 2, 20, {}) is Outcome.DUPLICATE
    assert replica.report_progress(job_id, 1, 7, 70, {}) is Outcome.STALE
    assert recorded_reports(jobs_app, job_id)[-2:] == [(2, 2), (2, 3)]
    assert jobs_app.get_metrics(job_id).count == replica.get_metrics(job_id).count == 7
