"""The Job aggregate: one training job's whole lifecycle as events.

Progress reports do not live here: they go to the job's own metrics stream
(`domain.metrics.JobMetrics`), so a job's lifecycle stream stays a handful of
events however long it trains, and loading a job costs the same after 10 or
100,000 progress reports.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import (
    ClaimConflictError,
    DuplicateReportError,
    InvalidTransitionError,
    JobTerminalError,
    NotClaimHolderError,
    StaleAttemptError,
)

JOB_NAMESPACE = UUID("5a1d0f4e-8c1b-4a57-9a43-2f6f1c3b7d20")


class JobStatus(StrEnum):
    """Where a job is in its lifecycle."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether nothing can change the job any more."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.CLAIMED, JobStatus.RUNNING})


def job_id_for(job_key: str) -> UUID:
    """The job id for a submit key: the same key always names the same job."""
    return uuid5(JOB_NAMESPACE, job_key)


class Job(Aggregate):
    """One training job, from submission to its model (or its failure)."""

    class Submitted(Aggregate.Created):
        """A client submitted a job; the spec holds everything needed to run it again."""

        job_key: str
        client_id: str
        spec: dict[str, Any]
        max_attempts: int

    class Queued(Aggregate.Event):
        """The attempt is waiting for a train node."""

        attempt: int

    class Claimed(Aggregate.Event):
        """A train node was granted the attempt."""

        attempt: int
        node_id: str

    class Started(Aggregate.Event):
        """The node started training: what exactly runs, for the audit."""

        attempt: int
        seq: int
        info: dict[str, Any]

    class Completed(Aggregate.Event):
        """Training ended and the model is in the model store."""

        attempt: int
        seq: int
        model_key: str
        model_sha256: str
        info: dict[str, Any]

    class AttemptFailed(Aggregate.Event):
        """The attempt failed for a reason worth retrying (e.g. its node shut down)."""

        attempt: int
        seq: int
        reason: str
        details: dict[str, Any]

    class Failed(Aggregate.Event):
        """The job failed for good."""

        attempt: int
        seq: int | None
        reason: str
        details: dict[str, Any]

    class CancelRequested(Aggregate.Event):
        """The client asked to cancel a running attempt; its node is told to stop it."""

        attempt: int
        reason: str

    class Cancelled(Aggregate.Event):
        """The job was cancelled (at once when queued, or once its node stopped it)."""

        attempt: int
        seq: int | None

    class LeaseExpired(Aggregate.Event):
        """The node running the attempt stopped renewing its lease."""

        attempt: int
        node_id: str

    # The state below must stay JSON-friendly (lists, str keys): snapshots store it.
    @staticmethod
    def create_id(job_key: str) -> UUID:
        """Derive the id from the submit key, so a repeated submit names the same job."""
        return job_id_for(job_key)

    @event(Submitted)
    def __init__(self, job_key: str, client_id: str, spec: dict[str, Any], max_attempts: int):
        assert max_attempts >= 1, "max_attempts must be at least 1"
        self.job_key = job_key
        self.client_id = client_id
        self.spec = spec
        self.max_attempts = max_attempts
        self._status = JobStatus.QUEUED.value
        self.attempt = 0
        self.node_id: str | None = None
        self.cancel_requested = False
        self.report_seqs: list[int] = []  # lifecycle report seqs seen for the current attempt
        self.started = False  # whether the current attempt's start was recorded
        self.final_seq: int | None = None  # seq of the node's terminal report, if any
        self.model_key: str | None = None
        self.model_sha256: str | None = None
        self.reason: str | None = None

    @property
    def status(self) -> JobStatus:
        """The job's current status."""
        return JobStatus(self._status)

    # --- guards -------------------------------------------------------------

    def _check_not_terminal(self) -> None:
        if self.status.is_terminal:
            raise JobTerminalError(self.id, self.status.value)

    def _check_report(
        self, attempt: int, seq: int, node_id: str | None, *, terminal_ok: bool = False
    ) -> None:
        """Stale attempts and repeated reports change nothing: say which one it is."""
        if attempt != self.attempt:
            raise StaleAttemptError(self.id, attempt, self.attempt)
        if seq in self.report_seqs:
            raise DuplicateReportError(self.id, attempt, seq)
        if node_id is not None and self.node_id is not None and node_id != self.node_id:
            raise NotClaimHolderError(self.id, attempt, node_id, self.node_id)
        if not terminal_ok:
            self._check_not_terminal()

    def _check_active(self, command: str) -> None:
        if self.status not in ACTIVE_STATUSES:
            raise InvalidTransitionError(self.id, command, self.status.value)

    # --- commands -----------------------------------------------------------

    def enqueue(self) -> None:
        """Queue the first attempt (right after submission)."""
        if self.attempt != 0:
            raise InvalidTransitionError(self.id, "enqueue", self.status.value)
        self._queued(attempt=1)

    @event(Queued)
    def _queued(self, attempt: int) -> None:
        self._status = JobStatus.QUEUED.value
        self.attempt = attempt
        self.node_id = None
        self.report_seqs = []
        self.started = False

    def claim(self, attempt: int, node_id: str) -> bool:
        """Grant `attempt` to `node_id`; True if granted now, False if it already was."""
        if attempt != self.attempt:
            raise StaleAttemptError(self.id, attempt, self.attempt)
        self._check_not_terminal()
        if self.status is not JobStatus.QUEUED:
            if self.node_id == node_id:
                return False  # a redelivered claim from the holder: still granted
            assert self.node_id is not None
            raise ClaimConflictError(self.id, attempt, self.node_id)
        self._claimed(attempt=attempt, node_id=node_id)
        return True

    @event(Claimed)
    def _claimed(self, attempt: int, node_id: str) -> None:
        self._status = JobStatus.CLAIMED.value
        self.node_id = node_id

    def start(
        self, attempt: int, seq: int, info: dict[str, Any], node_id: str | None = None
    ) -> None:
        """Record that the claimed attempt started training (what runs, for the audit).

        A start report that arrives after the node's own final report (reports can
        be redelivered out of order) is still recorded for the audit, but changes
        no status.
        """
        self._check_report(attempt, seq, node_id, terminal_ok=True)
        if self.status.is_terminal:
            if self.started or self.final_seq is None or seq > self.final_seq:
                raise JobTerminalError(self.id, self.status.value)
        elif self.status is not JobStatus.CLAIMED or self.started:
            raise InvalidTransitionError(self.id, "start", self.status.value)
        self._started(attempt=attempt, seq=seq, info=info)

    @event(Started)
    def _started(self, attempt: int, seq: int, info: dict[str, Any]) -> None:
        if self._status == JobStatus.CLAIMED.value:
            self._status = JobStatus.RUNNING.value
        self.started = True
        self.report_seqs.append(seq)

    def complete(
        self,
        attempt: int,
        seq: int,
        model_key: str,
        model_sha256: str,
        info: dict[str, Any],
        node_id: str | None = None,
    ) -> None:
        """Record the trained model; the job is done."""
        self._check_report(attempt, seq, node_id)
        self._check_active("complete")
        self._completed(
            attempt=attempt, seq=seq, model_key=model_key, model_sha256=model_sha256, info=info
        )

    @event(Completed)
    def _completed(
        self, attempt: int, seq: int, model_key: str, model_sha256: str, info: dict[str, Any]
    ) -> None:
        self._status = JobStatus.COMPLETED.value
        self.report_seqs.append(seq)
        self.final_seq = seq
        self.model_key = model_key
        self.model_sha256 = model_sha256

    def fail(
        self,
        attempt: int,
        seq: int,
        reason: str,
        details: dict[str, Any],
        *,
        retryable: bool = False,
        node_id: str | None = None,
    ) -> None:
        """Record a failed attempt: retried if the node says so and attempts remain."""
        self._check_report(attempt, seq, node_id)
        self._check_active("fail")
        if self.cancel_requested:
            # The node stopped the run because it was asked to: that is a cancellation.
            self._cancelled(attempt=attempt, seq=seq)
        elif retryable and attempt < self.max_attempts:
            self._attempt_failed(attempt=attempt, seq=seq, reason=reason, details=details)
            self._queued(attempt=attempt + 1)
        else:
            self._failed(attempt=attempt, seq=seq, reason=reason, details=details)

    @event(AttemptFailed)
    def _attempt_failed(self, attempt: int, seq: int, reason: str, details: dict[str, Any]) -> None:
        self.report_seqs.append(seq)

    @event(Failed)
    def _failed(self, attempt: int, seq: int | None, reason: str, details: dict[str, Any]) -> None:
        self._status = JobStatus.FAILED.value
        self.reason = reason
        if seq is not None:
            self.report_seqs.append(seq)
            self.final_seq = seq

    def request_cancel(self, reason: str) -> None:
        """Cancel a queued job at once; ask the node to stop a running one."""
        if self.status is JobStatus.CANCELLED or self.cancel_requested:
            return  # asking again changes nothing
        self._check_not_terminal()
        if self.status is JobStatus.QUEUED:
            self._cancelled(attempt=self.attempt, seq=None)
        else:
            self._cancel_requested(attempt=self.attempt, reason=reason)

    @event(CancelRequested)
    def _cancel_requested(self, attempt: int, reason: str) -> None:
        self.cancel_requested = True

    def confirm_cancelled(self, attempt: int, seq: int, node_id: str | None = None) -> None:
        """The node stopped a run it was asked to cancel."""
        self._check_report(attempt, seq, node_id)
        self._check_active("confirm cancellation of")
        if not self.cancel_requested:
            raise InvalidTransitionError(self.id, "confirm cancellation of", "not being cancelled")
        self._cancelled(attempt=attempt, seq=seq)

    @event(Cancelled)
    def _cancelled(self, attempt: int, seq: int | None) -> None:
        self._status = JobStatus.CANCELLED.value
        if seq is not None:
            self.report_seqs.append(seq)
            self.final_seq = seq

    def expire_lease(self, attempt: int) -> None:
        """The attempt's node went silent: re-queue the next attempt, or fail past the limit."""
        if attempt != self.attempt:
            raise StaleAttemptError(self.id, attempt, self.attempt)
        self._check_not_terminal()
        self._check_active("expire the lease of")
        assert self.node_id is not None
        self._lease_expired(attempt=attempt, node_id=self.node_id)
        if self.cancel_requested:
            self._cancelled(attempt=attempt, seq=None)
        elif attempt < self.max_attempts:
            self._queued(attempt=attempt + 1)
        else:
            self._failed(
                attempt=attempt,
                seq=None,
                reason=f"lease expired on attempt {attempt} of {self.max_attempts}: "
                "retry limit reached",
                details={"node_id": self.node_id},
            )

    @event(LeaseExpired)
    def _lease_expired(self, attempt: int, node_id: str) -> None:
        pass

    def accepts_progress(self, attempt: int, seq: int, node_id: str | None = None) -> None:
        """Raise unless a progress report of `attempt` with `seq` may still be recorded.

        Progress of the current attempt is accepted while it runs, and after the
        node's own terminal report only if it was sent before it (reports may
        arrive out of order); never for a stale attempt.
        """
        if attempt != self.attempt:
            raise StaleAttemptError(self.id, attempt, self.attempt)
        if self.status is JobStatus.QUEUED:
            raise InvalidTransitionError(self.id, "report progress of", self.status.value)
        if node_id is not None and self.node_id is not None and node_id != self.node_id:
            raise NotClaimHolderError(self.id, attempt, node_id, self.node_id)
        if self.status.is_terminal and (self.final_seq is None or seq > self.final_seq):
            raise JobTerminalError(self.id, self.status.value)
