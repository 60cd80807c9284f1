"""Trainyard end to end, every piece a real process: the gateway (`uvicorn`), the handlers and two
train nodes (`faststream run`), and the projections, on PostgreSQL, RabbitMQ and Redis.

A client submits two jobs over HTTP and watches both over WebSockets. The train node running
the first is killed with SIGKILL mid-run, with everything it started (a machine losing power):
its lease expires, the job is queued again and completes on the other node, and the client's
stream tells the whole story in order; then every process stops cleanly and none is left.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import onnx
import psutil
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from domain.application import JobsApplication
from domain.contracts import Topology
from tests.conftest import postgres_settings
from tests.handlers.conftest import AMQP_URL, REDIS_URL, delete_topology, eventually
from tests.processes import (
    PROJECT_ROOT,
    Process,
    central_env,
    describe,
    mentioning,
    queues_exist,
    start_gateway,
    start_handlers,
    start_projections,
    start_train_node,
    subreaper,
    tree,
)
from tests.trainer.conftest import free_base_port, ppo_config

pytestmark = pytest.mark.slow

CLIENT_ID = "e2e-client"
# Long enough that a run is still going at its first summary, short enough for a test.
MAX_STEPS = 3000
SUMMARY_FREQ = 500
WAIT_S = 150.0  # an upper bound for a busy machine, not a speed requirement
PORT_BLOCKS = 2  # per train node; each runs one job at a time
# Seconds a node may stay silent before its attempts are re-queued: lease TTL + grace. Short
# so the test sees the expiry soon, yet several heartbeats long so a busy machine's delays
# do not expire a live node.
LEASE_TTL_S = 5
WATCHDOG_GRACE_S = 3
HEARTBEAT_S = 0.5


@dataclass
class Installation:
    """One throwaway Trainyard: its processes, settings, and a client's token."""

    tmp: Path
    env: dict[str, str]
    url: str
    token: str
    topology: Topology
    key_prefix: str
    node_ports: list[int]  # the first port of each train node's own range
    central: dict[str, Process] = field(default_factory=dict)  # by name
    nodes: dict[str, Process] = field(default_factory=dict)  # by node id
    node_dirs: dict[str, Path] = field(default_factory=dict)  # by node id
    killed: set[str] = field(default_factory=set)  # processes the test killed on purpose

    def http(self) -> httpx.AsyncClient:
        """The client's HTTP connection to the gateway."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30, trust_env=False)

    def start_node(self, name: str) -> str:
        """Start a train node with its own id, run and builds directories and ports."""
        node_id = f"node-{name}-{uuid.uuid4().hex[:8]}"
        directory = self.tmp / f"node-{name}"
        env = {
            **self.env,
            "TRAINYARD_NODE_ID": node_id,
            "TRAINYARD_TRAINER_SLOTS": "1",
            "TRAINYARD_RUNS_DIR": str(directory / "runs"),
            "TRAINYARD_BUILDS_DIR": str(directory / "builds"),
            "TRAINYARD_PORT_BASE": str(self.node_ports[len(self.nodes)]),
            "TRAINYARD_PORT_BLOCKS": str(PORT_BLOCKS),
            "TRAINYARD_HEARTBEAT_S": str(HEARTBEAT_S),
            "TRAINYARD_STOP_GRACE_S": "5",
            "TRAINYARD_DRAIN_TIMEOUT_S": "30",
        }
        self.nodes[node_id] = start_train_node(env, self.tmp / f"node-{name}.log")
        self.node_dirs[node_id] = directory
        return node_id

    def check_running(self) -> None:
        """Fail at once, with the logs, if a process ended that should still run."""
        ended = [n for n, p in self.processes().items() if p.returncode is not None]
        ended = [n for n in ended if n not in self.killed]
        if ended:
            pytest.fail(f"{', '.join(ended)} ended unexpectedly\n{self.logs()}")

    async def ready(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        """Poll `check` until it holds, while every process still runs."""

        async def running_and() -> bool:
            self.check_running()
            return await check()

        await eventually(running_and, what)

    def processes(self) -> dict[str, Process]:
        """Every process, by name: the train nodes first, in the order to stop them."""
        return {**self.nodes, **self.central}

    def logs(self) -> str:
        """The end of every process's log, for a failure message."""
        return "\n".join(
            f"--- {name} (exit {p.returncode}):\n{p.output()[-3000:]}"
            for name, p in self.processes().items()
        )


def ports() -> tuple[int, int, int]:
    """Two train nodes' port ranges and the gateway's port, apart from each other."""
    span = 20 * PORT_BLOCKS
    base = free_base_port() // 20 * 20
    while True:
        gateway = free_base_port()
        if not base <= gateway < base + 2 * span:
            return base, base + span, gateway


