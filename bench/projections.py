"""The job board on PostgreSQL: rebuild rate, and live latency from a report to its update.

rebuild (a, b):
(a) rebuild: drop the job board and apply the whole log again, in batches, exactly as
    `python -m projections rebuild` does;
(b) baseline: read the same notifications (recorder.select_notifications) and decode them
    (mapper.to_domain_event), nothing else.
Each is run three times, interleaved, and the best run of each is kept, so a burst of load from
other work on the machine does not decide the ratio.

live (c): progress reports published as a train node does (to the reports queue, persistent,
confirmed) at a steady rate to the real handlers process (`faststream run handlers.app:app`)
and the real `python -m projections`, both subprocesses; the latency is from just before the
publish to the report's entry arriving at one `XREAD BLOCK` reader of the jobs' update streams,
matched by (job, seq). Baseline in the same run, at the same rate: the same messages published
to a queue with the same arguments and prefetch, consumed in this process (plain publish ->
consume). Also printed: the two halves of the latency (split at the event's own timestamp),
latency by 5 s of publishing (does the chain keep up?), progress events per handler transaction
and the CPU the processes and the machine used. BENCH_LIVE_RUNS (default 1) repeats it; the
target is the median p99 of the rounds. BENCH_REPORTS_PREFETCH overrides the handlers' prefetch.

Run: .venv/bin/python bench/projections.py [rebuild|live|all]   (default all; needs the local
PostgreSQL with database `test`, Redis and RabbitMQ)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

# Run as a script, this file's directory comes first on sys.path and its name shadows the
# `projections` package: drop that entry before importing it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import aio_pika  # noqa: E402
import psycopg  # noqa: E402
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import QuorumQueueArgs

from domain.application import JobsApplication, ProgressReport  # noqa: E402
from domain.contracts import AttemptRef, Heartbeat, Progress, Topology  # noqa: E402
from domain.settings import StoreSettings  # noqa: E402
from domain.spec import parse_job_spec  # noqa: E402
from projections.__main__ import build_view  # noqa: E402
from projections.runner import rebuild  # noqa: E402

ROOT = _HERE.parent
DSN = os.environ.get("TRAINYARD_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=postgres")
AMQP_URL = os.environ.get("TRAINYARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
EVENTS = 100_000
JOBS = 20
BATCH = 500
READ_BATCH = 5000
REBUILD_BATCH = 10_000
# (c) live
RATE = 200.0  # reports/s
JOBS_LIVE = 4
WARMUP_S = 2.0
BASELINE_S = 10.0
LIVE_S = 25.0
LAG_LIMIT_S = 60.0  # after the last publish, wait this long for the last update
LIVE_RUNS = int(os.environ.get("BENCH_LIVE_RUNS", "1"))
# The handlers' reports prefetch (empty: the process's default, 64); the baseline uses the same.
PREFETCH = os.environ.get("BENCH_REPORTS_PREFETCH", "")
NODE = "bench-node"
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


def bench_rebuild() -> None:
    """(a) and (b): rebuild rate against read+decode."""
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


# --- (c) live: report -> Redis Stream entry ----------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summary(name: str, latencies_s: list[float]) -> str:
    ms = [x * 1e3 for x in latencies_s]
    return (
        f"{name}: n={len(ms)} p50={percentile(ms, 50):.1f} p95={percentile(ms, 95):.1f} "
        f"p99={percentile(ms, 99):.1f} max={max(ms, default=math.nan):.1f} ms"
    )


def progress_report(job_id: uuid.UUID, seq: int) -> Progress:
    return Progress(job_id=job_id, attempt=1, node_id=NODE, seq=seq, step=seq * 100, stats=STATS)


class Paced:
    """Calls at a steady rate: the n-th at start + n / rate (late calls go at once)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.perf_counter()
        self.n = 0

    async def tick(self) -> None:
        self.n += 1
        delay = self.start + self.n / self.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


