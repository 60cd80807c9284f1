"""Apply each job's reports in delivery order, consecutive progress reports in one command.

With a prefetch above one, RabbitMQ hands over many reports at once. Each job gets its
own ordered queue of pending reports and at most one command in flight: when it is done,
the reports that arrived meanwhile go next, and a run of consecutive progress reports
becomes one `report_progress_batch` (one load and one save) instead of one command each.
Jobs do not wait for each other. Every report still settles its own message: the handler
awaits its report's outcome, or the error of the command it was part of, and the
dead-letter policy decides what that error means for that message.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from domain.application import JobsApplication, Outcome, ProgressReport
from domain.contracts import Cancelled, Completed, Failed, Progress, Started
from handlers.reports import apply_report

AnyReportModel = Started | Progress | Completed | Failed | Cancelled


@dataclass(order=True)
class _Pending:
    order: int
    report: AnyReportModel = field(compare=False)
    outcome: asyncio.Future[Outcome] = field(compare=False)


class ReportBatcher:
    """Per-job ordered application of reports; runs of progress reports are batched."""

    def __init__(self, jobs: Callable[[], JobsApplication], *, max_batch: int) -> None:
        assert max_batch >= 1
        self._jobs = jobs
        self.max_batch = max_batch
        self._pending: dict[UUID, list[_Pending]] = {}
        self._draining: dict[UUID, asyncio.Task[None]] = {}

    async def apply(self, report: AnyReportModel, order: int) -> Outcome:
        """Record `report` after the job's reports delivered before it (lower `order`)."""
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        # Sorted by delivery order, in case two deliveries reach here out of turn.
        bisect.insort(self._pending.setdefault(report.job_id, []), _Pending(order, report, outcome))
        if report.job_id not in self._draining:
            self._draining[report.job_id] = asyncio.create_task(self._drain(report.job_id))
        return await outcome

    def _next(self, job_id: UUID) -> list[_Pending]:
        """The next command's reports: a run of progress reports, or one other report."""
        pending = self._pending[job_id]
        take = 1
        if isinstance(pending[0].report, Progress):
            while take < min(len(pending), self.max_batch) and isinstance(
                pending[take].report, Progress
            ):
                take += 1
        batch, pending[:take] = pending[:take], []
        return batch

    async def _drain(self, job_id: UUID) -> None:
        batch: list[_Pending] = []
        try:
            while self._pending.get(job_id):
                batch = self._next(job_id)
                try:
                    outcomes = await asyncio.to_thread(self._run, batch)
                except Exception as error:  # noqa: BLE001 -- each message's handler raises it
                    for item in batch:
                        if not item.outcome.done():
                            item.outcome.set_exception(error)
                else:
                    for item, outcome in zip(batch, outcomes, strict=True):
                        if not item.outcome.done():
                            item.outcome.set_result(outcome)
                batch = []
        finally:
            # Cancelled (the app is stopping): the unsettled messages are redelivered later.
            del self._draining[job_id]
            for item in batch + self._pending.pop(job_id, []):
                item.outcome.cancel()

    def _run(self, batch: list[_Pending]) -> list[Outcome]:
        jobs = self._jobs()
        reports = [item.report for item in batch]
        if len(reports) == 1:
            return [apply_report(jobs, reports[0])]
        progress = [r for r in reports if isinstance(r, Progress)]
        assert len(progress) == len(reports)
        return jobs.report_progress_batch(
            batch[0].report.job_id,
            [ProgressReport(r.attempt, r.seq, r.step, r.stats, r.node_id) for r in progress],
        )
