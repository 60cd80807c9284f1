"""The WebSocket `/jobs/{id}/stream` on a real uvicorn, real Redis and the real projections.

Updates reach Redis the way `python -m projections` publishes them: the projections' own
BatchRunner with its StreamPublisher, over jobs driven through the Jobs application.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from domain.application import ProgressReport
from projections.publisher import StreamPublisher, global_stream, job_stream
from projections.runner import BatchRunner
from tests.conftest import postgres_settings
from tests.gateway.conftest import REDIS_URL, Gateway, start
from tests.gateway.test_jobs import complete, submit
from trainer.modelstore import model_key

Message = str | bytes
RECEIVE_TIMEOUT_S = 30.0  # a bound for a busy machine, not a speed requirement


class Streams:
    """The gateway, and the Redis streams its updates are published to."""

    def __init__(self, gateway: Gateway, prefix: str) -> None:
        self.gateway = gateway
        self.prefix = prefix
        self.redis = redis.Redis.from_url(REDIS_URL, decode_responses=True)

    def publish(self) -> None:
        """Project the log and publish the updates, as `python -m projections` does."""
        publisher = StreamPublisher(self.redis, prefix=self.prefix)
        BatchRunner(self.gateway.jobs, self.gateway.view, publisher=publisher).catch_up()

    def job_key(self, job_id: str) -> str:
        return job_stream(self.prefix, job_id)

    async def submitted(self, client_id: str) -> tuple[str, str]:
        """A new token of `client_id`, and a job it submitted, projected and published."""
        token = self.gateway.tokens.create(client_id)
        with self.gateway.client(token=token) as http:
            job_id = submit(http)
        await asyncio.to_thread(self.publish)
        return token, job_id

    def ws_url(self, job_id: str, **query: str) -> str:
        base = self.gateway.url.replace("http://", "ws://", 1)
        params = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{base}/jobs/{job_id}/stream" + (f"?{params}" if params else "")

    @asynccontextmanager
    async def connect(
        self, job_id: str, token: str | None, **kwargs: Any
    ) -> AsyncIterator[ClientConnection]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        query = kwargs.pop("query", {})
        async with connect(
            self.ws_url(job_id, **query), additional_headers=headers, max_size=None, **kwargs
        ) as ws:
            yield ws


@pytest.fixture
def streams(pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Streams]:
    """A gateway with its own Redis key prefix, small WebSocket limits for the tests."""
    prefix = f"test-ws-{uuid.uuid4().hex[:12]}:"
    monkeypatch.setenv("TRAINYARD_REDIS_KEY_PREFIX", prefix)
    monkeypatch.setenv("TRAINYARD_WS_QUEUE_SIZE", "64")
    monkeypatch.setenv("TRAINYARD_WS_AUTH_TIMEOUT_S", "1")
    monkeypatch.setenv("TRAINYARD_WS_CLOSE_TIMEOUT_S", "120")
    with start(postgres_settings(pg_schema), tmp_path) as gateway:
        found = Streams(gateway, prefix)
        try:
            yield found
        finally:
            keys = list(found.redis.scan_iter(f"{prefix}*"))
            if keys:
                found.redis.delete(*keys)
            found.redis.close()


async def receive(ws: ClientConnection) -> Message:
    return await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_S)


async def receive_json(ws: ClientConnection) -> dict[str, Any]:
    message = await receive(ws)
    assert isinstance(message, str), "expected a text frame"
    data: dict[str, Any] = json.loads(message)
    return data


async def until_closed(ws: ClientConnection) -> tuple[list[Message], int, str]:
    """Every message left, and the close code and reason the server sent."""
    messages: list[Message] = []
    while True:
        try:
            messages.append(await receive(ws))
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            break
    assert rcvd is not None, "the server sent no close frame"
    return messages, rcvd.code, rcvd.reason


async def updates(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    found = [await receive_json(ws) for _ in range(count)]
    assert {m["type"] for m in found} == {"update"}, found
    return found


def run_job(gateway: Gateway, job_id: str, reports: range) -> None:
    """Claim and start the job, and report progress with these seqs."""
    uuid_ = UUID(job_id)
    assert gateway.jobs.claim(uuid_, 1, "node-1").granted
    gateway.jobs.report_started(uuid_, 1, 1, {"mlagents": "1.1.0"}, node_id="node-1")
    report(gateway, job_id, reports)


def report(gateway: Gateway, job_id: str, seqs: range) -> None:
    gateway.jobs.report_progress_batch(
        UUID(job_id), [ProgressReport(1, s, s * 100, {"reward": s / 10}) for s in seqs]
    )


def ids(messages: list[dict[str, Any]]) -> list[int]:
    return [int(m["id"].split("-")[0]) for m in messages]


async def test_a_snapshot_then_every_update_in_order_then_the_model(
    streams: Streams, tmp_path: Path
) -> None:
    gateway = streams.gateway
    token = gateway.tokens.create("client-a")
    model = bytes(range(256)) * 5000  # over one chunk of the model store
    with gateway.client(token=token) as http:
        job_id = submit(http)
        await asyncio.to_thread(streams.publish)
        async with streams.connect(job_id, token) as ws:
            snapshot = await receive_json(ws)
            assert snapshot["type"] == "snapshot"
            assert snapshot["job"] == http.get(f"/jobs/{job_id}").json()
            assert snapshot["id"] == f"{snapshot['job']['position']}-0"
            assert snapshot["job"]["status"] == "queued"

            await asyncio.to_thread(run_job, gateway, job_id, range(2, 7))
            await asyncio.to_thread(streams.publish)
            live = await updates(ws, 7)
            assert [m["update"]["type"] for m in live] == ["claimed", "started"] + ["progress"] * 5
            positions = ids(live)
            assert positions == sorted(set(positions))
            assert positions[0] > int(snapshot["id"].split("-")[0])
            assert [m["update"]["position"] for m in live] == positions
            progress = live[2]["update"]
            assert progress["seq"] == 2
            assert progress["step"] == 200
            assert progress["stats"] == {"reward": 0.2}
            assert progress["status"] == "running"
            assert progress["node_id"] == "node-1"
            assert progress["cancel_requested"] is False

            sha256 = await asyncio.to_thread(complete_only, gateway, job_id, tmp_path, model)
            await asyncio.to_thread(streams.publish)
            done = await receive_json(ws)
            assert done["update"]["type"] == "completed"
            assert done["update"]["model_sha256"] == sha256
            header = await receive_json(ws)
            assert header == {"type": "model", "sha256": sha256, "size": len(model)}
            pushed = await receive(ws)
            end, code, _ = await until_closed(ws)
        downloaded = http.get(f"/jobs/{job_id}/model").content
    assert isinstance(pushed, bytes)
    assert pushed == downloaded == model
    assert hashlib.sha256(pushed).hexdigest() == sha256
    assert [json.loads(m) for m in end] == [{"type": "end", "status": "completed"}]
    assert code == 1000


def complete_only(gateway: Gateway, job_id: str, tmp_path: Path, model: bytes) -> str:
    """Complete a started job with a stored model (what a train node does at the end)."""
    uuid_ = UUID(job_id)
    key = model_key(uuid_, 1, "Reach.onnx")
    source = tmp_path / "Reach.onnx"
    source.write_bytes(model)
    stored = gateway.models.put_file(key, source)
    gateway.jobs.report_completed(uuid_, 1, 7, key, stored.sha256, node_id="node-1")
    return stored.sha256


async def test_a_client_that_reconnects_gets_exactly_what_it_missed(streams: Streams) -> None:
    gateway = streams.gateway
    token = gateway.tokens.create("client-a")
    with gateway.client(token=token) as http:
        job_id = submit(http)
    await asyncio.to_thread(run_job, gateway, job_id, range(2, 5))
    await asyncio.to_thread(streams.publish)
    async with streams.connect(job_id, token, query={"after": "0-0"}) as ws:
        # From the start: submitted, queued, claimed, started, three reports; no snapshot.
        seen = await updates(ws, 7)
    assert [m["update"]["type"] for m in seen[:4]] == ["submitted", "queued", "claimed", "started"]
    last = seen[4]["id"]  # the client saw only up to the first report before it dropped

    await asyncio.to_thread(report, gateway, job_id, range(5, 9))
    await asyncio.to_thread(streams.publish)
    async with streams.connect(job_id, token, query={"after": "0-0"}) as ws:
        everything = await updates(ws, 11)
    missed = [m for m in everything if ids([m])[0] > ids([seen[4]])[0]]
    assert [m["update"]["seq"] for m in missed] == [3, 4, 5, 6, 7, 8]

    async with streams.connect(job_id, token, query={"after": last}) as ws:
        assert await updates(ws, len(missed)) == missed
        await asyncio.to_thread(report, gateway, job_id, range(9, 10))
        await asyncio.to_thread(streams.publish)
        (live,) = await updates(ws, 1)
        assert live["update"]["seq"] == 9

    # The job's stream trimmed past `last`: the same updates, rebuilt from the event log,
    # and live ones after them.
    streams.redis.xtrim(streams.job_key(job_id), maxlen=0, approximate=False)
    assert streams.redis.xlen(streams.job_key(job_id)) == 0
    async with streams.connect(job_id, token, query={"after": last}) as ws:
        assert await updates(ws, len(missed) + 1) == [*missed, live]
        await asyncio.to_thread(report, gateway, job_id, range(10, 12))
        await asyncio.to_thread(streams.publish)
        assert [m["update"]["seq"] for m in await updates(ws, 2)] == [10, 11]
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive_json(ws) == {"type": "pong"}

    # The stream holds only what was published after it was emptied (its oldest entry is
    # above `last`); and the stream gone entirely.
    key = streams.job_key(job_id)
    assert streams.redis.xlen(key) == 2
    async with streams.connect(job_id, token, query={"after": last}) as ws:
        again = await updates(ws, len(missed) + 3)
    assert [m["update"]["seq"] for m in again] == list(range(3, 12))
    streams.redis.delete(key)
    async with streams.connect(job_id, token, query={"after": missed[-1]["id"]}) as ws:
        assert [m["update"]["seq"] for m in await updates(ws, 3)] == [9, 10, 11]


async def test_a_finished_job_sends_its_snapshot_and_end(streams: Streams, tmp_path: Path) -> None:
    gateway = streams.gateway
    token = gateway.tokens.create("client-a")
    with gateway.client(token=token) as http:
        completed = submit(http)
        await asyncio.to_thread(complete, gateway, completed, tmp_path, b"onnx" * 100)
        cancelled = submit(http)
        assert http.post(f"/jobs/{cancelled}/cancel").status_code == 202
        await asyncio.to_thread(streams.publish)
        async with streams.connect(completed, token, query={"model": "0"}) as ws:
            messages, code, _ = await until_closed(ws)
        snapshot, end = (json.loads(m) for m in messages)
        assert snapshot["type"] == "snapshot"
        assert snapshot["job"]["status"] == "completed"
        assert end == {"type": "end", "status": "completed"}
        assert code == 1000
        # Reconnecting after the last update: no updates, the model (it may have been
        # missed), then the end.
        async with streams.connect(completed, token, query={"after": snapshot["id"]}) as ws:
            messages, code, _ = await until_closed(ws)
        assert [type(m) for m in messages] == [str, bytes, str]
        assert messages[1] == b"onnx" * 100
        assert json.loads(messages[2]) == {"type": "end", "status": "completed"}
        async with streams.connect(cancelled, token) as ws:
            messages, code, _ = await until_closed(ws)
        snapshot, end = (json.loads(m) for m in messages)
        assert snapshot["job"]["status"] == "cancelled"
        assert end == {"type": "end", "status": "cancelled"}
        assert code == 1000


async def test_another_clients_job_is_not_found(streams: Streams) -> None:
    gateway = streams.gateway
    alice = gateway.tokens.create("client-a")
    bob = gateway.tokens.create("client-b")
    with gateway.client(token=alice) as http:
        job_id = submit(http)
    await asyncio.to_thread(streams.publish)
    closes = []
    for target in [job_id, str(uuid.uuid4()), "not-a-job"]:
        async with streams.connect(target, bob) as ws:
            messages, code, reason = await until_closed(ws)
        closes.append((messages, code, reason))
    assert closes == [([], 1008, "job not found")] * 3


async def test_without_a_valid_token_the_stream_is_closed(streams: Streams) -> None:
    gateway = streams.gateway
    _token, job_id = await streams.submitted("client-a")
    revoked = gateway.tokens.create("client-a")
    gateway.tokens.revoke(revoked)
    for bad in [revoked, "ty_000000000000.nope", "garbage"]:
        async with streams.connect(job_id, bad) as ws:
            messages, code, reason = await until_closed(ws)
        assert (messages, code) == ([], 1008)
        assert "token" in reason
        async with streams.connect(job_id, None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": bad}))
            messages, code, reason = await until_closed(ws)
        assert (messages, code) == ([], 1008)
        assert "token" in reason
    async with streams.connect(job_id, None) as ws:  # no header, no auth frame
        messages, code, reason = await until_closed(ws)
    assert (messages, code, reason) == ([], 1008, "no auth frame within 1 s")
    async with streams.connect(job_id, None) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        messages, code, reason = await until_closed(ws)
    assert (messages, code) == ([], 1008)
    assert '"auth"' in reason


async def test_bad_query_parameters_are_refused_naming_them(streams: Streams) -> None:
    gateway = streams.gateway
    token = gateway.tokens.create("client-a")
    with gateway.client(token=token) as http:
        job_id = submit(http)
    for query, expected in [
        ({"after": "yesterday"}, "after: 'yesterday' is not an update id"),
        ({"after": "\U0001d11e" * 100}, "after: "),  # a reason is cut to 123 bytes
        ({"model": "no"}, "model: must be 0 or 1"),
    ]:
        async with streams.connect(job_id, token, query=query) as ws:
            messages, code, reason = await until_closed(ws)
        assert (messages, code) == ([], 1008)
        assert reason.startswith(expected)


async def test_the_first_frame_may_carry_the_token(streams: Streams) -> None:
    token, job_id = await streams.submitted("client-a")
    async with streams.connect(job_id, None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        snapshot = await receive_json(ws)
        assert (snapshot["type"], snapshot["job"]["job_id"]) == ("snapshot", job_id)
        assert http_status(streams, token, job_id) == snapshot["job"]["status"]
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive_json(ws) == {"type": "pong"}


def http_status(streams: Streams, token: str, job_id: str) -> str:
    with streams.gateway.client(token=token) as http:
        status: str = http.get(f"/jobs/{job_id}").json()["status"]
    return status


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        (b"\x00\x01", 1003, "binary frames are not supported"),
        ("hello", 1003, "frames must be JSON text"),
        ('{"type": "subscribe"}', 1008, "unknown message type 'subscribe'"),
        ("[1, 2]", 1008, 'frames must be JSON objects with a "type"'),
    ],
)
async def test_a_bad_frame_closes_the_stream(
    streams: Streams, frame: str | bytes, code: int, reason: str
) -> None:
    gateway = streams.gateway
    token, job_id = await streams.submitted("client-a")
    async with streams.connect(job_id, token) as ws:
        assert (await receive_json(ws))["type"] == "snapshot"
        await ws.send(frame)
        assert await until_closed(ws) == ([], code, reason)
    with gateway.client(token=token) as http:  # the gateway is fine
        assert http.get(f"/jobs/{job_id}").status_code == 200


def add_big_updates(streams: Streams, job_id: str, first: int, count: int) -> list[int]:
    """Append progress updates of ~32 KB each, as the projections would publish them."""
    pipe = streams.redis.pipeline(transaction=False)
    positions = list(range(first, first + count))
    for position in positions:
        fields = {
            "position": str(position),
            "job_id": job_id,
            "type": "progress",
            "status": "running",
            "attempt": "1",
            "node_id": "node-1",
            "cancel_requested": "0",
            "timestamp": "2026-01-01T00:00:00+00:00",
            "seq": str(position),
            "step": str(position * 100),
            # Random, so that compression cannot make it small.
            "stats": json.dumps({"noise": os.urandom(16 * 1024).hex()}),
        }
        for key in (streams.job_key(job_id), global_stream(streams.prefix)):
            pipe.xadd(key, fields, id=f"{position}-0")  # type: ignore[arg-type]
    pipe.execute()
    return positions


async def test_a_slow_client_is_closed_while_the_others_keep_receiving(streams: Streams) -> None:
    gateway = streams.gateway
    token, job_id = await streams.submitted("client-a")
    # A client that reads nothing: its socket takes little before the server must wait.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
    async with (
        streams.connect(job_id, token, sock=sock, max_queue=1) as slow,
        streams.connect(job_id, token) as fast,
    ):
        snapshot = await receive_json(slow)
        assert (await receive_json(fast))["id"] == snapshot["id"]
        # Published at the pace the other client reads, well past what the slow one's
        # socket and queue hold.
        first = int(snapshot["id"].split("-")[0]) + 1
        positions: list[int] = []
        for start in range(first, first + 600, 20):
            added = await asyncio.to_thread(add_big_updates, streams, job_id, start, 20)
            assert ids(await updates(fast, len(added))) == added
            positions += added
        messages, code, reason = await until_closed(slow)
        assert (code, reason) == (1013, "client too slow")
        got = ids([json.loads(m) for m in messages])
        assert got == positions[: len(got)]  # in order, with no gap, up to where it fell behind
        assert len(got) < len(positions)
        # The other client is still served.
        await fast.send(json.dumps({"type": "ping"}))
        assert await receive_json(fast) == {"type": "pong"}


async def test_a_stream_written_again_from_a_new_log_closes_open_clients(streams: Streams) -> None:
    # The projections drop streams written from another event store (a local data directory
    # deleted and started afresh) and write the new log's updates from id 1: the shared
    # reader, which read past that, must start over, and open clients must resume.
    token, job_id = await streams.submitted("client-a")
    async with streams.connect(job_id, token) as ws:
        snapshot = await receive_json(ws)
        tip = int(snapshot["id"].split("-")[0])
        await asyncio.to_thread(add_big_updates, streams, job_id, tip + 1, 3)
        assert ids(await updates(ws, 3)) == [tip + 1, tip + 2, tip + 3]
        streams.redis.delete(global_stream(streams.prefix), streams.job_key(job_id))
        await asyncio.to_thread(add_big_updates, streams, job_id, 1, 1)
        _messages, code, reason = await until_closed(ws)
        assert (code, reason) == (1013, "update stream reset")
    # A new connection is served from the stream as it is now.
    async with streams.connect(job_id, token, query={"after": "0-0"}) as ws:
        assert ids(await updates(ws, 1)) == [1]


async def test_updates_trimmed_before_the_reader_got_them_close_clients_which_then_get_them(
    streams: Streams,
) -> None:
    # The gateway's reader could not reach Redis (or fell far behind) while the global stream
    # was trimmed past it: its clients would silently miss those updates.
    token, job_id = await streams.submitted("client-a")
    async with streams.connect(job_id, token) as ws:
        snapshot = await receive_json(ws)
        tip = int(snapshot["id"].split("-")[0])
        # Added and trimmed away in one transaction: the reader never sees them.
        with streams.redis.pipeline(transaction=True) as pipe:
            for position in range(tip + 1, tip + 4):
                fields = {"position": str(position), "job_id": job_id, "type": "progress"}
                fields |= {"status": "running", "attempt": "1", "node_id": "node-1"}
                fields |= {"cancel_requested": "0", "timestamp": "2026-01-01T00:00:00+00:00"}
                fields |= {"seq": str(position), "step": "1", "stats": "{}"}
                for key in (streams.job_key(job_id), global_stream(streams.prefix)):
                    pipe.xadd(key, fields, id=f"{position}-0")  # type: ignore[arg-type]
            pipe.xtrim(global_stream(streams.prefix), maxlen=0)
            pipe.execute()
        _messages, code, reason = await until_closed(ws)
        assert (code, reason) == (1013, "updates missed")
    # Resuming from the last update it had, the client gets exactly what it missed.
    async with streams.connect(job_id, token, query={"after": f"{tip}-0"}) as ws:
        assert ids(await updates(ws, 3)) == [tip + 1, tip + 2, tip + 3]