class LiveRun:
    """Throwaway schema, queues and Redis keys; the two processes under test."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:12]
        self.schema = f"bench_{tag}"
        self.topology = Topology(f"bench-{tag}.")
        self.redis_prefix = f"bench:{tag}:"
        self.baseline_queue = f"{self.topology.prefix}bench.baseline"
        self.store = store_settings(self.schema)
        self.processes: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        """The processes' environment: this run's schema, queue prefix and key prefix."""
        s = self.store
        return {
            **os.environ,
            "TRAINYARD_EVENT_STORE": "postgres",
            "TRAINYARD_POSTGRES_HOST": s.postgres_host,
            "TRAINYARD_POSTGRES_PORT": str(s.postgres_port),
            "TRAINYARD_POSTGRES_DBNAME": s.postgres_dbname,
            "TRAINYARD_POSTGRES_USER": s.postgres_user,
            "TRAINYARD_POSTGRES_PASSWORD": s.postgres_password,
            "TRAINYARD_POSTGRES_SCHEMA": self.schema,
            "TRAINYARD_AMQP_URL": AMQP_URL,
            "TRAINYARD_REDIS_URL": REDIS_URL,
            "TRAINYARD_QUEUE_PREFIX": self.topology.prefix,
            "TRAINYARD_REDIS_KEY_PREFIX": self.redis_prefix,
        } | ({"TRAINYARD_REPORTS_PREFETCH": PREFETCH} if PREFETCH else {})

    def spawn(self, *argv: str) -> None:
        """Start `python <argv>`, or the venv's own `faststream <argv...>`."""
        if argv[0] == "faststream":
            command = [str(Path(sys.executable).with_name("faststream")), *argv[1:]]
        else:
            command = [sys.executable, *argv]
        process = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=subprocess.DEVNULL)
        print(f"started {' '.join(argv)}: pid {process.pid}")
        self.processes.append(process)

    def cpu_seconds(self) -> list[float]:
        """CPU time used so far by each process (Linux /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        used = []
        for process in self.processes:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            used.append((int(fields[11]) + int(fields[12])) / tick)
        return used

    def check_alive(self) -> None:
        """Raise if a process under test has exited."""
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")

    def stop(self) -> None:
        """SIGTERM the processes this run started, and wait for them."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    async def cleanup(self) -> None:
        """Delete this run's queues, exchanges and Redis keys."""
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for name in (*self.topology.work_queues, self.topology.dead_letter_queue):
                await channel.queue_delete(name)
            await channel.queue_delete(self.baseline_queue)
            for exchange in (self.topology.dead_letter_exchange, self.topology.control_exchange):
                await channel.exchange_delete(exchange)
        client = Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{self.redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def start_jobs(store: StoreSettings, count: int) -> list[uuid.UUID]:
    """Submit, claim and start `count` jobs (seq 1 is the started report)."""
    app = JobsApplication(store.eventsourcing_env())
    try:
        spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})
        jobs = []
        for _ in range(count):
            job_id = app.submit(spec, client_id="bench")
            assert app.claim(job_id, 1, NODE).granted
            app.report_started(job_id, 1, 1, {"versions": {"mlagents": "1.1.0"}}, node_id=NODE)
            jobs.append(job_id)
        return jobs
    finally:
        app.close()


def machine_cpu() -> tuple[float, float]:
    """Seconds of CPU the whole machine spent busy, and stolen by the hypervisor (Linux)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    steal = ticks[7] if len(ticks) > 7 else 0
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle - steal) / tick, steal / tick


class StreamReader:
    """One reader of every job's update stream; notes when each progress entry arrives."""

    def __init__(self, client: Redis, prefix: str, jobs: list[uuid.UUID]) -> None:
        self.client = client
        self.last_ids: dict[str, str] = {f"{prefix}jobs:{j}:updates": "0-0" for j in jobs}
        self.arrived: dict[tuple[str, int], float] = {}
        # When the handler created each event (its timestamp), on the perf_counter clock.
        self.recorded: dict[tuple[str, int], float] = {}
        self._offset = time.time() - time.perf_counter()
        self.started: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # BLOCK well under the client's socket timeout; always from the last id seen.
            streams: Any = self.last_ids
            reply: Any = await self.client.xread(streams, count=1000, block=500)
            now = time.perf_counter()
            for key, entries in reply or []:
                for entry_id, fields in entries:
                    self.last_ids[key] = entry_id
                    if fields.get("type") == "progress":
                        report = (fields["job_id"], int(fields["seq"]))
                        self.arrived[report] = now
                        created = datetime.fromisoformat(fields["timestamp"]).timestamp()
                        self.recorded[report] = created - self._offset
                    elif fields.get("type") == "started":
                        self.started.add(fields["job_id"])


