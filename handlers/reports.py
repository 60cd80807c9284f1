"""Turn one train-node report into one JobsApplication command."""

from __future__ import annotations

from domain.application import JobsApplication, Outcome
from domain.contracts import Cancelled, Completed, Failed, Progress, Started


def apply_report(
    jobs: JobsApplication, report: Started | Progress | Completed | Failed | Cancelled
) -> Outcome:
    """Record the report; a duplicate or stale one changes nothing and says so."""
    match report:
        case Started():
            return jobs.report_started(
                report.job_id,
                report.attempt,
                report.seq,
                report.info.model_dump(mode="json"),
                node_id=report.node_id,
            )
        case Progress():
            return jobs.report_progress(
                report.job_id,
                report.attempt,
                report.seq,
                report.step,
                report.stats,
                node_id=report.node_id,
            )
        case Completed():
            return jobs.report_completed(
                report.job_id,
                report.attempt,
                report.seq,
                report.model_key,
                report.model_sha256,
                {"node_id": report.node_id},
                node_id=report.node_id,
            )
        case Failed():
            details: dict[str, object] = {"node_id": report.node_id}
            if report.exit_code is not None:
                details["exit_code"] = report.exit_code
            if report.log_tail is not None:
                details["log_tail"] = report.log_tail
            return jobs.report_failed(
                report.job_id,
                report.attempt,
                report.seq,
                report.reason,
                details,
                retryable=report.retryable,
                node_id=report.node_id,
            )
        case Cancelled():
            return jobs.report_cancelled(
                report.job_id, report.attempt, report.seq, node_id=report.node_id
            )
