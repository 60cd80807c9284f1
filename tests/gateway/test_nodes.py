"""GET /nodes: live train nodes from the presence keys the handlers write into the real Redis."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from redis.asyncio import Redis

from domain.contracts import AttemptRef, Heartbeat
from domain.settings import StoreSettings
from gateway.settings import GatewaySettings
from handlers.presence import Presence
from tests.conftest import postgres_settings
from tests.gateway.conftest import REDIS_URL, SPEC, Gateway, start

NODE_TTL_S = GatewaySettings().node_ttl_s


def unique_prefix() -> str:
    # '?' and '[' are glob characters: the gateway must match them literally in SCAN.
    return f"test-nodes-{uuid4().hex[:12]}-?[x]:"


@pytest.fixture
def prefix(monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's Redis key prefix, set for the gateway through its environment."""
    value = unique_prefix()
    monkeypatch.setenv("TRAINYARD_REDIS_KEY_PREFIX", value)
    return value


@pytest.fixture
def gateway(prefix: str, pg_schema: str, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on a fresh PostgreSQL schema, with this test's Redis key prefix."""
    with start(postgres_settings(pg_schema), tmp_path) as gateway:
        yield gateway


@pytest.fixture
def any_gateway(prefix: str, store_settings: StoreSettings, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on SQLite, and on PostgreSQL, with this test's Redis key prefix."""
    with start(store_settings, tmp_path) as gateway:
        yield gateway


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def presence(redis: Redis, prefix: str) -> AsyncIterator[Presence]:
    """The handlers' own presence writer, on this test's prefix; its keys are removed after."""
    yield presence_for(redis, prefix)
    await delete_prefix(redis, prefix)


def presence_for(redis: Redis, prefix: str, ttl_s: int | None = None) -> Presence:
    return Presence(redis, key_prefix=prefix, node_ttl_s=ttl_s or NODE_TTL_S, lease_ttl_s=60)


async def delete_prefix(redis: Redis, prefix: str) -> None:
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
    if keys:
        await redis.delete(*keys)


def beat(
    node_id: str, slots: int = 2, running: Sequence[tuple[str, int]] = (), **kw: Any
) -> Heartbeat:
    refs = [AttemptRef(job_id=UUID(job_id), attempt=attempt) for job_id, attempt in running]
    return Heartbeat(node_id=node_id, slots=slots, free_slots=slots - len(refs), running=refs, **kw)


def nodes(http: httpx.Client) -> list[dict[str, Any]]:
    response = http.get("/nodes")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["nodes"]
    return found


def submit(http: httpx.Client) -> str:
    response = http.post("/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def test_live_nodes_are_listed_by_id_with_their_slots(
    gateway: Gateway, presence: Presence
) -> None:
    before = datetime.now(UTC)
    await presence.record(beat("node-b", slots=4))
    await presence.record(beat("node-a", slots=1, draining=True))
    await presence.record(beat("node-a", slots=1, draining=True))  # a later beat replaces it
    with gateway.client("client-a") as http:
        listed = nodes(http)
    after = datetime.now(UTC)
    assert [n["node_id"] for n in listed] == ["node-a", "node-b"]
    a, b = listed
    assert (a["slots"], a["free_slots"], a["draining"]) == (1, 1, True)
    assert (b["slots"], b["free_slots"], b["draining"]) == (4, 4, False)
    assert (b["running_jobs"], b["jobs"]) == (0, [])
    for node in listed:
        last_seen = datetime.fromisoformat(node["last_seen"])
        expires_at = datetime.fromisoformat(node["expires_at"])
        # Milliseconds of rounding either way; the heartbeat was recorded within the test.
        assert before - timedelta(seconds=0.01) <= last_seen <= after + timedelta(seconds=0.01)
        assert expires_at - last_seen == timedelta(seconds=NODE_TTL_S)
        assert expires_at > after


async def test_no_nodes_is_an_empty_list(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        assert nodes(http) == []


async def test_a_client_sees_the_ids_of_its_own_jobs_only(
    any_gateway: Gateway, presence: Presence
) -> None:
    gateway = any_gateway
    with gateway.client("client-a") as alice, gateway.client("client-b") as bob:
        alices = submit(alice)
        bobs = submit(bob)
        for job_id in (alices, bobs):
            assert gateway.jobs.claim(UUID(job_id), 1, "node-1").granted
        nobodys = str(uuid4())  # a job id no store knows
        await presence.record(
            beat("node-1", slots=3, running=[(alices, 1), (bobs, 1), (nobodys, 2)])
        )

        def check() -> None:
            (seen_by_alice,) = nodes(alice)
            (seen_by_bob,) = nodes(bob)
            assert seen_by_alice["running_jobs"] == seen_by_bob["running_jobs"] == 3
            assert seen_by_alice["free_slots"] == 0
            assert seen_by_alice["jobs"] == [{"job_id": alices, "attempt": 1}]
            assert seen_by_bob["jobs"] == [{"job_id": bobs, "attempt": 1}]
            assert bobs not in alice.get("/nodes").text
            assert alices not in bob.get("/nodes").text
            assert nobodys not in alice.get("/nodes").text

        # Not on the job board yet: ownership comes from the event store.
        check()
        gateway.project()  # now from the job board
        check()
        # Without the job board (the projections never ran) the event store answers alone.
        gateway.db.execute("DROP TABLE {schema}.jobs")
        check()


async def test_a_malformed_presence_value_is_skipped_and_logged(
    gateway: Gateway,
    presence: Presence,
    redis: Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await presence.record(beat("node-good"))
    await redis.set(f"{prefix}node:node-garbage", b"\xff not json", ex=60)
    await redis.set(
        f"{prefix}node:node-negative", '{"node_id": "node-negative", "slots": -1}', ex=60
    )
    # A heartbeat under another node's key is not that node.
    await redis.set(f"{prefix}node:node-other", beat("node-good").model_dump_json(), ex=60)
    with caplog.at_level(logging.WARNING, logger="gateway.nodes"), gateway.client("c") as http:
        listed = nodes(http)
    assert [n["node_id"] for n in listed] == ["node-good"]
    for key in ["node-garbage", "node-negative", "node-other"]:
        assert f"{prefix}node:{key}" in caplog.text


async def test_only_this_installations_nodes_are_listed(
    gateway: Gateway, presence: Presence, redis: Redis, prefix: str
) -> None:
    # With '?' and '[x]' read as glob characters, this prefix would match too.
    decoy = prefix.replace("-?[x]:", "-Qx:")
    await presence_for(redis, decoy).record(beat("node-decoy"))
    await redis.set(f"{prefix}lease:{uuid4()}:1", "node-mine", ex=60)
    await presence.record(beat("node-mine"))
    try:
        with gateway.client("client-a") as http:
            assert [n["node_id"] for n in nodes(http)] == ["node-mine"]
    finally:
        await delete_prefix(redis, decoy)


async def test_many_nodes_are_all_listed(gateway: Gateway, presence: Presence) -> None:
    ids = [f"node-{i:04d}" for i in range(1234)]  # more than one SCAN and one read batch
    for node_id in reversed(ids):
        await presence.record(beat(node_id))
    with gateway.client("client-a") as http:
        assert [n["node_id"] for n in nodes(http)] == ids


async def test_the_time_of_a_heartbeat_is_not_made_up(
    gateway: Gateway, redis: Redis, prefix: str, presence: Presence
) -> None:
    # Written with a longer TTL than the configured one, its time cannot be derived honestly.
    await presence_for(redis, prefix, ttl_s=NODE_TTL_S + 600).record(beat("node-long"))
    await redis.set(f"{prefix}node:node-forever", beat("node-forever").model_dump_json())
    with gateway.client("client-a") as http:
        forever, long = nodes(http)
    assert long["last_seen"] is None
    assert datetime.fromisoformat(long["expires_at"]) > datetime.now(UTC) + timedelta(minutes=5)
    assert (forever["last_seen"], forever["expires_at"]) == (None, None)


def test_nodes_are_unavailable_while_redis_is_down(
    prefix: str, pg_schema: str, tmp_path: Path
) -> None:
    # Port 9 (discard) has no Redis: the connection is refused at once.
    store = postgres_settings(pg_schema)
    with (
        start(store, tmp_path, redis_url="redis://127.0.0.1:9/0") as gateway,
        gateway.client("client-a") as http,
    ):
        response = http.get("/nodes")
        assert response.status_code == 503
        assert "Redis" in response.json()["detail"]
        assert response.headers["Retry-After"]
        assert http.get("/jobs").status_code == 200  # the rest of the API does not need it


def test_nodes_need_a_token(gateway: Gateway) -> None:
    with gateway.client() as http:
        response = http.get("/nodes")
    assert response.status_code == 401