async def heartbeats(client: RabbitBroker, topology: Topology, jobs: list[uuid.UUID]) -> None:
    """Keep the node's leases alive, as a train node does."""
    running = [AttemptRef(job_id=j, attempt=1) for j in jobs]
    beat = Heartbeat(node_id=NODE, slots=len(jobs), free_slots=0, running=running)
    while True:
        await client.publish(beat, queue=topology.heartbeats)
        await asyncio.sleep(2)


async def publish_reports(
    client: RabbitBroker,
    queue: str,
    jobs: list[uuid.UUID],
    next_seq: dict[uuid.UUID, int],
    seconds: float,
    sent: dict[tuple[str, int], float],
) -> None:
    """Publish progress reports round-robin over `jobs` at RATE for `seconds`.

    Each publish waits for the broker's confirm in its own task, so a slow confirm delays
    neither the next report nor the rate (many train nodes publish independently).
    """
    pace = Paced(RATE)
    publishing: list[asyncio.Task[Any]] = []
    for n in range(int(RATE * seconds)):
        job_id = jobs[n % len(jobs)]
        seq = next_seq[job_id]
        next_seq[job_id] = seq + 1
        report = progress_report(job_id, seq)
        sent[(str(job_id), seq)] = time.perf_counter()
        publishing.append(asyncio.create_task(client.publish(report, queue=queue, persist=True)))
        await pace.tick()
    await asyncio.gather(*publishing)


async def wait_for(check: Callable[[], bool], what: str, within_s: float, run: LiveRun) -> None:
    """Poll `check` until it holds; TimeoutError after `within_s`."""
    deadline = time.perf_counter() + within_s
    while not check():
        run.check_alive()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def live_round(run: LiveRun) -> tuple[list[float], list[float]]:
    """One run of (c): returns (chain latencies, baseline latencies) in seconds."""
    jobs = await asyncio.to_thread(start_jobs, run.store, JOBS_LIVE)
    next_seq = dict.fromkeys(jobs, 2)
    run.spawn("faststream", "run", "handlers.app:app")
    run.spawn("-m", "projections")

    baseline_sent: dict[tuple[str, int], float] = {}
    baseline_got: dict[tuple[str, int], float] = {}
    client = RabbitBroker(AMQP_URL, logger=None)

    queue = RabbitQueue(
        run.baseline_queue,
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments=cast("QuorumQueueArgs", run.topology.work_queue_arguments()),
    )

    @client.subscriber(queue, channel=Channel(prefetch_count=int(PREFETCH or "64")))
    async def consume(report: Progress) -> None:
        baseline_got[(str(report.job_id), report.seq)] = time.perf_counter()

    reader_client = Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=10)
    reader = StreamReader(reader_client, run.redis_prefix, jobs)
    stop = asyncio.Event()
    async with client:
        await client.start()
        beating = asyncio.create_task(heartbeats(client, run.topology, jobs))
        reading = asyncio.create_task(reader.run(stop))
        try:
            # Both processes are up once every job's started update is in its stream.
            await wait_for(lambda: len(reader.started) == len(jobs), "the projections", 60, run)
            # Baseline first, so its queue and the reports queue never compete.
            await publish_reports(client, run.baseline_queue, jobs, dict(next_seq), WARMUP_S, {})
            baseline_got.clear()
            await publish_reports(
                client, run.baseline_queue, jobs, dict(next_seq), BASELINE_S, baseline_sent
            )
            await wait_for(
                lambda: baseline_sent.keys() <= baseline_got.keys(), "the baseline", 30, run
            )
            # The chain: a warm-up, then the measured run.
            warmup: dict[tuple[str, int], float] = {}
            await publish_reports(client, run.topology.reports, jobs, next_seq, WARMUP_S, warmup)
            sent: dict[tuple[str, int], float] = {}
            cpu_before, machine_before = run.cpu_seconds(), machine_cpu()
            started = time.perf_counter()
            await publish_reports(client, run.topology.reports, jobs, next_seq, LIVE_S, sent)
            elapsed = time.perf_counter() - started
            cpu = [b - a for a, b in zip(cpu_before, run.cpu_seconds(), strict=True)]
            busy, steal = (b - a for a, b in zip(machine_before, machine_cpu(), strict=True))
            cores = os.cpu_count() or 1
            print(f"published {len(sent)} reports in {elapsed:.1f} s ({len(sent) / elapsed:.0f}/s)")
            print(
                f"  CPU while publishing: handlers {cpu[0] / elapsed:.0%} of a core, projections "
                f"{cpu[1] / elapsed:.0%}; the machine {busy / elapsed / cores:.0%} busy "
                f"(all processes), {steal / elapsed / cores:.0%} stolen"
            )
            try:
                await wait_for(
                    lambda: (sent.keys() | warmup.keys()) <= reader.arrived.keys(),
                    "every report's update",
                    LAG_LIMIT_S,
                    run,
                )
            except TimeoutError:
                # The chain fell behind: count what is missing as never arriving.
                missing = len(sent.keys() - reader.arrived.keys())
                print(
                    f"  {missing} of {len(sent)} reports not in the stream {LAG_LIMIT_S:.0f} s on"
                )
        finally:
            stop.set()
            beating.cancel()
            await asyncio.gather(reading, beating, return_exceptions=True)
            await reader_client.aclose()
    chain = [reader.arrived.get(k, math.inf) - t for k, t in sent.items()]
    sent = {k: t for k, t in sent.items() if k in reader.arrived}
    windows = [
        percentile([reader.arrived[k] - t for k, t in sent.items() if 0 <= t - started - w < 5], 50)
        for w in range(0, int(LIVE_S), 5)
    ]
    print("  p50 by 5 s of publishing: " + ", ".join(f"{w * 1e3:.0f}" for w in windows) + " ms")
    baseline = [baseline_got[k] - t for k, t in baseline_sent.items()]
    print(
        summary(
            "  publish -> event created in the handler",
            [reader.recorded[k] - t for k, t in sent.items()],
        )
    )
    print(
        summary(
            "  event created -> stream entry read",
            [reader.arrived[k] - reader.recorded[k] for k in sent],
        )
    )
    return chain, baseline


