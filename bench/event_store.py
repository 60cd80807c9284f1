"""Event store throughput on PostgreSQL, against plain psycopg inserts in the same run.

(a) single-command appends: one progress report per command (load, decide, save);
(b) batched appends: progress reports saved BATCH at a time in one transaction;
(c) baseline: the same rows (same columns, indexes and payloads, copied from (b))
    inserted with psycopg `executemany`, BATCH rows per transaction;
(d) loading a job with 100,000 progress reports vs a job with 10.

Run: .venv/bin/python bench/event_store.py   (needs the local PostgreSQL, database `test`)
"""

from __future__ import annotations

import os
import statistics
import time
import uuid

import psycopg

from domain.application import JobsApplication, ProgressReport
from domain.settings import StoreSettings
from domain.spec import parse_job_spec

DSN = os.environ.get("TRAINYARD_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=postgres")
SINGLE = 1_000
BATCH = 500
BATCHED_EVENTS = 20_000
ROUNDS = 10
LONG_RUN = 100_000
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


def running_job(app: JobsApplication) -> uuid.UUID:
    spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})
    job_id = app.submit(spec, client_id="bench")
    assert app.claim(job_id, 1, "node").granted
    app.report_started(job_id, 1, 1, {})
    return job_id


def append_batched(app: JobsApplication, job_id: uuid.UUID, first_seq: int, n: int) -> float:
    start = time.perf_counter()
    for s in range(first_seq, first_seq + n, BATCH):
        reports = [
            ProgressReport(1, q, q * 10, STATS) for q in range(s, min(s + BATCH, first_seq + n))
        ]
        app.report_progress_batch(job_id, reports)
    return time.perf_counter() - start


class Baseline:
    """Plain psycopg: copies of real stored rows, executemany, BATCH rows per transaction."""

    def __init__(self, conn: psycopg.Connection, schema: str) -> None:
        self.conn = conn
        self.table = f"{schema}.baseline"
        self.rows = conn.execute(
            f"SELECT topic, state FROM {schema}.jobs_events WHERE topic LIKE %s LIMIT %s",
            ("%Reported", BATCH),
        ).fetchall()
        assert len(self.rows) == BATCH, "run the batched appends first"
        conn.execute(f"CREATE TABLE {self.table} (LIKE {schema}.jobs_events INCLUDING ALL)")
        conn.commit()
        self.originator = uuid.uuid4()
        self.version = 0

    def insert(self, n: int) -> float:
        start = time.perf_counter()
        with self.conn.cursor() as cur:
            for _ in range(0, n, BATCH):
                params = []
                for topic, state in self.rows:
                    self.version += 1
                    params.append((self.originator, self.version, topic, state))
                cur.executemany(
                    f"INSERT INTO {self.table} "
                    "(originator_id, originator_version, topic, state) VALUES (%s, %s, %s, %s)",
                    params,
                )
                self.conn.commit()
        return time.perf_counter() - start


def load_times(
    app: JobsApplication, job_ids: list[uuid.UUID], repeat: int = 200
) -> list[tuple[float, float]]:
    """Median cold load times (job, metrics stream) per job, the jobs loaded in turn."""
    times: dict[uuid.UUID, tuple[list[float], list[float]]] = {j: ([], []) for j in job_ids}
    for _ in range(repeat):
        for job_id in job_ids:  # in turn, so every job sees the same machine load
            start = time.perf_counter()
            app.get_job(job_id)
            middle = time.perf_counter()
            app.get_metrics(job_id)
            times[job_id][0].append(middle - start)
            times[job_id][1].append(time.perf_counter() - middle)
    return [(statistics.median(times[j][0]), statistics.median(times[j][1])) for j in job_ids]


def main() -> None:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    conninfo = psycopg.conninfo.conninfo_to_dict(DSN)
    settings = StoreSettings(
        event_store="postgres",
        postgres_host=str(conninfo.get("host", "127.0.0.1")),
        postgres_dbname=str(conninfo.get("dbname", "test")),
        postgres_user=str(conninfo.get("user", "postgres")),
        postgres_schema=schema,
    )
    app = JobsApplication(settings.eventsourcing_env())
    try:
        # (a) one report per command
        job_a = running_job(app)
        start = time.perf_counter()
        for seq in range(2, 2 + SINGLE):
            app.report_progress(job_a, 1, seq, seq * 10, STATS)
        single_rate = SINGLE / (time.perf_counter() - start)

        # (b) and (c) in alternating rounds, so both see the same machine load
        job_b = running_job(app)
        append_batched(app, job_b, 2, BATCH)  # warm up, and rows for the baseline to copy
        t_batched = t_raw = 0.0
        seq = 2 + BATCH
        with psycopg.connect(DSN) as conn:
            baseline = Baseline(conn, schema)
            baseline.insert(BATCH)  # warm up
            for _ in range(ROUNDS):
                t_batched += append_batched(app, job_b, seq, BATCHED_EVENTS // ROUNDS)
                seq += BATCHED_EVENTS // ROUNDS
                t_raw += baseline.insert(BATCHED_EVENTS // ROUNDS)
        batched_rate = BATCHED_EVENTS / t_batched
        raw_rate = BATCHED_EVENTS / t_raw

        # (d) loading after 10 vs 100,000 progress reports
        job_short = running_job(app)
        append_batched(app, job_short, 2, 10)
        job_long = running_job(app)
        append_batched(app, job_long, 2, LONG_RUN)
        cold = JobsApplication({**settings.eventsourcing_env(), "AGGREGATE_CACHE_MAXSIZE": ""})
        (t_short, m_short), (t_long, m_long) = load_times(cold, [job_short, job_long])
        cold.close()
    finally:
        app.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

    print(f"(a) single-command appends: {single_rate:,.0f} events/s")
    print(f"(b) batched appends ({BATCH}/transaction): {batched_rate:,.0f} events/s")
    print(f"(c) psycopg executemany ({BATCH}/transaction): {raw_rate:,.0f} rows/s")
    print(
        f"(d) cold load of the job: {t_short * 1e3:.2f} ms after 10 reports, "
        f"{t_long * 1e3:.2f} ms after {LONG_RUN:,}; of its metrics stream (snapshot + tail): "
        f"{m_short * 1e3:.2f} ms and {m_long * 1e3:.2f} ms"
    )
    print(target("batched_append_vs_raw_insert", batched_rate / raw_rate, ">=", 0.5))
    print(target("job_load_100k_vs_10_reports", t_long / t_short, "<=", 1.25))


if __name__ == "__main__":
    main()
