"""The gateway served by a real uvicorn on a loopback port, on the real stores.

The job board is brought up to date in-process: `Gateway.project()` runs the projections'
own BatchRunner (the code `python -m projections` runs) once over the log, without Redis.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from domain.application import JobsApplication
from domain.settings import StoreSettings
from gateway.app import create_app
from gateway.db import Database, create_database
from gateway.settings import GatewaySettings
from gateway.tokens import TokenStore
from projections.__main__ import build_view
from projections.jobboard import JobBoardView
from projections.runner import BatchRunner
from tests.conftest import postgres_settings
from trainer.modelstore import LocalModelStore, ModelStoreSettings

REDIS_URL = os.environ.get("TRAINYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BODY_LIMIT = 1024 * 1024
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"
SPEC: dict[str, Any] = {"config": CONFIG, "env": {"builtin": "reach"}, "seed": 7}
START_TIMEOUT_S = 60.0  # an upper bound for a busy machine, not a speed requirement


@dataclass
class Gateway:
    """A running gateway and what a test needs to drive and inspect it."""

    url: str
    store: StoreSettings
    jobs: JobsApplication  # the test's own application on the same event store
    view: JobBoardView
    db: Database
    tokens: TokenStore
    models: LocalModelStore

    def project(self) -> None:
        """Bring the job board up to date with the log (what `python -m projections` does)."""
        BatchRunner(self.jobs, self.view, batch_size=100).catch_up()

    def client(self, client_id: str | None = None, token: str | None = None) -> httpx.Client:
        """An HTTP client, with a fresh token for `client_id` (or the given token)."""
        if client_id is not None:
            token = self.tokens.create(client_id)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the gateway did not stop"


@contextmanager
def start(store: StoreSettings, tmp_path: Path, redis_url: str = REDIS_URL) -> Iterator[Gateway]:
    """The gateway on `store`, with the job board's tables and a local model store."""
    view = build_view(store)  # creates the job board's tables, as the projections do
    jobs = JobsApplication(store.eventsourcing_env(), max_attempts=store.max_attempts)
    db = create_database(store, pool_size=2)
    db.open()
    tokens = TokenStore(db)
    tokens.create_table()
    models = ModelStoreSettings(model_store="local", model_dir=tmp_path / "models")
    app = create_app(
        GatewaySettings(redis_url=redis_url, body_limit_bytes=BODY_LIMIT), store, models
    )
    try:
        with serve(app) as url:
            yield Gateway(url, store, jobs, view, db, tokens, LocalModelStore(models.model_dir))
    finally:
        db.close()
        view.close()
        jobs.close()


@pytest.fixture
def gateway(pg_schema: str, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on a fresh PostgreSQL schema."""
    with start(postgres_settings(pg_schema), tmp_path) as gateway:
        yield gateway


@pytest.fixture
def any_gateway(store_settings: StoreSettings, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on SQLite, and on PostgreSQL."""
    with start(store_settings, tmp_path) as gateway:
        yield gateway