async def bench_live_async() -> None:
    """(c): report -> stream latency against plain publish -> consume, RUNS times."""
    # The harness's own full garbage collections (tens of ms with its imports) would show up
    # as latency of the system under test: keep its start-up objects out of them.
    gc.collect()
    gc.freeze()
    chain_p99s: list[float] = []
    row: tuple[Any, ...] | None = None
    for round_ in range(1, LIVE_RUNS + 1):
        run = LiveRun()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {run.schema}")
        try:
            chain, baseline = await live_round(run)
        finally:
            run.stop()
            await run.cleanup()
            with psycopg.connect(DSN, autocommit=True) as conn:
                # How many progress events each of the handlers' transactions recorded.
                row = conn.execute(
                    f"SELECT count(*), count(DISTINCT xmin::text) FROM {run.schema}.jobs_events "
                    "WHERE topic LIKE %s",
                    ("%Reported",),
                ).fetchone()
                conn.execute(f"DROP SCHEMA {run.schema} CASCADE")
        if row and row[1]:
            print(
                f"  {row[0]} progress events in {row[1]} transactions: {row[0] / row[1]:.1f} each"
            )
        print(f"round {round_}: " + summary("baseline publish->consume", baseline))
        print(f"round {round_}: " + summary("report->stream entry", chain))
        chain_p99s.append(percentile(chain, 99) * 1e3)
    if len(chain_p99s) > 1:
        print("report->stream p99 over rounds: " + ", ".join(f"{p:.1f}" for p in chain_p99s))
    print(target("report_to_stream_p99_ms", statistics.median(chain_p99s), "<=", 30))


def bench_live() -> None:
    """(c), on its own event loop."""
    asyncio.run(bench_live_async())


def main(argv: Sequence[str] | None = None) -> None:
    """Run the parts named on the command line: rebuild, live or all (default)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", nargs="?", choices=["rebuild", "live", "all"], default="all")
    part = parser.parse_args(argv).part
    if part in ("rebuild", "all"):
        bench_rebuild()
    if part in ("live", "all"):
        bench_live()


if __name__ == "__main__":
    main()
