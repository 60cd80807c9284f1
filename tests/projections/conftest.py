"""Fixtures for the job board: a real Redis with a throwaway key prefix, and runner helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from domain.application import JobsApplication
from domain.settings import StoreSettings
from domain.spec import JobSpec, parse_job_spec
from projections.__main__ import build_view
from projections.jobboard import JobBoardView
from projections.publisher import StreamPublisher, global_stream, job_stream
from projections.runner import BatchRunner

REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"


def spec() -> JobSpec:
    return parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}})


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    value = f"test-{uuid.uuid4().hex[:12]}:"
    try:
        yield value
    finally:
        keys = list(redis_client.scan_iter(f"{value}*"))
        if keys:
            redis_client.delete(*keys)


@pytest.fixture
def view(store_settings: StoreSettings) -> Iterator[JobBoardView]:
    board = build_view(store_settings)
    try:
        yield board
    finally:
        board.close()


@pytest.fixture
def publisher(redis_client: redis.Redis, prefix: str) -> StreamPublisher:
    return StreamPublisher(redis_client, prefix=prefix)


def runner(
    app: JobsApplication,
    view: JobBoardView,
    publisher: StreamPublisher | None,
    batch_size: int = 4,
) -> BatchRunner:
    return BatchRunner(app, view, publisher=publisher, batch_size=batch_size)


def entries(client: redis.Redis, key: str) -> list[tuple[str, dict[str, Any]]]:
    return list(client.xrange(key))  # type: ignore[arg-type]


def job_entries(client: redis.Redis, prefix: str, job_id: uuid.UUID) -> list[dict[str, Any]]:
    return [fields for _, fields in entries(client, job_stream(prefix, str(job_id)))]


def all_entries(client: redis.Redis, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    return entries(client, global_stream(prefix))


def job_row(view: JobBoardView, job_id: uuid.UUID) -> dict[str, Any]:
    jobs, _ = view.dump()
    (row,) = [r for r in jobs if r["job_id"] == job_id]
    return row


def metric_rows(view: JobBoardView, job_id: uuid.UUID) -> list[dict[str, Any]]:
    _, metrics = view.dump()
    return [m for m in metrics if m["job_id"] == job_id]
