"""Local mode for the command-line tests: isolated environments, in-process and as a process.

Every environment has its own data directory, queue prefix, Redis key prefix and node id, on
the machine's real RabbitMQ and Redis; its queues and keys are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cli.local import LocalMode
from domain.contracts import Topology
from tests.handlers.conftest import AMQP_URL, REDIS_URL, delete_topology

READY_TIMEOUT_S = 180.0  # an upper bound for a busy machine, not a speed requirement


def free_port() -> int:
    """A loopback port that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalEnv:
    """An environment for one local mode of its own."""

    env: dict[str, str]
    data_dir: Path
    topology: Topology
    key_prefix: str
    node_id: str


@pytest.fixture
def local_env(tmp_path: Path) -> Iterator[LocalEnv]:
    """The test's own data dir, queues, Redis keys and node id; cleaned up afterwards."""
    tag = uuid.uuid4().hex[:12]
    topology = Topology(f"test-{tag}.")
    key_prefix = f"test:{tag}:"
    node_id = f"local-{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update(
        {
            "TRAINYARD_AMQP_URL": AMQP_URL,
            "TRAINYARD_REDIS_URL": REDIS_URL,
            "TRAINYARD_QUEUE_PREFIX": topology.prefix,
            "TRAINYARD_REDIS_KEY_PREFIX": key_prefix,
            "TRAINYARD_NODE_ID": node_id,
            "TRAINYARD_HEARTBEAT_S": "1",
            "TRAINYARD_PROJECTION_POLL_INTERVAL": "0.2",
        }
    )
    try:
        yield LocalEnv(env, tmp_path / "data", topology, key_prefix, node_id)
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{key_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        asyncio.run(delete_topology(topology))


@pytest.fixture
def local_mode(local_env: LocalEnv) -> Iterator[LocalMode]:
    """Local mode started in-process on a free port, ready; stopped afterwards."""
    mode = LocalMode(local_env.data_dir, port=0, environ=local_env.env, quiet=True)
    with mode:
        mode.wait_ready(READY_TIMEOUT_S)
        yield mode


class Supervisor:
    """`python -m cli.local` as a process of its own, its output in a file."""

    def __init__(self, local: LocalEnv, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = local.data_dir.parent / f"supervisor-{uuid.uuid4().hex[:6]}.log"
        self.err = self.log.with_suffix(".err")
        command = [sys.executable, "-m", "cli.local", "--data-dir", str(local.data_dir), *args]
        with self.log.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                command, env=env or local.env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )

    def output(self) -> str:
        """Everything it wrote to stdout so far."""
        return self.log.read_text(errors="replace")

    def errors(self) -> str:
        """Everything it wrote to stderr so far."""
        return self.err.read_text(errors="replace")

    def wait_ready(self) -> tuple[str, str]:
        """Wait until it prints the gateway's URL and the token; returns both."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.output()
            url = re.search(r"gateway\s+(http://\S+)", text)
            token = re.search(r"token\s+(ty_\S+)", text)
            if url and token:
                return url[1], token[1]
            if self.proc.poll() is not None:
                pytest.fail(f"local mode exited ({self.proc.returncode}):\n{self.errors()}")
            time.sleep(0.2)
        pytest.fail(f"local mode was not ready:\n{self.output()[-3000:]}")

    def wait(self, timeout: float = READY_TIMEOUT_S) -> int:
        """Its exit status."""
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop it if it still runs: Ctrl-C, then SIGKILL (its children then get SIGTERM)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    """Supervisors a test starts (append them); any still running is stopped afterwards."""
    started: list[Supervisor] = []
    try:
        yield started
    finally:
        for supervisor in started:
            supervisor.close()


# --- one local mode for a whole module, and the `trainyard` command ---------------------------

TRAINYARD = Path(sys.executable).with_name("trainyard")


@dataclass
class SharedLocal:
    """A running local mode shared by a module's tests, and the environment it runs in."""

    mode: LocalMode
    local: LocalEnv

    @property
    def url(self) -> str:
        """The gateway's URL."""
        return self.mode.url

    @property
    def token(self) -> str:
        """The local client's token."""
        assert self.mode.token is not None
        return self.mode.token

    def cli_env(self, **overrides: str) -> dict[str, str]:
        """The environment `trainyard` runs with to reach this local mode."""
        return {
            **self.local.env,
            "TRAINYARD_URL": self.url,
            "TRAINYARD_TOKEN": self.token,
            **overrides,
        }


@pytest.fixture(scope="module")
def shared_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedLocal]:
    """Local mode started once for the module (own data dir, queues, keys, node id)."""
    tag = uuid.uuid4().hex[:12]
    topology = Topology(f"test-{tag}.")
    key_prefix = f"test:{tag}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env.update(
        {
            "TRAINYARD_AMQP_URL": AMQP_URL,
            "TRAINYARD_REDIS_URL": REDIS_URL,
            "TRAINYARD_QUEUE_PREFIX": topology.prefix,
            "TRAINYARD_REDIS_KEY_PREFIX": key_prefix,
            "TRAINYARD_NODE_ID": f"local-{tag}",
            "TRAINYARD_HEARTBEAT_S": "1",
            "TRAINYARD_PROJECTION_POLL_INTERVAL": "0.2",
        }
    )
    data_dir = tmp_path_factory.mktemp("shared-local") / "data"
    local = LocalEnv(env, data_dir, topology, key_prefix, f"local-{tag}")
    try:
        mode = LocalMode(data_dir, port=0, environ=env, quiet=True, client_id="cli-tests")
        with mode:
            mode.wait_ready(READY_TIMEOUT_S)
            yield SharedLocal(mode, local)
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{key_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        asyncio.run(delete_topology(topology))


def trainyard(
    *args: str, env: dict[str, str], timeout: float = 240.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `trainyard` console script; its exit status, stdout and stderr."""
    return subprocess.run(
        [str(TRAINYARD), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )
