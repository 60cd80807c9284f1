"""Property: any sequence of commands leaves a job legal, and its events rebuild it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import uuid4

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.application import JobsApplication, Outcome
from domain.errors import JobError
from domain.job import ACTIVE_STATUSES, Job, JobStatus
from domain.metrics import JobMetrics
from tests.conftest import sqlite_settings

NODES = ["node-1", "node-2"]
attempts = st.integers(min_value=0, max_value=4)
seqs = st.integers(min_value=1, max_value=6)

commands = st.one_of(
    st.tuples(st.just("claim"), attempts, st.sampled_from(NODES)),
    st.tuples(st.just("start"), attempts, seqs),
    st.tuples(st.just("progress"), attempts, seqs),
    st.tuples(st.just("complete"), attempts, seqs),
    st.tuples(st.just("fail"), attempts, seqs, st.booleans()),
    st.tuples(st.just("cancel_confirm"), attempts, seqs),
    st.tuples(st.just("request_cancel")),
    st.tuples(st.just("expire"), attempts),
)


def apply(job: Job, metrics: JobMetrics, command: tuple[Any, ...]) -> None:
    name, *args = command
    if name == "claim":
        job.claim(args[0], args[1])
    elif name == "start":
        job.start(args[0], args[1], {})
    elif name == "progress":
        job.accepts_progress(args[0], args[1])
        metrics.report(args[0], args[1], args[1] * 10, {})
    elif name == "complete":
        job.complete(args[0], args[1], "model.onnx", "0" * 64, {})
    elif name == "fail":
        job.fail(args[0], args[1], "boom", {}, retryable=args[2])
    elif name == "cancel_confirm":
        job.confirm_cancelled(args[0], args[1])
    elif name == "request_cancel":
        job.request_cancel("asked")
    elif name == "expire":
        job.expire_lease(args[0])


def assert_legal(job: Job) -> None:
    assert isinstance(job.status, JobStatus)
    assert 1 <= job.attempt <= job.max_attempts
    if job.status is JobStatus.QUEUED:
        assert job.node_id is None
        assert not job.cancel_requested
    if job.status in ACTIVE_STATUSES:
        assert job.node_id in NODES
    if job.cancel_requested:
        # A run that completed before the cancel reached its node keeps its model; any other
        # end of a run asked to stop is a cancellation.
        assert job.status in ACTIVE_STATUSES | {JobStatus.CANCELLED, JobStatus.COMPLETED}
    if job.status is JobStatus.COMPLETED:
        assert job.model_key == "model.onnx"
    if job.status is JobStatus.FAILED:
        assert job.reason
    assert len(job.report_seqs) == len(set(job.report_seqs)), "a report was recorded twice"


def replay(events: Sequence[Any]) -> Any:
    state = None
    for e in events:
        state = e.mutate(state)
    return state


@given(st.lists(commands, max_size=40))
def test_any_command_sequence_leaves_a_legal_job_that_replays_identically(
    sequence: list[tuple[Any, ...]],
) -> None:
    job = Job(job_key="k", client_id="c", spec={"config": "x"}, max_attempts=3)
    job.enqueue()
    metrics = JobMetrics(job_id=job.id)
    terminal_version: int | None = None
    for command in sequence:
        with contextlib.suppress(JobError):  # a refused command must just change nothing
            apply(job, metrics, command)
        assert_legal(job)
        if terminal_version is not None:
            assert job.version == terminal_version, "a terminal job changed"
        elif job.status.is_terminal:
            terminal_version = job.version
    assert replay(job.collect_events()).__dict__ == job.__dict__
    assert replay(metrics.collect_events()).__dict__ == metrics.__dict__


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(commands, max_size=15))
def test_stored_command_sequences_rebuild_the_same_job(
    tmp_path: Path, sequence: list[tuple[Any, ...]]
) -> None:
    settings_ = sqlite_settings(tmp_path / uuid4().hex)
    app = JobsApplication(settings_.eventsourcing_env(), max_attempts=3)
    try:
        job_id = app.submit(_spec(), client_id="c")
        for name, *args in sequence:
            with contextlib.suppress(JobError):
                _run(app, job_id, name, args)
        job = app.get_job(job_id)
        assert_legal(job)
        assert replay(list(app.repository.event_store.get(job_id))).__dict__ == job.__dict__
    finally:
        app.close()


def _spec() -> Any:
    from domain.spec import parse_job_spec

    config = "behaviors:\n  A:\n    trainer_type: ppo\n"
    return parse_job_spec({"config": config, "env": {"builtin": "reach"}})


def _run(app: JobsApplication, job_id: Any, name: str, args: list[Any]) -> object:
    if name == "claim":
        return app.claim(job_id, args[0], args[1])
    if name == "start":
        return app.report_started(job_id, args[0], args[1], {})
    if name == "progress":
        return app.report_progress(job_id, args[0], args[1], args[1] * 10, {})
    if name == "complete":
        return app.report_completed(job_id, args[0], args[1], "model.onnx", "0" * 64)
    if name == "fail":
        return app.report_failed(job_id, args[0], args[1], "boom", retryable=args[2])
    if name == "cancel_confirm":
        return app.report_cancelled(job_id, args[0], args[1])
    if name == "request_cancel":
        return app.request_cancel(job_id)
    assert name == "expire"
    out = app.expire_lease(job_id, args[0])
    assert isinstance(out, Outcome)
    return out
