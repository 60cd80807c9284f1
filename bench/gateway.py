"""The gateway: WebSocket fan-out latency, and jobs submitted per second over HTTP.

The gateway runs as `uvicorn gateway.app:app --workers N` in a subprocess, as it is deployed
(docker-compose.yml: N = GATEWAY_WORKERS, default 2; here BENCH_GATEWAY_WORKERS, default 2), on
a fresh PostgreSQL schema and its own Redis key prefix. Each worker process has its own reader
of the update stream and serves the connections the kernel hands it.

fanout (1): 200, then 1000 WebSocket clients (CLIENTS_PER_PROCESS per client process, so that
one client process is not what is measured) watch one job's stream. This process appends
progress updates to the job's and the global stream exactly as the projections publish them
(explicit `{position}-0` ids, string fields), at FANOUT_RATE per second (BENCH_FANOUT_RATE,
default 2), with the send time in the update's stats; each client notes when each update
arrives. Latency = arrival - send, over every (update, client). Baseline in the same run: one
plain `XREAD BLOCK` reader of the global stream, same updates (what Redis alone costs). Each
round watches a job of its own; clients do not negotiate compression. Also printed: the CPU the
gateway and the clients used. Each send is one socket write: at 1000 clients the gateway's time
goes mostly into the kernel's `send`, so a higher rate measures the machine's cores.

submit (2): jobs submitted through `POST /jobs` by an httpx client from SUBMIT_CONCURRENCY
threads (requests in flight) against the same work done directly: `parse_job_spec` +
`JobsApplication.submit` from as many threads, on the same event store. Three rounds of each,
interleaved; the best of each is kept, so a burst of load from other work does not decide.

Run: .venv/bin/python bench/gateway.py [fanout|submit|all]   (default all; needs the local
PostgreSQL with database `test` and Redis)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and its name shadows the
# `gateway` package: drop that entry before importing it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from domain.application import JobsApplication  # noqa: E402
from domain.settings import StoreSettings  # noqa: E402
from domain.spec import parse_job_spec  # noqa: E402
from gateway.db import create_database  # noqa: E402
from gateway.tokens import TokenStore  # noqa: E402
from projections.__main__ import build_view  # noqa: E402
from projections.publisher import global_stream, job_stream  # noqa: E402
from projections.runner import BatchRunner  # noqa: E402

ROOT = _HERE.parent
DSN = os.environ.get("TRAINYARD_TEST_POSTGRES_DSN", "host=127.0.0.1 dbname=test user=postgres")
REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"
SPEC: dict[str, Any] = {"config": CONFIG, "env": {"builtin": "reach"}, "seed": 7}
# (1) fan-out
# A job reports progress every few seconds; 2/s to 1,000 watchers is already 2,000 sends/s.
GATEWAY_WORKERS = int(os.environ.get("BENCH_GATEWAY_WORKERS", "2"))
FANOUT_RATE = float(os.environ.get("BENCH_FANOUT_RATE", "2"))  # updates/s
FANOUT_UPDATES = int(os.environ.get("BENCH_FANOUT_UPDATES", "60"))  # per round
WARMUP_UPDATES = 5  # the first updates of a round are not counted
CLIENTS_PER_PROCESS = 250
CONNECT_TIMEOUT_S = 120.0
# (2) submit
SUBMITS = 600
SUBMIT_CONCURRENCY = 16
SUBMIT_ROUNDS = 3
START_TIMEOUT_S = 60.0
JOBS = 2


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


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, values_ms: Sequence[float]) -> str:
    return (
        f"{name}: n={len(values_ms)} p50={percentile(values_ms, 0.5):.1f} "
        f"p99={percentile(values_ms, 0.99):.1f} max={max(values_ms):.1f} ms"
    )


def cpu_seconds(pid: int) -> float:
    """CPU time a process and its live children (the gateway's workers) have used so far."""
    process = psutil.Process(pid)
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def raise_open_files() -> None:
    """Allow as many sockets as the hard limit (a client process holds hundreds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the gateway under test -------------------------------------------------------


@dataclass
class Setup:
    """A fresh schema, Redis prefix and running gateway, with a token and projected jobs."""

    schema: str
    prefix: str
    store: StoreSettings
    url: str
    token: str
    jobs: list[str]
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def gateway() -> Iterator[Setup]:
    """Start the gateway on a fresh schema; drop everything afterwards."""
    schema = f"bench_gw_{uuid.uuid4().hex[:10]}"
    prefix = f"bench-gw-{uuid.uuid4().hex[:8]}:"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    store = store_settings(schema)
    process: subprocess.Popen[bytes] | None = None
    try:
        view = build_view(store)  # the job board's tables, as the projections create them
        app = JobsApplication(store.eventsourcing_env())
        db = create_database(store, pool_size=1)
        db.open()
        try:
            tokens = TokenStore(db)
            tokens.create_table()
            token = tokens.create("bench")
            jobs = [str(app.submit(parse_job_spec(SPEC), "bench")) for _ in range(JOBS)]
            BatchRunner(app, view).catch_up()
        finally:
            db.close()
            app.close()
            view.close()
        port = free_port()
        env = os.environ | {
            "TRAINYARD_EVENT_STORE": "postgres",
            "TRAINYARD_POSTGRES_HOST": store.postgres_host,
            "TRAINYARD_POSTGRES_PORT": str(store.postgres_port),
            "TRAINYARD_POSTGRES_DBNAME": store.postgres_dbname,
            "TRAINYARD_POSTGRES_USER": store.postgres_user,
            "TRAINYARD_POSTGRES_PASSWORD": store.postgres_password,
            "TRAINYARD_POSTGRES_SCHEMA": schema,
            "TRAINYARD_REDIS_URL": REDIS_URL,
            "TRAINYARD_REDIS_KEY_PREFIX": prefix,
            "TRAINYARD_MODEL_STORE": "local",
            "TRAINYARD_MODEL_DIR": f"/tmp/bench-gateway-{schema}",
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import resource, sys, uvicorn;"
                "resource.setrlimit(resource.RLIMIT_NOFILE,"
                " (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2);"
                "uvicorn.main(sys.argv[1:])",
                "gateway.app:app",
                "--host=127.0.0.1",
                f"--port={port}",
                "--log-level=warning",
                "--backlog=4096",
                f"--workers={GATEWAY_WORKERS}",
            ],
            cwd=ROOT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        print(f"gateway pid {process.pid} ({GATEWAY_WORKERS} workers) on {url}, schema {schema}")
        yield Setup(schema, prefix, store, url, token, jobs, process)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# --- (1) fan-out --------------------------------------------------------------------


async def client_main(url: str, token: str, count: int, expect: int, out: str) -> None:
    """A client process: `count` connections; each receives `expect` updates, noting times.

    The latencies go to the file `out`, as JSON.
    """
    raise_open_files()
    headers = {"Authorization": f"Bearer {token}"}
    connections: list[ClientConnection] = []
    gate = asyncio.Semaphore(50)

    async def open_one() -> ClientConnection:
        async with gate:
            ws = await connect(
                url,
                additional_headers=headers,
                open_timeout=CONNECT_TIMEOUT_S,
                compression=None,
            )
            snapshot = json.loads(await ws.recv())
            assert snapshot["type"] == "snapshot", snapshot
            return ws

    connections = list(await asyncio.gather(*(open_one() for _ in range(count))))
    print("ready", flush=True)
    cpu = time.process_time()

    async def collect(ws: ClientConnection) -> list[tuple[float, str | bytes]]:
        got = []
        for _ in range(expect):
            message = await ws.recv()
            got.append((time.time(), message))
        return got

    results = await asyncio.gather(*(collect(ws) for ws in connections))
    cpu = time.process_time() - cpu
    latencies = []
    for got in results:
        for arrived, message in got:
            update = json.loads(message)["update"]
            if update["seq"] > WARMUP_UPDATES:
                latencies.append((arrived - update["stats"]["sent"]) * 1e3)
    for ws in connections:
        await ws.close()
    result = json.dumps({"latencies": latencies, "cpu": cpu})
    await asyncio.to_thread(Path(out).write_text, result)


def baseline_reader(
    key: str, expect: int, ready: threading.Event, out: list[float], start: str
) -> None:
    """One plain XREAD BLOCK reader of the global stream: the latency Redis alone adds."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=None)
    last = start
    seen = 0
    ready.set()
    while seen < expect:
        reply: Any = client.xread({key: last}, count=100, block=1000)
        now = time.time()
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                last = entry_id
                seen += 1
                if int(fields["seq"]) > WARMUP_UPDATES:
                    out.append((now - json.loads(fields["stats"])["sent"]) * 1e3)
    client.close()


def fanout_round(
    setup: Setup, job_id: str, clients: int, first_position: int
) -> tuple[list[float], list[float]]:
    """One round: `clients` connections; returns (their latencies, the baseline's), in ms."""
    ws_url = setup.url.replace("http://", "ws://") + f"/jobs/{job_id}/stream?model=0"
    processes = []
    outputs = []
    remaining = clients
    while remaining > 0:
        count = min(CLIENTS_PER_PROCESS, remaining)
        remaining -= count
        outputs.append(Path(f"/tmp/bench-gateway-{uuid.uuid4().hex[:8]}.json"))
        argv = [sys.executable, __file__, "client", ws_url, setup.token, str(count)]
        processes.append(
            subprocess.Popen(
                [*argv, str(FANOUT_UPDATES), str(outputs[-1])],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a client process did not connect: {line!r}")
        print(f"{clients} clients connected in {len(processes)} processes")
        r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        everything = global_stream(setup.prefix)
        one_job = job_stream(setup.prefix, job_id)
        tip: Any = r.xrevrange(everything, "+", "-", count=1)
        baseline: list[float] = []
        ready = threading.Event()
        reader = threading.Thread(
            target=baseline_reader,
            args=(everything, FANOUT_UPDATES, ready, baseline, tip[0][0] if tip else "0-0"),
        )
        reader.start()
        ready.wait()
        cpu_before = cpu_seconds(setup.process.pid)
        started = time.monotonic()
        for seq in range(1, FANOUT_UPDATES + 1):
            time.sleep(max(0.0, started + seq / FANOUT_RATE - time.monotonic()))
            position = first_position + seq
            fields = {
                "position": str(position),
                "job_id": job_id,
                "type": "progress",
                "status": "running",
                "attempt": "1",
                "node_id": "node-1",
                "cancel_requested": "0",
                "timestamp": "2026-01-01T00:00:00+00:00",
                "seq": str(seq),
                "step": str(seq * 100),
                "stats": json.dumps({"Environment/Cumulative Reward": 0.5, "sent": time.time()}),
            }
            pipe = r.pipeline(transaction=False)
            pipe.xadd(one_job, fields, id=f"{position}-0")  # type: ignore[arg-type]
            pipe.xadd(everything, fields, id=f"{position}-0")  # type: ignore[arg-type]
            pipe.execute()
        reader.join(60)
        latencies: list[float] = []
        client_cpu = 0.0
        for process, output in zip(processes, outputs, strict=True):
            if process.wait() != 0:
                raise RuntimeError(f"a client process failed: exit status {process.returncode}")
            found = json.loads(output.read_text())
            latencies += found["latencies"]
            client_cpu += found["cpu"]
        print(
            f"  {time.monotonic() - started:.1f} s until every client had every update; CPU: "
            f"gateway {cpu_seconds(setup.process.pid) - cpu_before:.1f} s, "
            f"clients {client_cpu:.1f} s"
        )
        r.close()
        return latencies, baseline
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for output in outputs:
            output.unlink(missing_ok=True)


def bench_fanout() -> list[str]:
    """(1): 200 and 1000 clients on one gateway."""
    targets = []
    with gateway() as setup:
        position = 1_000_000
        for job_id, (clients, goal) in zip(setup.jobs, ((200, 50.0), (1000, 250.0)), strict=False):
            # A job of its own per round: a new client's catch-up would send the last round's.
            latencies, baseline = fanout_round(setup, job_id, clients, position)
            position += FANOUT_UPDATES + 1
            expected = clients * (FANOUT_UPDATES - WARMUP_UPDATES)
            print(f"{clients} clients, {FANOUT_RATE:g} updates/s:")
            print("  " + summary("baseline XADD -> one XREAD reader", baseline))
            print("  " + summary("XADD -> every WebSocket client", latencies))
            if len(latencies) != expected:
                raise RuntimeError(f"{len(latencies)} arrivals counted, {expected} expected")
            targets.append(
                target(f"ws_fanout_{clients}_p99_ms", percentile(latencies, 0.99), "<=", goal)
            )
    return targets


# --- (2) submit ---------------------------------------------------------------------


def submit_http(setup: Setup, count: int) -> float:
    """Jobs/s through POST /jobs from SUBMIT_CONCURRENCY threads sharing one httpx client.

    (httpx's AsyncClient spent ~4 ms of CPU per request here, the sync client ~1.3 ms: on
    two cores the client's own cost would decide the figure.)
    """
    headers = {"Authorization": f"Bearer {setup.token}"}
    limits = httpx.Limits(max_connections=SUBMIT_CONCURRENCY)
    with httpx.Client(base_url=setup.url, headers=headers, limits=limits, timeout=60) as http:

        def one(_: int) -> None:
            response = http.post("/jobs", json=SPEC)
            if response.status_code != 201:
                raise RuntimeError(f"POST /jobs: {response.status_code} {response.text}")

        with ThreadPoolExecutor(SUBMIT_CONCURRENCY) as pool:
            started = time.perf_counter()
            list(pool.map(one, range(count)))
            return count / (time.perf_counter() - started)


def submit_direct(app: JobsApplication, count: int) -> float:
    """Jobs/s calling the application from SUBMIT_CONCURRENCY threads."""

    def one(_: int) -> None:
        app.submit(parse_job_spec(SPEC), "bench")

    with ThreadPoolExecutor(SUBMIT_CONCURRENCY) as pool:
        started = time.perf_counter()
        list(pool.map(one, range(count)))
        return count / (time.perf_counter() - started)


def bench_submit() -> list[str]:
    """(2): HTTP vs direct, interleaved rounds, best of each."""
    with gateway() as setup:
        app = JobsApplication(setup.store.eventsourcing_env())
        try:
            submit_direct(app, 50)  # warm up both paths
            submit_http(setup, 50)
            http_rates, direct_rates = [], []
            for round_ in range(1, SUBMIT_ROUNDS + 1):
                own = time.process_time()
                direct_rates.append(submit_direct(app, SUBMITS))
                direct_cpu = time.process_time() - own
                own, gateway_cpu = time.process_time(), cpu_seconds(setup.process.pid)
                http_rates.append(submit_http(setup, SUBMITS))
                client_cpu = time.process_time() - own
                gateway_cpu = cpu_seconds(setup.process.pid) - gateway_cpu
                per_job = [cpu / SUBMITS * 1e3 for cpu in (direct_cpu, gateway_cpu, client_cpu)]
                print(
                    f"round {round_}: direct {direct_rates[-1]:.0f} jobs/s "
                    f"({per_job[0]:.2f} ms CPU/job), HTTP {http_rates[-1]:.0f} jobs/s "
                    f"(CPU/job: gateway {per_job[1]:.2f} ms, client {per_job[2]:.2f} ms)"
                )
        finally:
            app.close()
    best_http, best_direct = max(http_rates), max(direct_rates)
    print(
        f"best: HTTP POST /jobs {best_http:.0f} jobs/s, direct {best_direct:.0f} jobs/s "
        f"({SUBMITS} jobs, {SUBMIT_CONCURRENCY} in flight; median HTTP "
        f"{statistics.median(http_rates):.0f}, direct {statistics.median(direct_rates):.0f})"
    )
    return [target("http_submit_vs_direct", best_http / best_direct, ">=", 0.5)]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the parts named on the command line: fanout, submit or all (default)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["client"]:
        url, token, count, expect, out = args[1:6]
        asyncio.run(client_main(url, token, int(count), int(expect), out))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", nargs="?", choices=["fanout", "submit", "all"], default="all")
    part = parser.parse_args(args).part
    raise_open_files()
    targets = []
    if part in ("fanout", "all"):
        targets += bench_fanout()
    if part in ("submit", "all"):
        targets += bench_submit()
    for line in targets:
        print(line)


if __name__ == "__main__":
    main()
