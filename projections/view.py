"""Names the job board's views share, whatever database holds them."""

from __future__ import annotations

PROJECTION_NAME = "JobBoard"
JOBS_TABLE = "jobs"
METRICS_TABLE = "job_metrics"
OUTBOX_TABLE = "jobboard_outbox"
TRACKING_TABLE = "jobboard_tracking"
