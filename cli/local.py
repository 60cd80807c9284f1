"""`trainyard local`: the whole system on one machine, under one supervisor.

Starts the handlers, the projections, one train node and the gateway as child processes with the
embedded defaults: a SQLite event store and a local model store in a data directory (`.trainyard/`
unless `--data-dir`), and the machine's RabbitMQ and Redis. A TRAINYARD_* variable set in the
environment wins over those defaults. Before anything starts, the settings are validated and
RabbitMQ and Redis (and PostgreSQL, if chosen) must answer.

Each child runs in its own session, so Ctrl-C reaches only the supervisor, which stops them in
order: the train node first (it gives its running jobs back while the handlers can still record
that), then the gateway, the projections and the handlers; whatever a child leaves behind is
killed. If a child exits on its own, the supervisor stops the others and exits non-zero.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, TextIO

import httpx
import psutil
import psycopg
from eventsourcing.persistence import PersistenceError
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cli.preflight import (
    PROCESS_SETTINGS,
    SERVICES_HINT,
    check_services,
    check_settings,
    first_line,
    settings_from,
)
from cli.supervisor import Child, Output, set_subreaper, sweep_own_children
from domain.application import JobsApplication
from domain.settings import StoreSettings
from gateway.db import create_database
from gateway.tokens import InvalidClientIdError, TokenStore
from trainer.settings import NodeSettings

TOKEN_FILE = "client-token"  # noqa: S105 -- a file name
LOCK_FILE = "local.lock"
STOP_TIMEOUT_S = 30.0  # per central process; the train node also gets its drain and stop grace
STOP_ORDER = ("train-node", "gateway", "projections", "handlers")


class LocalSettings(BaseSettings):
    """Where local mode keeps its files and serves the gateway (command-line options win)."""

    model_config = SettingsConfigDict(env_prefix="TRAINYARD_", env_file=".env", extra="ignore")

    local_data_dir: Path = Field(
        Path(".trainyard"),
        description="local mode: the event store, models, builds, runs, logs and token go here",
    )
    local_host: str = Field("127.0.0.1", min_length=1, description="local mode: gateway address")
    local_port: int = Field(8000, ge=0, le=65535, description="local mode: gateway port (0: any)")


class LocalModeError(Exception):
    """Local mode cannot start or keep running; the message says why and what to do."""


class ChildExitedError(LocalModeError):
    """A child process exited while it should have been running."""

    def __init__(self, name: str, status: str, tail: Sequence[str]) -> None:
        super().__init__(f"{name} exited unexpectedly ({status})")
        self.name = name
        self.status = status
        self.tail = list(tail)


def local_defaults(data_dir: Path) -> dict[str, str]:
    """The TRAINYARD_* values local mode sets unless the environment sets them."""
    return {
        "TRAINYARD_EVENT_STORE": "sqlite",
        "TRAINYARD_SQLITE_PATH": str(data_dir / "trainyard.sqlite3"),
        "TRAINYARD_MODEL_STORE": "local",
        "TRAINYARD_MODEL_DIR": str(data_dir / "models"),
        "TRAINYARD_BUILDS_DIR": str(data_dir / "builds"),
        "TRAINYARD_RUNS_DIR": str(data_dir / "runs"),
        # Ctrl-C stops at once: running jobs are given back to the queue (failed, retryable)
        # instead of the train node waiting for them to finish.
        "TRAINYARD_DRAIN_TIMEOUT_S": "0",
    }


def reserve_port(host: str, port: int) -> int:
    """`port` if it is free on `host` (any free port for 0), else raise LocalModeError."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as error:
        raise LocalModeError(f"the gateway address {host!r} does not resolve: {error}") from error
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind(address)
        except OSError as error:
            raise LocalModeError(
                f"the gateway cannot listen on {host}:{port}: {error.strerror}; "
                "stop what uses that port or choose another with --port"
            ) from error
        return int(sock.getsockname()[1])


