"""Trainyard's processes started for real by tests: their settings, logs, stop, kill and strays.

A test gives every process the same throwaway installation (a PostgreSQL schema, a queue prefix,
a Redis key prefix) through TRAINYARD_* variables, exactly as an operator would.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import psutil

from domain.contracts import Topology
from domain.settings import StoreSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent
STOP_TIMEOUT_S = 30.0  # an upper bound for a busy machine, not a speed requirement
_PR_SET_CHILD_SUBREAPER = 36


class Process:
    """One Trainyard process, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def pid(self) -> int:
        """The process id of the current start."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended (negative: the signal that ended it), else None."""
        assert self.proc is not None
        return self.proc.poll()

    def start(self) -> None:
        """Start (again)."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
            )

    def kill(self) -> None:
        """SIGKILL: no chance to finish what it was doing."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def kill_tree(self) -> list[psutil.Process]:
        """SIGKILL it and every process it started, all at once; return those it killed.

        What a machine losing power does: nothing gets to react or clean up.
        """
        assert self.proc is not None
        procs = tree(self.proc.pid) if self.proc.poll() is None else []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.proc.wait(timeout=30)  # reaped through Popen, which then knows its exit status
        psutil.wait_procs(procs[1:], timeout=STOP_TIMEOUT_S)
        return procs

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it has not ended within `timeout`; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def output(self) -> str:
        """What it wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def central_env(
    store: StoreSettings, topology: Topology, key_prefix: str, amqp_url: str, redis_url: str
) -> dict[str, str]:
    """The environment of a process of this installation (central node or train node)."""
    return {
        **os.environ,
        "TRAINYARD_EVENT_STORE": "postgres",
        "TRAINYARD_POSTGRES_HOST": store.postgres_host,
        "TRAINYARD_POSTGRES_PORT": str(store.postgres_port),
        "TRAINYARD_POSTGRES_DBNAME": store.postgres_dbname,
        "TRAINYARD_POSTGRES_USER": store.postgres_user,
        "TRAINYARD_POSTGRES_PASSWORD": store.postgres_password,
        "TRAINYARD_POSTGRES_SCHEMA": store.postgres_schema,
        "TRAINYARD_AMQP_URL": amqp_url,
        "TRAINYARD_REDIS_URL": redis_url,
        "TRAINYARD_QUEUE_PREFIX": topology.prefix,
        "TRAINYARD_REDIS_KEY_PREFIX": key_prefix,
    }


def start_handlers(env: dict[str, str], log: Path) -> Process:
    """`faststream run handlers.app:app`."""
    return Process([str(BIN_DIR / "faststream"), "run", "handlers.app:app"], env, log)


def start_projections(env: dict[str, str], log: Path) -> Process:
    """`python -m projections`."""
    return Process([sys.executable, "-m", "projections"], env, log)


def start_train_node(env: dict[str, str], log: Path) -> Process:
    """`faststream run trainer.node:app`."""
    return Process([str(BIN_DIR / "faststream"), "run", "trainer.node:app"], env, log)


def start_gateway(env: dict[str, str], port: int, log: Path) -> Process:
    """`uvicorn gateway.app:app` on a loopback port."""
    args = [str(BIN_DIR / "uvicorn"), "gateway.app:app", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "10"]
    return Process(args, env, log)


async def queues_exist(amqp_url: str, topology: Topology) -> bool:
    """Whether the handlers declared their queues (a message sent before would be dropped)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in (topology.claims, topology.reports, topology.heartbeats):
            channel = await connection.channel()  # a failed passive declare closes the channel
            try:
                await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                return False
    return True


# --- process trees ------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants now (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def mentioning(text: str) -> list[psutil.Process]:
    """Running processes (not this one) with `text` in their command line."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(text in arg for arg in proc.info.get("cmdline") or []):
            found.append(proc)
    return found


class Strays:
    """Processes that descend from this one and were not there at the start.

    As a child subreaper, this process inherits every orphan of the processes it starts (a
    Unity build re-parented away from its killed trainer, say), so nothing they leave can
    escape the count.
    """

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.baseline = {p.pid for p in self.me.children(recursive=True)}

    def new(self) -> list[psutil.Process]:
        """Descendants started since, zombies reaped (only running ones are returned)."""
        alive = []
        for proc in self.me.children(recursive=True):
            if proc.pid in self.baseline:
                continue
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    proc.wait(timeout=0)
                else:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        return alive

    def settle(self, timeout: float = 10.0) -> list[psutil.Process]:
        """The new descendants still running after up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while (alive := self.new()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive


@contextlib.contextmanager
def subreaper() -> Iterator[Strays]:
    """Make this process inherit the orphans of what it starts; yield the stray counter."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield Strays()
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def describe(procs: list[psutil.Process]) -> list[str]:
    """Pid and command line of each process, for a failure message."""
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            described.append(f"{proc.pid}: (gone)")
    return described