def create_token(env: dict[str, str]) -> str:
    """`python -m gateway token create CLIENT_ID`, as an operator does."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "create", CLIENT_ID],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def gateway_healthy(url: str) -> bool:
    """Whether the gateway answers and its event store, job board and Redis are up."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        try:
            response = await client.get(f"{url}/healthz")
        except httpx.TransportError:
            return False
    return response.status_code == 200


async def delete_broker_objects(topology: Topology, node_ids: list[str]) -> None:
    """The test's queues and exchanges, the nodes' control queues included."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for node_id in node_ids:
            await channel.queue_delete(topology.control_queue(node_id))
    await delete_topology(topology)


@asynccontextmanager
async def installation(pg_schema: str, tmp: Path) -> AsyncIterator[Installation]:
    """The central node's processes on a fresh schema, queue prefix and Redis key prefix.

    Train nodes are started by the test. Afterwards whatever still runs is killed and the
    test's queues and Redis keys are deleted.
    """
    tag = uuid.uuid4().hex[:12]
    store = postgres_settings(pg_schema)
    topology, key_prefix = Topology(f"test-{tag}."), f"test:{tag}:"
    env = {
        **central_env(store, topology, key_prefix, AMQP_URL, REDIS_URL),
        "TRAINYARD_MODEL_STORE": "local",
        "TRAINYARD_MODEL_DIR": str(tmp / "models"),
        "TRAINYARD_LEASE_TTL_S": str(LEASE_TTL_S),
        "TRAINYARD_WATCHDOG_INTERVAL_S": "0.5",
        "TRAINYARD_WATCHDOG_GRACE_S": str(WATCHDOG_GRACE_S),
        "TRAINYARD_PROJECTION_POLL_INTERVAL": "0.2",
    }
    # The event store's tables exist before the processes that share them start.
    JobsApplication(store.eventsourcing_env()).close()
    token = create_token(env)
    node_a_ports, node_b_ports, gateway_port = ports()
    system = Installation(
        tmp=tmp,
        env=env,
        url=f"http://127.0.0.1:{gateway_port}",
        token=token,
        topology=topology,
        key_prefix=key_prefix,
        node_ports=[node_a_ports, node_b_ports],
    )
    # In the order they are stopped: the gateway first, the projections last.
    system.central["gateway"] = start_gateway(env, gateway_port, tmp / "gateway.log")
    system.central["handlers"] = start_handlers(env, tmp / "handlers.log")
    system.central["projections"] = start_projections(env, tmp / "projections.log")
    try:
        await system.ready(partial(queues_exist, AMQP_URL, topology), "the handlers' queues")
        await system.ready(partial(gateway_healthy, system.url), "a healthy gateway")
        yield system
    finally:
        for process in system.processes().values():
            process.kill_tree()
        redis = Redis.from_url(REDIS_URL)
        keys = [k async for k in redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await delete_broker_objects(topology, list(system.nodes))


# --- the client's view ----------------------------------------------------------


def position(stream_id: str) -> int:
    """The log position of an update id `<position>-0`."""
    number, _, sequence = stream_id.partition("-")
    assert sequence == "0", stream_id
    return int(number)


@dataclass
class Watch:
    """What one client received on one job's stream, over one or more connections."""

    system: Installation
    job_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # JSON frames, in order
    model: bytes | None = None
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    resumed_at: int | None = None  # index in `messages` of a resumed connection's first frame
    ws: ClientConnection | None = None

    @property
    def last_id(self) -> str:
        """The id of the last update (or snapshot) received."""
        return str(next(m["id"] for m in reversed(self.messages) if "id" in m))

    async def connect(self, after: str | None = None) -> None:
        """Open the stream; with `after`, resume after that id."""
        url = f"ws{self.system.url.removeprefix('http')}/jobs/{self.job_id}/stream"
        if after is not None:
            url += f"?after={after}"
            self.resumed_at = len(self.messages)
        self.ws = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {self.system.token}"},
            proxy=None,
            open_timeout=WAIT_S,
            max_size=64 * 1024 * 1024,
        )

    async def receive(self) -> dict[str, Any] | None:
        """The next JSON frame (a binary frame is kept as the model); None once closed."""
        assert self.ws is not None
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            self.system.check_running()
            try:
                # Waiting in slices notices a crashed process early; recv() may be cancelled
                # without losing a frame.
                async with asyncio.timeout(1.0):
                    frame = await self.ws.recv()
                break
            except TimeoutError:
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail(f"nothing on the stream of {self.job_id} for {WAIT_S:g} s")
            except ConnectionClosed:
                self.closes.append((self.ws.close_code, self.ws.close_reason))
                self.ws = None
                return None
        if isinstance(frame, bytes):
            assert self.model is None, "a second binary frame"
            self.model = frame
            return {"type": "binary", "size": len(frame)}
        message: dict[str, Any] = json.loads(frame)
        self.messages.append(message)
        return message

    async def until(self, check: Callable[[dict[str, Any]], bool], what: str) -> None:
        """Receive until a frame satisfies `check`."""
        while (message := await self.receive()) is not None:
            if check(message):
                return
        pytest.fail(f"the stream of {self.job_id} closed before {what}: {self.closes}")

    async def to_end(self) -> None:
        """Receive everything until the server closes the connection."""
        while await self.receive() is not None:
            pass

    async def leave(self) -> None:
        """Close the connection from the client's side."""
        assert self.ws is not None
        await self.ws.close()
        self.ws = None

    def updates(self) -> list[dict[str, Any]]:
        """The update frames, in the order received."""
        return [m for m in self.messages if m["type"] == "update"]

    def story(self) -> list[tuple[str, int, str | None]]:
        """(type, attempt, node) of each update, consecutive progress reports as one."""
        steps = [
            (u["update"]["type"], u["update"]["attempt"], u["update"]["node_id"])
            for u in self.updates()
        ]
        return [key for key, _ in groupby(steps)]