class LocalMode:
    """The gateway, handlers, projections and one train node, started and stopped together.

    Use as a context manager (or `start()` … `stop()`), from the thread that will stop it:
    on Linux each child gets SIGTERM if that thread ends.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        environ: Mapping[str, str] | None = None,
        quiet: bool = False,
        client_id: str = "local",
        output: TextIO | None = None,
    ) -> None:
        base = dict(os.environ if environ is None else environ)
        local = settings_from(LocalSettings, base)
        self.data_dir = Path(data_dir if data_dir is not None else local.local_data_dir).resolve()
        self.host = host if host is not None else local.local_host
        self.port = port if port is not None else local.local_port
        self.env = {**local_defaults(self.data_dir), **base, "PYTHONUNBUFFERED": "1"}
        self.quiet = quiet
        self.client_id = client_id
        self.token: str | None = None
        self.children: dict[str, Child] = {}
        width = max(len("trainyard"), *(len(name) for name in PROCESS_SETTINGS))
        log_dir = self.data_dir / "logs" if quiet else None
        self.output = Output(output or sys.stdout, log_dir, width)
        self._lock: IO[str] | None = None
        self._hurry = threading.Event()

    @property
    def url(self) -> str:
        """The gateway's URL."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 -- clients connect through loopback
            host = "127.0.0.1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def token_file(self) -> Path:
        """Where the local client's token is kept between runs."""
        return self.data_dir / TOKEN_FILE

    # --- starting -------------------------------------------------------------

    def prepare(self) -> None:
        """Everything before the children start: settings, data dir, services, store, token."""
        if problems := check_settings(self.env):
            raise LocalModeError("invalid settings:\n  " + "\n  ".join(problems))
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / "logs").mkdir(exist_ok=True)
        except OSError as error:
            raise LocalModeError(
                f"cannot create the data directory {self.data_dir}: {error}"
            ) from error
        self._take_lock()
        if problems := check_services(self.env):
            raise LocalModeError("\n".join(problems) + f"\n  ({SERVICES_HINT})")
        store = settings_from(StoreSettings, self.env)
        try:
            # The event store's tables exist before any process uses them.
            JobsApplication(store.eventsourcing_env()).close()
            self.token = self._client_token(store)
        except (PersistenceError, psycopg.Error, sqlite3.Error, OSError) as error:
            where = store.sqlite_path if store.event_store == "sqlite" else "PostgreSQL"
            raise LocalModeError(f"the event store ({where}) cannot be used: {error}") from error

    def _take_lock(self) -> None:
        lock = (self.data_dir / LOCK_FILE).open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise LocalModeError(
                f"another `trainyard local` (pid {holder}) uses {self.data_dir}; "
                "stop it or choose another --data-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _client_token(self, store: StoreSettings) -> str:
        """The saved token if it still works, else a new one (saved, readable by the owner)."""
        db = create_database(store, pool_size=1)
        db.open()
        try:
            tokens = TokenStore(db)
            tokens.create_table()
            if self.token_file.exists():
                saved = self.token_file.read_text(encoding="utf-8").strip()
                if tokens.authenticate(saved) == self.client_id:
                    return saved
            try:
                token = tokens.create(self.client_id)
            except InvalidClientIdError as error:
                raise LocalModeError(str(error)) from error
        finally:
            db.close()
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(token + "\n")
        return token

    def _commands(self) -> dict[str, list[str]]:
        python = sys.executable
        return {
            "handlers": [python, "-m", "faststream", "run", "handlers.app:app"],
            "projections": [python, "-m", "projections"],
            "train-node": [python, "-m", "faststream", "run", "trainer.node:app"],
            "gateway": [
                python,
                "-m",
                "uvicorn",
                "gateway.app:app",
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--timeout-graceful-shutdown",
                "10",
            ],
        }

    def start(self) -> None:
        """Prepare, then start every process (the gateway last)."""
        try:
            self.prepare()
            self.port = reserve_port(self.host, self.port)
        except BaseException:
            self._release()
            raise
        node = settings_from(NodeSettings, self.env)
        node_timeout = node.drain_timeout_s + node.stop_grace_s + STOP_TIMEOUT_S
        started = []
        for name, args in self._commands().items():
            child = Child(name, args, node_timeout if name == "train-node" else STOP_TIMEOUT_S)
            self.children[name] = child
            child.start(self.env, self.output)
            started.append(f"{name} (pid {child.pid})")
        self.output.say(f"data in {self.data_dir}; started " + ", ".join(started))

    def __enter__(self) -> LocalMode:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- running --------------------------------------------------------------

    def check_children(self) -> None:
        """Raise ChildExitedError if a child has exited; remember what each one started."""
        for child in self.children.values():
            if child.exited():
                raise ChildExitedError(child.name, child.status or "exited", child.tail)
            child.note_descendants()

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Wait until /healthz is ok; False if `stop` was set first.

        Raises ChildExitedError if a child exits, LocalModeError after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(timeout=5, trust_env=False) as http:  # loopback, never a proxy
            while stop is None or not stop.is_set():
                self.check_children()
                try:
                    answer = http.get(f"{self.url}/healthz")
                    if answer.status_code == 200 and answer.json().get("status") == "ok":
                        return True
                    last = f"HTTP {answer.status_code} {answer.text[:300]}"
                except (httpx.HTTPError, ValueError) as error:
                    last = first_line(error)
                if time.monotonic() > deadline:
                    raise LocalModeError(
                        f"the gateway was not ready within {timeout:g} s; /healthz: {last}"
                    )
                time.sleep(0.25)
        return False

    def supervise(self, stop: threading.Event) -> None:
        """Watch the children until `stop` is set; raise ChildExitedError if one exits."""
        while not stop.wait(0.5):
            self.check_children()

    # --- stopping -------------------------------------------------------------

    def hurry(self) -> None:
        """Stop waiting for children to end by themselves: kill what is left."""
        self._hurry.set()

    def stop(self) -> None:
        """Stop every child in order (SIGTERM, then SIGKILL after its timeout); idempotent."""
        for name in STOP_ORDER:
            child = self.children.get(name)
            if child is None or child.proc is None or child.proc.returncode is not None:
                continue
            child.note_descendants()
            child.terminate()
            deadline = time.monotonic() + child.stop_timeout
            while not child.exited():
                if self._hurry.is_set():
                    self.output.say(f"{name}: killed")
                    break
                if time.monotonic() > deadline:
                    self.output.say(f"{name} did not stop within {child.stop_timeout:g} s: killed")
                    break
                child.note_descendants()
                time.sleep(0.1)
            left = child.finish()
            if left:
                self.output.say(f"{name}: killed {len(left)} process(es) it left behind")
                psutil.wait_procs(left, timeout=5)
        for child in self.children.values():
            child.close()
        self.output.close()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard local",
        description="Run the whole Trainyard system on this machine: gateway, handlers, "
        "projections and one train node, on this machine's RabbitMQ and Redis.",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="event store, models, runs, logs (default: .trainyard)"
    )
    parser.add_argument("--host", help="gateway address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="gateway port (default: 8000; 0: any free port)")
    parser.add_argument(
        "--quiet", action="store_true", help="write the processes' logs to DATA_DIR/logs/"
    )
    parser.add_argument("--client-id", default="local", help="client the printed token is for")
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for the gateway"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`trainyard local`: run until Ctrl-C or SIGTERM (exit 0) or until a process fails (1)."""
    args = _parser().parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        _parser().error(f"--port {args.port} is not a port number (0-65535)")
    try:
        mode = LocalMode(
            args.data_dir,
            host=args.host,
            port=args.port,
            quiet=args.quiet,
            client_id=args.client_id,
        )
    except ValidationError as error:
        print(f"trainyard local: invalid settings: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # No output here: the main thread may be holding the output's lock.
        if stop.is_set():
            mode.hurry()
        stop.set()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous: dict[int, Any] = {sig: signal.signal(sig, on_signal) for sig in handled}
    set_subreaper()
    failure: LocalModeError | None = None
    try:
        mode.start()
        if mode.wait_ready(args.ready_timeout, stop):
            _announce(mode)
            mode.supervise(stop)
        mode.output.say("stopping (a second Ctrl-C kills at once)")
    except LocalModeError as error:
        failure = error
        if isinstance(error, ChildExitedError):
            mode.output.say(f"{error}; stopping the others", err=True)
            if args.quiet:
                mode.output.say(
                    f"last lines from {error.name}:\n" + "\n".join(error.tail), err=True
                )
    finally:
        mode.stop()
        sweep_own_children()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure is not None:
        print(f"trainyard local: {failure}", file=sys.stderr)
        return 1
    mode.output.say("stopped")
    return 0


def _announce(mode: LocalMode) -> None:
    logs = f"\nlogs     {mode.data_dir / 'logs'}" if mode.quiet else ""
    mode.output.say(
        "Trainyard is running (local mode).\n"
        f"gateway  {mode.url}\n"
        f"token    {mode.token}\n"
        f"client   {mode.client_id} (token saved in {mode.token_file})\n"
        f"data     {mode.data_dir}{logs}\n"
        f'try      curl -H "Authorization: Bearer {mode.token}" {mode.url}/jobs\n'
        "Stop with Ctrl-C."
    )


if __name__ == "__main__":
    raise SystemExit(main())
