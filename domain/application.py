"""JobsApplication: the only way to write to the event store.

Every command is safe to repeat: a redelivered message finds its effect already
recorded and changes nothing. Concurrent writers to one job are serialised by
the store's optimistic concurrency: a conflicting save is retried against the
fresh state, and raised as `ConcurrencyConflictError` if it keeps conflicting,
so no write is ever lost.

Aggregates are cached. A job is brought up to date from the store on every
command, since other processes write it (cancel requests, the lease watchdog,
claims). A metrics stream is written only by progress commands, so a command
takes its cached state as it is: if another writer got there first, the save
conflicts on the stream's version, the cached state is dropped, and the retry
reloads it. A stale cache can only lack reports, never have extra ones, so it
never refuses a report the store would accept.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar
from uuid import UUID, uuid4

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError

from domain.errors import (
    ClaimConflictError,
    ConcurrencyConflictError,
    DuplicateReportError,
    IdempotencyConflictError,
    JobError,
    JobNotFoundError,
    JobTerminalError,
    StaleAttemptError,
)
from domain.job import Job, JobStatus, job_id_for
from domain.metrics import JobMetrics, metrics_id_for
from domain.spec import JobSpec

T = TypeVar("T")


class Outcome(StrEnum):
    """What a report did to the job."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # same attempt and seq already recorded: nothing changed
    STALE = "stale"  # from an attempt that is no longer current: nothing changed
    IGNORED = "ignored"  # the job already ended: nothing changed


@dataclass(frozen=True)
class ClaimResult:
    """The answer to a node's claim: granted, or refused with the reason."""

    granted: bool
    attempt: int
    reason: str = ""


@dataclass(frozen=True)
class ProgressReport:
    """One progress report of an attempt: the trainer's step and its statistics."""

    attempt: int
    seq: int
    step: int
    stats: Mapping[str, Any]
    node_id: str | None = None


def _report_outcome(error: JobError) -> Outcome:
    if isinstance(error, DuplicateReportError):
        return Outcome.DUPLICATE
    if isinstance(error, StaleAttemptError):
        return Outcome.STALE
    if isinstance(error, JobTerminalError):
        return Outcome.IGNORED
    raise error


