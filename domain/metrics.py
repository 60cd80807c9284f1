"""A job's metrics stream: its progress reports, kept apart from its lifecycle.

A long run sends tens of thousands of progress reports. Keeping them out of the
Job stream makes loading a job independent of how long it trained; this stream
is snapshotted by the application (see `JobsApplication.SNAPSHOT_INTERVAL`) so
appending to it stays cheap too. Its state is only what deduplication needs: the
metric series itself is read from the projections or from the events.
"""

from __future__ import annotations

import bisect
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import DuplicateReportError, StaleAttemptError

METRICS_NAMESPACE = UUID("0e7d7a2c-3f0b-4d4e-8f5e-6b1a9c2d4e10")
REORDER_WINDOW = 256


def metrics_id_for(job_id: UUID) -> UUID:
    """The id of a job's metrics stream."""
    return uuid5(METRICS_NAMESPACE, str(job_id))


class JobMetrics(Aggregate):
    """The progress reports of one job, deduplicated by attempt and sequence number."""

    class Opened(Aggregate.Created):
        """The job's metrics stream was opened (when the job was submitted)."""

        job_id: UUID

    class Reported(Aggregate.Event):
        """A progress report: the trainer's step and its summary statistics."""

        attempt: int
        seq: int
        step: int
        stats: dict[str, Any]

        def apply(self, aggregate: Aggregate) -> None:
            """Advance the dedup state (an explicit apply: cheaper than a decorated method)."""
            assert isinstance(aggregate, JobMetrics)
            aggregate.record(self.attempt, self.seq, self.step)

    @staticmethod
    def create_id(job_id: UUID) -> UUID:
        """One metrics stream per job."""
        return metrics_id_for(job_id)

    @event(Opened)
    def __init__(self, job_id: UUID) -> None:
        self.job_id = job_id
        self.attempt = 0
        # Seen seqs of the current attempt: every seq <= watermark, plus `pending`
        # (sorted) above it. Seqs start at 1 and lifecycle reports (kept by Job)
        # leave gaps here, so `pending` is cut to the newest REORDER_WINDOW seqs:
        # a report arriving more than that many reports late counts as seen.
        self.watermark = 0
        self.pending: list[int] = []
        self.count = 0
        self.last_step = 0

    def has_seen(self, attempt: int, seq: int) -> bool:
        """Whether this report was already recorded."""
        if attempt != self.attempt:
            return False
        if seq <= self.watermark:
            return True
        i = bisect.bisect_left(self.pending, seq)
        return i < len(self.pending) and self.pending[i] == seq

    def report(self, attempt: int, seq: int, step: int, stats: dict[str, Any]) -> None:
        """Record a progress report; a repeat or an older attempt's report raises."""
        if attempt < self.attempt:
            raise StaleAttemptError(self.job_id, attempt, self.attempt)
        if self.has_seen(attempt, seq):
            raise DuplicateReportError(self.job_id, attempt, seq)
        self.trigger_event(self.Reported, attempt=attempt, seq=seq, step=step, stats=stats)

    def record(self, attempt: int, seq: int, step: int) -> None:
        """Apply a report to the dedup state (called by the event, also on replay)."""
        if attempt != self.attempt:
            self.attempt = attempt
            self.watermark = 0
            self.pending = []
            self.last_step = 0
        bisect.insort(self.pending, seq)
        excess = len(self.pending) - REORDER_WINDOW
        if excess > 0:
            self.watermark = self.pending[excess - 1]
            del self.pending[:excess]
        while self.pending and self.pending[0] == self.watermark + 1:
            self.watermark = self.pending.pop(0)
        self.count += 1
        self.last_step = max(self.last_step, step)