def is_progress(attempt: int) -> Callable[[dict[str, Any]], bool]:
    """Whether a frame is a progress update of `attempt`."""

    def check(message: dict[str, Any]) -> bool:
        update = message.get("update") or {}
        return update.get("type") == "progress" and update.get("attempt") == attempt

    return check


async def projected(http: httpx.AsyncClient, job_id: str) -> bool:
    """Whether the job board shows the job."""
    return bool((await job(http, job_id)).get("projected"))


async def requeued(http: httpx.AsyncClient, job_id: str) -> bool:
    """Whether the job's second attempt has begun (queued, or already further)."""
    return int((await job(http, job_id))["attempt"]) >= 2


async def submit(http: httpx.AsyncClient, seed: int) -> str:
    """POST /jobs: a Reach job on the stand-in build; returns its id."""
    spec = {
        "config": ppo_config("Reach", MAX_STEPS, summary_freq=SUMMARY_FREQ),
        "env": {"builtin": "reach"},
        "seed": seed,
        "max_steps": MAX_STEPS,
    }
    response = await http.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def job(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """GET /jobs/{id}."""
    response = await http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def history(http: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    """GET /jobs/{id}/events, every page."""
    events: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        response = await http.get(f"/jobs/{job_id}/events", params={"after": after})
        assert response.status_code == 200, response.text
        page = response.json()
        events += page["events"]
        after = page["next_after"]
    return events


def check_stream(watch: Watch, events: list[dict[str, Any]], model: httpx.Response) -> None:
    """The stream is the job's history after its snapshot, without a gap or a duplicate,
    and ends with the model (as GET /jobs/{id}/model serves it) and `end`."""
    snapshot, *rest = watch.messages
    assert snapshot["type"] == "snapshot", snapshot
    assert (snapshot["job"]["status"], snapshot["job"]["attempt"]) == ("queued", 1), snapshot
    ids = [position(m["id"]) for m in watch.messages if "id" in m]
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"
    # Every event after the snapshot, except the metrics stream's opening (which changes
    # nothing visible), reached the client; the snapshot covers those before it.
    visible = [e for e in events if e["type"] != "JobMetrics.Opened"]
    assert [e["type"] for e in visible if e["position"] <= ids[0]] == [
        "Job.Submitted",
        "Job.Queued",
    ]
    assert ids[1:] == [e["position"] for e in visible if e["position"] > ids[0]]

    *updates, header, end = rest
    assert [u["type"] for u in updates] == ["update"] * len(updates)
    completed = updates[-1]["update"]
    assert completed["type"] == "completed"
    assert header == {"type": "model", "sha256": completed["model_sha256"], "size": header["size"]}
    assert watch.model is not None, "no binary frame with the model"
    assert (len(watch.model), hashlib.sha256(watch.model).hexdigest()) == (
        header["size"],
        header["sha256"],
    )
    assert end == {"type": "end", "status": "completed"}
    assert watch.closes[-1] == (1000, "")
    assert model.status_code == 200
    assert model.headers["X-Model-SHA256"] == header["sha256"]
    assert model.content == watch.model
    onnx.checker.check_model(onnx.load_from_string(watch.model))


def check_progress(watch: Watch) -> None:
    """Each attempt's progress reports arrive in order, steps never going back."""
    for attempt in {u["update"]["attempt"] for u in watch.updates()}:
        reports = [
            u["update"]
            for u in watch.updates()
            if u["update"]["type"] == "progress" and u["update"]["attempt"] == attempt
        ]
        seqs = [r["seq"] for r in reports]
        steps = [r["step"] for r in reports]
        assert seqs == sorted(set(seqs)), seqs
        assert steps == sorted(steps), steps
        assert all(r["stats"] for r in reports)


# --- the test -------------------------------------------------------------------


def kill_node(system: Installation, node_id: str) -> list[psutil.Process]:
    """SIGKILL the node and everything it started; return what was killed."""
    process, directory = system.nodes[node_id], system.node_dirs[node_id].resolve()
    system.killed.add(node_id)
    running = [" ".join(p.cmdline()) for p in tree(process.pid)]
    # What a power loss takes down: the daemon, its trainer and the Unity build it launched.
    assert any("trainer.launcher" in c for c in running), running
    assert any(f"{directory}/builds/builtin/reach" in c for c in running), running
    killed = process.kill_tree()
    assert process.returncode == -signal.SIGKILL
    survivors = [p for p in killed if p.is_running()]
    assert not survivors, describe(survivors)
    return killed


def running_in(directory: Path) -> list[str]:
    """Processes with the directory in their command line: run directories, builds, models."""
    return describe(mentioning(f"{directory.resolve()}/"))


async def test_a_job_of_a_killed_train_node_completes_on_the_other_and_the_stream_tells_it(
    pg_schema: str, tmp_path: Path
) -> None:
    with subreaper() as strays:
        async with installation(pg_schema, tmp_path) as system:
            try:
                await scenario(system)
            except BaseException:
                print(system.logs())  # shown with the failure
                raise
        # Nothing of this test runs any more: no process that mentions its directories (run
        # directories, builds, the model store), and no descendant of this process.
        assert not running_in(tmp_path), running_in(tmp_path)
        leftovers = strays.settle()
        assert not leftovers, describe(leftovers)


async def scenario(system: Installation) -> None:
    """Two jobs, a node killed mid-run, the story as the client sees it, a clean stop."""
    async with system.http() as http:
        victim_id = await submit(http, seed=1)
        other_id = await submit(http, seed=2)
        for job_id in (victim_id, other_id):
            await system.ready(partial(projected, http, job_id), "the job on the board")

        # The client watches both from the start: the nodes only start once it is connected.
        victim, other = Watch(system, victim_id), Watch(system, other_id)
        await victim.connect()
        await other.connect()
        watching_other = asyncio.create_task(other.to_end())
        try:
            node_ids = [system.start_node("a"), system.start_node("b")]
            await victim.until(is_progress(1), "the first progress report")
            lost = victim.updates()[0]["update"]["node_id"]
            assert lost in node_ids, victim.story()
            (survivor,) = (n for n in node_ids if n != lost)
            killed = kill_node(system, lost)

            # The client goes away too, and comes back once the job has been queued again.
            await victim.leave()
            left_at = victim.last_id
            await system.ready(partial(requeued, http, victim_id), "attempt 2 to be queued")
            await victim.connect(after=left_at)
            await victim.to_end()
            await watching_other
        finally:
            watching_other.cancel()

        assert victim.story() == [
            ("claimed", 1, lost),
            ("started", 1, lost),
            ("progress", 1, lost),
            ("lease_expired", 1, lost),
            ("queued", 2, None),
            ("claimed", 2, survivor),
            ("started", 2, survivor),
            ("progress", 2, survivor),
            ("completed", 2, survivor),
        ]
        assert other.story() == [
            ("claimed", 1, survivor),
            ("started", 1, survivor),
            ("progress", 1, survivor),
            ("completed", 1, survivor),
        ]
        # The resumed connection began with what happened while the client was away.
        assert victim.resumed_at is not None
        resumed = victim.messages[victim.resumed_at]
        assert resumed["type"] == "update", resumed
        assert position(resumed["id"]) > position(left_at)
        assert resumed["update"]["type"] in ("progress", "lease_expired"), resumed
        for watch, attempt in ((victim, 2), (other, 1)):
            model = await http.get(f"/jobs/{watch.job_id}/model")
            check_stream(watch, await history(http, watch.job_id), model)
            check_progress(watch)
            final = await job(http, watch.job_id)
            assert (final["status"], final["attempt"], final["node_id"]) == (
                "completed",
                attempt,
                survivor,
            )
            assert final["model_sha256"] == model.headers["X-Model-SHA256"]

    assert not [p for p in killed if p.is_running()]
    # Everything else stops cleanly on SIGTERM: the idle train node, the gateway, the
    # handlers, the projections.
    exits = {name: p.stop() for name, p in system.processes().items() if name != lost}
    # uvicorn ends its graceful shutdown by raising the signal it caught again.
    expected = {**dict.fromkeys(exits, 0), "gateway": -signal.SIGTERM}
    assert exits == expected, system.logs()
    assert "Application shutdown complete." in system.central["gateway"].output()