class JobsApplication(Application[UUID]):
    """Commands on training jobs, recorded as events."""

    name = "Jobs"
    is_snapshotting_enabled = True
    # Metrics streams are snapshotted every this many events (see _save_metrics).
    SNAPSHOT_INTERVAL = 500
    CONFLICT_RETRIES = 30

    def __init__(self, env: Mapping[str, str] | None = None, *, max_attempts: int = 3) -> None:
        # Cache aggregates and fast-forward them from the store on every get: a command then
        # reads only the events it has not seen, and other writers' events are never missed.
        super().__init__({"AGGREGATE_CACHE_MAXSIZE": "1000", **(env or {})})
        self.max_attempts = max_attempts

    # --- plumbing -----------------------------------------------------------

    def _retrying(self, job_id: UUID, command: Callable[[], T]) -> T:
        """Run a load-decide-save command, again on a concurrency conflict.

        A conflict means a cached state is behind the store: the job's cached
        aggregates are dropped so that the next try loads them afresh.
        """
        for tries in range(1, self.CONFLICT_RETRIES + 1):
            try:
                return command()
            except IntegrityError:
                self._evict(job_id)
                if tries == self.CONFLICT_RETRIES:
                    break
                # Back off with jitter so colliding writers spread out instead of colliding again.
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**tries)))  # noqa: S311
        raise ConcurrencyConflictError(job_id, self.CONFLICT_RETRIES)

    def get_job(self, job_id: UUID) -> Job:
        """The job's current state."""
        try:
            job: object = self.repository.get(job_id)
        except AggregateNotFoundError:
            raise JobNotFoundError(job_id) from None
        assert isinstance(job, Job)
        return job

    def _evict(self, job_id: UUID) -> None:
        """Drop the job's cached aggregates (the job and its metrics stream)."""
        cache = self.repository.cache
        if cache is not None:
            for aggregate_id in (job_id, metrics_id_for(job_id)):
                with contextlib.suppress(KeyError):
                    cache.get(aggregate_id, evict=True)

    def _metrics_for_command(self, job_id: UUID) -> JobMetrics:
        """The metrics stream state to decide on: a copy of the cached state, not fast-forwarded.

        Only progress commands write the stream, and each one caches what it saved,
        so the cached state is current unless another writer (another handlers
        process) appended meanwhile; then the save conflicts, `_retrying` drops the
        cached state and the next try loads it from the store. The copy keeps a
        failed command from changing the cached state.
        """
        cache = self.repository.cache
        if cache is None:
            return self.get_metrics(job_id)
        metrics_id = metrics_id_for(job_id)
        # A query (get_metrics) fast-forwards the cached object in place under this
        # lock: copying under it too never copies a half-applied state.
        lock = self.repository._use_fastforward_lock(metrics_id)
        try:
            with lock:
                try:
                    cached: object = cache.get(metrics_id)
                except KeyError:
                    cached = None
                else:
                    cached = deepcopy(cached)
        finally:
            self.repository._disuse_fastforward_lock(metrics_id)
        if cached is None:
            return self.get_metrics(job_id)  # loads, caches and copies
        assert isinstance(cached, JobMetrics)
        return cached

    def get_metrics(self, job_id: UUID) -> JobMetrics:
        """The job's metrics stream state (dedup state and counts, not the series).

        Always read up to date from the store, whoever wrote it.
        """
        try:
            metrics: object = self.repository.get(metrics_id_for(job_id))
        except AggregateNotFoundError:
            raise JobNotFoundError(job_id) from None
        assert isinstance(metrics, JobMetrics)
        return metrics

    # --- commands -----------------------------------------------------------

    def submit(self, spec: JobSpec, client_id: str, request_id: str | None = None) -> UUID:
        """Record a new job and queue its first attempt; repeating `request_id` is harmless."""
        job_key = f"{client_id}:{request_id}" if request_id else f"{client_id}:{uuid4()}"
        job = Job(
            job_key=job_key,
            client_id=client_id,
            spec=spec.to_dict(),
            max_attempts=self.max_attempts,
        )
        job.enqueue()
        metrics = JobMetrics(job_id=job.id)
        try:
            self.save(job, metrics)
        except IntegrityError:
            existing = self.get_job(job_id_for(job_key))
            if existing.spec != job.spec or existing.client_id != client_id:
                raise IdempotencyConflictError(existing.id) from None
        return job.id

    def claim(self, job_id: UUID, attempt: int, node_id: str) -> ClaimResult:
        """Grant `attempt` to one node only; a redelivered claim from its holder is granted."""

        def command() -> ClaimResult:
            job = self.get_job(job_id)
            try:
                if job.claim(attempt, node_id):
                    self.save(job)
            except (StaleAttemptError, JobTerminalError, ClaimConflictError) as error:
                return ClaimResult(False, attempt, str(error))
            if job.cancel_requested:
                return ClaimResult(False, attempt, f"job {job_id}: cancel requested")
            return ClaimResult(True, attempt)

        return self._retrying(job_id, command)

    def _report(self, job_id: UUID, apply: Callable[[Job], None]) -> Outcome:
        def command() -> Outcome:
            job = self.get_job(job_id)
            try:
                apply(job)
            except (DuplicateReportError, StaleAttemptError, JobTerminalError) as error:
                return _report_outcome(error)
            self.save(job)
            return Outcome.APPLIED

        return self._retrying(job_id, command)

    def report_started(
        self,
        job_id: UUID,
        attempt: int,
        seq: int,
        info: Mapping[str, Any],
        *,
        node_id: str | None = None,
    ) -> Outcome:
        """The node started training the attempt (versions, build hash, command, config).

        Every report takes the reporting node's id: a report from a node that does
        not hold the attempt's claim raises NotClaimHolderError.
        """
        return self._report(job_id, lambda job: job.start(attempt, seq, dict(info), node_id))

    def report_completed(
        self,
        job_id: UUID,
        attempt: int,
        seq: int,
        model_key: str,
        model_sha256: str,
        info: Mapping[str, Any] | None = None,
        *,
        node_id: str | None = None,
    ) -> Outcome:
        """The attempt trained to the end and its model is stored."""
        return self._report(
            job_id,
            lambda job: job.complete(
                attempt, seq, model_key, model_sha256, dict(info or {}), node_id
            ),
        )

    def report_failed(
        self,
        job_id: UUID,
        attempt: int,
        seq: int,
        reason: str,
        details: Mapping[str, Any] | None = None,
        *,
        retryable: bool = False,
        node_id: str | None = None,
    ) -> Outcome:
        """The attempt failed; `retryable` re-queues it while attempts remain."""
        return self._report(
            job_id,
            lambda job: job.fail(
                attempt, seq, reason, dict(details or {}), retryable=retryable, node_id=node_id
            ),
        )

    def report_cancelled(
        self, job_id: UUID, attempt: int, seq: int, *, node_id: str | None = None
    ) -> Outcome:
        """The node stopped the attempt it was asked to cancel."""
        return self._report(job_id, lambda job: job.confirm_cancelled(attempt, seq, node_id))

    def request_cancel(self, job_id: UUID, reason: str = "cancelled by the client") -> JobStatus:
        """Cancel a queued job now, or ask the node to stop a running one; returns the status."""

        def command() -> JobStatus:
            job = self.get_job(job_id)
            job.request_cancel(reason)
            self.save(job)
            return job.status

        return self._retrying(job_id, command)

    def expire_lease(self, job_id: UUID, attempt: int) -> Outcome:
        """The attempt's node went silent: re-queue the next attempt or fail the job."""
        return self._report(job_id, lambda job: job.expire_lease(attempt))

    def report_progress(
        self,
        job_id: UUID,
        attempt: int,
        seq: int,
        step: int,
        stats: Mapping[str, Any],
        *,
        node_id: str | None = None,
    ) -> Outcome:
        """Record one progress report."""
        report = ProgressReport(attempt, seq, step, stats, node_id)
        return self.report_progress_batch(job_id, [report])[0]

    def report_progress_batch(
        self, job_id: UUID, reports: Sequence[ProgressReport]
    ) -> list[Outcome]:
        """Record many progress reports of one job in one transaction."""

        def command() -> list[Outcome]:
            job = self.get_job(job_id)
            metrics = self._metrics_for_command(job_id)
            before = metrics.version
            outcomes: list[Outcome] = []
            for r in reports:
                try:
                    job.accepts_progress(r.attempt, r.seq, r.node_id)
                    metrics.report(r.attempt, r.seq, r.step, dict(r.stats))
                except (DuplicateReportError, StaleAttemptError, JobTerminalError) as error:
                    outcomes.append(_report_outcome(error))
                except JobError:
                    # Not claimed yet, or not from the claim's holder: one such report must
                    # not sink the batch it came in, and recording it would be wrong.
                    outcomes.append(Outcome.IGNORED)
                else:
                    outcomes.append(Outcome.APPLIED)
            if metrics.version != before:
                self.save(metrics)
                self._cache(metrics)
                if metrics.version // self.SNAPSHOT_INTERVAL > before // self.SNAPSHOT_INTERVAL:
                    self.snapshots_put(metrics)
            return outcomes

        return self._retrying(job_id, command)

    def _cache(self, aggregate: JobMetrics) -> None:
        """Keep the just-saved state: the next command on the stream starts from here.

        The library does not cache on save when it fast-forwards on get; without
        this, every command would load the stream again.
        """
        if self.repository.cache is not None:
            self.repository.cache.put(aggregate.id, aggregate)

    def snapshots_put(self, aggregate: JobMetrics) -> None:
        """Snapshot the in-memory state just saved (no reload, unlike take_snapshot)."""
        assert self.snapshots is not None
        self.snapshots.put([JobMetrics.Snapshot.take(aggregate)])
