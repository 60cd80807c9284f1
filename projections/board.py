"""The job board's logic: how each event changes a job's row, its metric series and its updates.

Pure and storage-free: a view loads the rows a batch touches, a `BoardBatch` applies the
batch's events to them in log order, and the view writes the result (rows, metric rows,
updates for the live publisher) in one transaction with the batch's tracking record.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.job import Job, JobStatus
from domain.metrics import JobMetrics

Update = dict[str, str]
"""One projected update, as the fields of a Redis Stream entry."""

Positioned = tuple[Any, int]
"""A decoded domain event and its position (notification id) in the log."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# The C encoder itself, built once: `JSONEncoder.encode` rebuilds it on every call, which
# costs as much as encoding a small stats dict (a replay encodes one per event).
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODE = (
    _make_encoder(
        None,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    if _make_encoder is not None
    else None
)


def stats_json(stats: Any) -> str:
    """Stats as strict JSON: NaN and infinities (a diverging loss) become null."""
    try:
        return "".join(_C_ENCODE(stats, 0)) if _C_ENCODE is not None else _ENCODER.encode(stats)
    except ValueError:
        return _ENCODER.encode(_finite(stats))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class ProjectionError(Exception):
    """An event the job board cannot apply: the runner stops rather than skip it."""


@dataclass
class JobRow:
    """One row of the `jobs` table: a job's current projected state."""

    job_id: UUID
    metrics_id: UUID | None
    client_id: str
    status: str
    attempt: int
    node_id: str | None
    submitted_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    model_key: str | None = None
    model_sha256: str | None = None
    cancel_requested: bool = False
    latest_seq: int | None = None
    latest_step: int | None = None
    latest_stats: dict[str, Any] | None = None
    position: int = 0

    COLUMNS = (
        "job_id",
        "metrics_id",
        "client_id",
        "status",
        "attempt",
        "node_id",
        "submitted_at",
        "updated_at",
        "started_at",
        "finished_at",
        "reason",
        "model_key",
        "model_sha256",
        "cancel_requested",
        "latest_seq",
        "latest_step",
        "latest_stats",
        "position",
    )

    def values(self) -> tuple[Any, ...]:
        """The row's values in `COLUMNS` order."""
        return tuple(getattr(self, c) for c in self.COLUMNS)

    def copy(self) -> JobRow:
        """A copy to apply a batch to (events replace field values, never mutate them)."""
        row = object.__new__(JobRow)
        row.__dict__.update(self.__dict__)
        return row


class RowCache:
    """The rows the live runner committed last, so a batch of known jobs reads nothing first.

    Only the job board's runner writes its tables (it holds the projection's lock, and a
    rebuild takes the same lock), so the rows it committed are the rows in the table. A
    batch is applied to copies; `store` takes the batch's rows once its transaction has
    committed, so a failed batch leaves the cache as the table is. Least recently used
    rows go first once `maxsize` is reached.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        assert maxsize >= 1
        self.maxsize = maxsize
        self._rows: OrderedDict[UUID, JobRow] = OrderedDict()
        self._by_metrics_id: dict[UUID, UUID] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(
        self, job_ids: set[UUID], metrics_ids: set[UUID]
    ) -> tuple[dict[UUID, JobRow], set[UUID], set[UUID]]:
        """Copies of the cached rows among these ids, and the job and metrics ids not cached."""
        rows: dict[UUID, JobRow] = {}
        missing_jobs: set[UUID] = set()
        missing_metrics: set[UUID] = set()
        cached = self._rows
        for job_id in job_ids:
            row = cached.get(job_id)
            if row is None:
                missing_jobs.add(job_id)
            else:
                rows[job_id] = row.copy()
        for metrics_id in metrics_ids:
            owner = self._by_metrics_id.get(metrics_id)
            if owner is None:
                missing_metrics.add(metrics_id)
            elif owner not in rows:
                rows[owner] = cached[owner].copy()
        return rows, missing_jobs, missing_metrics

    def store(self, rows: Iterable[JobRow]) -> None:
        """Keep the rows of a committed batch."""
        cached = self._rows
        for row in rows:
            cached[row.job_id] = row
            cached.move_to_end(row.job_id)
            if row.metrics_id is not None:
                self._by_metrics_id[row.metrics_id] = row.job_id
        while len(cached) > self.maxsize:
            _, evicted = cached.popitem(last=False)
            if evicted.metrics_id is not None:
                self._by_metrics_id.pop(evicted.metrics_id, None)

    def clear(self) -> None:
        """Forget every row (the table was dropped or rebuilt)."""
        self._rows.clear()
        self._by_metrics_id.clear()


MetricRow = tuple[UUID, int, int, int, dict[str, Any], int]
"""One row of the `job_metrics` table (one progress report), in `METRIC_COLUMNS` order."""

METRIC_COLUMNS = ("job_id", "attempt", "seq", "step", "stats", "position")


TYPE_NAMES: dict[type[Any], str] = {
    Job.Submitted: "submitted",
    Job.Queued: "queued",
    Job.Claimed: "claimed",
    Job.Started: "started",
    Job.Completed: "completed",
    Job.AttemptFailed: "attempt_failed",
    Job.Failed: "failed",
    Job.CancelRequested: "cancel_requested",
    Job.Cancelled: "cancelled",
    Job.LeaseExpired: "lease_expired",
    JobMetrics.Reported: "progress",
}


def ids_to_load(events: Iterable[Positioned]) -> tuple[set[UUID], set[UUID]]:
    """The job ids and metrics-stream ids whose rows a batch needs (except those it creates)."""
    job_ids: set[UUID] = set()
    metrics_ids: set[UUID] = set()
    reported, opened, submitted = JobMetrics.Reported, JobMetrics.Opened, Job.Submitted
    for event, _ in events:
        cls = type(event)
        if cls is reported:
            metrics_ids.add(event.originator_id)
        elif cls is opened:
            job_ids.add(event.job_id)
        elif cls is not submitted:
            job_ids.add(event.originator_id)
    return job_ids, metrics_ids


@dataclass
class BoardBatch:
    """Applies a batch of events to the rows it touches, collecting what to write."""

    rows: dict[UUID, JobRow]
    with_updates: bool = True
    metrics: list[MetricRow] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    by_metrics_id: dict[UUID, JobRow] = field(init=False)

    def __post_init__(self) -> None:
        self.by_metrics_id = {r.metrics_id: r for r in self.rows.values() if r.metrics_id}
        self._handlers: dict[type[Any], Callable[[Any, JobRow], None]] = {
            Job.Queued: self._queued,
            Job.Claimed: self._claimed,
            Job.Started: self._started,
            Job.Completed: self._completed,
            Job.AttemptFailed: self._attempt_failed,
            Job.Failed: self._failed,
            Job.CancelRequested: self._cancel_requested,
            Job.Cancelled: self._cancelled,
            Job.LeaseExpired: self._lease_expired,
        }

    def apply_all(self, events: Sequence[Positioned]) -> None:
        """Apply events in log order.

        Progress reports are nearly every event of a replay, so they take an inlined path
        here (same effect as `apply`); everything else goes through `apply`.
        """
        reported = JobMetrics.Reported
        rows_by_metrics_id = self.by_metrics_id
        append_metric = self.metrics.append
        for event, position in events:
            if type(event) is not reported or self.with_updates:
                self.apply(event, position)
                continue
            row = rows_by_metrics_id.get(event.originator_id) or self._row(None, event)
            attempt, seq, step, stats = event.attempt, event.seq, event.step, event.stats
            append_metric((row.job_id, attempt, seq, step, stats, position))
            if attempt == row.attempt and (row.latest_seq is None or seq > row.latest_seq):
                row.latest_seq, row.latest_step, row.latest_stats = seq, step, stats
            row.updated_at = event.timestamp
            row.position = position

    def apply(self, event: Any, position: int) -> None:
        """Apply one event; raise `ProjectionError` if it does not fit the board."""
        cls = type(event)
        if cls is JobMetrics.Reported:  # nearly every event: the fast path comes first
            row = self._row(self.by_metrics_id.get(event.originator_id), event)
            self._reported(event, row, position)
        elif cls is JobMetrics.Opened:
            row = self._row(self.rows.get(event.job_id), event)
            row.metrics_id = event.originator_id
            self.by_metrics_id[event.originator_id] = row
            return  # no visible change: no update, row position unchanged
        elif cls is Job.Submitted:
            if event.originator_id in self.rows:
                raise ProjectionError(f"job {event.originator_id} submitted twice")
            row = JobRow(
                job_id=event.originator_id,
                metrics_id=None,
                client_id=event.client_id,
                status=JobStatus.QUEUED.value,
                attempt=0,
                node_id=None,
                submitted_at=event.timestamp,
                updated_at=event.timestamp,
            )
            self.rows[row.job_id] = row
        else:
            handler = self._handlers.get(cls)
            if handler is None:
                raise ProjectionError(f"no job board handler for {cls.__qualname__}")
            row = self._row(self.rows.get(event.originator_id), event)
            handler(event, row)
        row.updated_at = event.timestamp
        row.position = position
        if self.with_updates:
            self.updates.append(_update(event, row, position))

    @staticmethod
    def _row(row: JobRow | None, event: Any) -> JobRow:
        if row is None:
            raise ProjectionError(
                f"{type(event).__qualname__} of {event.originator_id} "
                f"v{event.originator_version}: its job is not on the board"
            )
        return row

    def _queued(self, event: Job.Queued, row: JobRow) -> None:
        row.status = JobStatus.QUEUED.value
        row.attempt = event.attempt
        row.node_id = None
        row.started_at = None
        # A new attempt trains from scratch: the previous attempt's progress is history.
        row.latest_seq = row.latest_step = row.latest_stats = None

    def _claimed(self, event: Job.Claimed, row: JobRow) -> None:
        row.status = JobStatus.CLAIMED.value
        row.attempt = event.attempt
        row.node_id = event.node_id

    def _started(self, event: Job.Started, row: JobRow) -> None:
        row.status = JobStatus.RUNNING.value
        row.started_at = event.timestamp

    def _completed(self, event: Job.Completed, row: JobRow) -> None:
        row.status = JobStatus.COMPLETED.value
        row.finished_at = event.timestamp
        row.model_key = event.model_key
        row.model_sha256 = event.model_sha256
        row.reason = None

    def _attempt_failed(self, event: Job.AttemptFailed, row: JobRow) -> None:
        row.reason = f"attempt {event.attempt} failed: {event.reason}"

    def _failed(self, event: Job.Failed, row: JobRow) -> None:
        row.status = JobStatus.FAILED.value
        row.finished_at = event.timestamp
        row.reason = event.reason

    def _cancel_requested(self, event: Job.CancelRequested, row: JobRow) -> None:
        row.cancel_requested = True
        row.reason = event.reason

    def _cancelled(self, event: Job.Cancelled, row: JobRow) -> None:
        row.status = JobStatus.CANCELLED.value
        row.finished_at = event.timestamp

    def _lease_expired(self, event: Job.LeaseExpired, row: JobRow) -> None:
        row.reason = f"lease of attempt {event.attempt} expired on node {event.node_id}"

    def _reported(self, event: JobMetrics.Reported, row: JobRow, position: int) -> None:
        metric = (row.job_id, event.attempt, event.seq, event.step, event.stats, position)
        self.metrics.append(metric)
        # Reports may arrive out of order: the latest is the highest seq of the current attempt.
        if event.attempt == row.attempt and (row.latest_seq is None or event.seq > row.latest_seq):
            row.latest_seq = event.seq
            row.latest_step = event.step
            row.latest_stats = event.stats


def _update(event: Any, row: JobRow, position: int) -> Update:
    update: Update = {
        "position": str(position),
        "job_id": str(row.job_id),
        "type": TYPE_NAMES[type(event)],
        "status": row.status,
        "attempt": str(getattr(event, "attempt", row.attempt)),
        "node_id": row.node_id or "",
        "cancel_requested": "1" if row.cancel_requested else "0",
        "timestamp": event.timestamp.isoformat(),
    }
    if isinstance(event, JobMetrics.Reported):
        update["seq"] = str(event.seq)
        update["step"] = str(event.step)
        update["stats"] = stats_json(event.stats)
    elif isinstance(event, Job.Completed):
        update["model_key"] = event.model_key
        update["model_sha256"] = event.model_sha256
    if row.reason is not None and row.status != JobStatus.COMPLETED.value:
        update["reason"] = row.reason
    return update
