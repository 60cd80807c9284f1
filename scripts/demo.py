"""The demo as far as Trainyard goes today: a job's life recorded in the event store and replayed.

It submits a job on a stand-in build to a local SQLite event store, plays the
reports a train node sends (claim, start, progress, a lost lease, a second
node, completion), then replays the job's events as an audit trail.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from domain.application import JobsApplication, ProgressReport
from domain.settings import StoreSettings
from domain.spec import parse_job_spec

CONFIG = """\
behaviors:
  Reach:
    trainer_type: ppo
    hyperparameters: {batch_size: 64, buffer_size: 640, learning_rate: 3.0e-4}
    network_settings: {hidden_units: 32, num_layers: 1}
    max_steps: 20000
"""


def main() -> None:
    """Record and replay one job."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = StoreSettings(event_store="sqlite", sqlite_path=Path(tmp) / "events.sqlite3")
        app = JobsApplication(settings.eventsourcing_env(), max_attempts=3)
        spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}, "seed": 7})
        job_id = app.submit(spec, client_id="demo", request_id="demo-1")
        print(f"submitted job {job_id}")
        app.claim(job_id, 1, "node-a")
        app.report_started(job_id, 1, 1, {"node": "node-a"})
        app.report_progress_batch(
            job_id, [ProgressReport(1, s, s * 1000, {"reward": s / 10}) for s in range(2, 6)]
        )
        app.expire_lease(job_id, 1)
        print("node-a went silent: lease expired, job re-queued as attempt 2")
        app.claim(job_id, 2, "node-b")
        app.report_started(job_id, 2, 1, {"node": "node-b"})
        app.report_progress_batch(
            job_id, [ProgressReport(2, s, s * 1000, {"reward": s / 10}) for s in range(2, 22)]
        )
        app.report_completed(job_id, 2, 22, f"jobs/{job_id}/2/Reach.onnx", "0" * 64)
        print(f"stale report from node-a: {app.report_completed(job_id, 1, 9, 'x', '0' * 64)}")
        job = app.get_job(job_id)
        print(f"status: {job.status}, attempt {job.attempt} on {job.node_id}")
        print("audit trail:")
        for event in app.repository.event_store.get(job_id):
            print(f"  v{event.originator_version} {type(event).__name__}")
        print(f"progress reports recorded: {app.get_metrics(job_id).count}")
        app.close()


if __name__ == "__main__":
    main()
