"""Job board rebuild rate on PostgreSQL, against merely reading and decoding the same events.

(a) rebuild: drop the job board and apply the whole log again, in batches, exactly as
    `python -m projections rebuild` does;
(b) baseline: read the same notifications (recorder.select_notifications) and decode them
    (mapper.to_domain_event), nothing else.
Each is run three times, interleaved, and the best run of each is kept, so a burst of load from
other work on the machine does not decide the ratio.

Run: .venv/bin/python bench/projections.py   (needs the local PostgreSQL, database `test`)
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name shadows the
# `projections` package: drop that entry before importing it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import psycopg  # noqa: E402

from domain.application import JobsApplication, ProgressReport  # noqa: E402
from domain.settings import StoreSettings  # noqa: E402
from domain.spec import parse_job_spec  # noqa: E402
from projections.__main__ import build_view  # noqa: E402
from projections.runner import rebuild  # noqa: E402

DSN = os.environ.get("TRAINYARD_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=postgres")
EVENTS = 100_000
JOBS = 20
BATCH = 500
READ_BATCH = 5000
REBUILD_BATCH = 10_000
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"
STATS = {
    "Environment/Cumulative Reward": 0.731,
    "Environment/Episode Length": 48.0,
    "Policy/Entropy": 1.2,
    "Losses/Value Loss": 0.05,
}


def target(name: str, measured: float, op: str, goal: float) -> str:
    ok = measured >= goal if op == ">=" else measured <= goal
    return f"TARGET {name} measured={measured:.3f} goal={op}{goal:g} {'PASS' if ok else 'FAIL'}"


def store_settings(schema: str) -> StoreSettings:
    info = psycopg.conninfo.conninfo_to_dict(DSN)
    return StoreSettings(
        event_store="postgres",
        postgres_host=str(info.get("host", "127.0.0.1")),
        postgres_port=int(info.get("port") or 5432),
        postgres_dbname=str(info.get("dbname", "test")),
        postgres_user=str(info.get("user", "postgres")),
        postgres_password=str(info.get("password", "")),
        postgres_schema=schema,
    )


def generate(app: JobsApplication) -> int:
    """Jobs through their lifecycle, mostly progress reports, until the log holds EVENTS."""
    spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})
    jobs = []
    for n in range(JOBS):
        job_id = app.submit(spec, client_id=f"bench-{n % 3}")
        assert app.claim(job_id, 1, f"node-{n}").granted
        app.report_started(job_id, 1, 1, {"versions": {"mlagents": "1.1.0"}})
        jobs.append(job_id)
    seq = 2
    while (app.recorder.max_notification_id() or 0) < EVENTS:
        for job_id in jobs:
            reports = [ProgressReport(1, q, q * 100, STATS) for q in range(seq, seq + BATCH)]
            app.report_progress_batch(job_id, reports)
        seq += BATCH
    for n, job_id in enumerate(jobs):
        app.report_completed(job_id, 1, seq + n, f"models/{job_id}.onnx", "0" * 64)
    return app.recorder.max_notification_id() or 0


def decode_all(app: JobsApplication) -> tuple[int, float]:
    """Read and decode every event; returns (events, seconds)."""
    start = time.perf_counter()
    position, count = 0, 0
    to_domain_event = app.mapper.to_domain_event
    while True:
        notifications = app.recorder.select_notifications(start=position + 1, limit=READ_BATCH)
        if not notifications:
            break
        for n in notifications:
            to_domain_event(n)
        count += len(notifications)
        position = notifications[-1].id
    return count, time.perf_counter() - start


def main() -> None:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        store = store_settings(schema)
        app = JobsApplication(store.eventsourcing_env())
        view = build_view(store)
        try:
            started = time.perf_counter()
            total = generate(app)
            print(f"generated {total} events in {time.perf_counter() - started:.1f} s")
            decode_rates, rebuild_rates = [], []
            for round_ in (1, 2, 3):
                count, seconds = decode_all(app)
                decode_rates.append(count / seconds)
                print(
                    f"round {round_}: read+decode {count} events: {count / seconds:,.0f} events/s"
                )
                started = time.perf_counter()
                progress = rebuild(app, view, batch_size=REBUILD_BATCH)
                rate = progress.events / (time.perf_counter() - started)  # drop + create too
                assert progress.events == total, (progress.events, total)
                rebuild_rates.append(rate)
                print(f"round {round_}: rebuild {progress.events} events: {rate:,.0f} events/s")
            jobs, metrics = view.dump()
            print(f"job board: {len(jobs)} jobs, {len(metrics)} metric rows")
            best_decode, best_rebuild = max(decode_rates), max(rebuild_rates)
            print(f"best read+decode {best_decode:,.0f} events/s, best rebuild {best_rebuild:,.0f}")
            print(target("rebuild_vs_decode", best_rebuild / best_decode, ">=", 0.5))
        finally:
            view.close()
            app.close()
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
