"""`trainyard local`: the whole system under one supervisor, on the real RabbitMQ and Redis."""

from __future__ import annotations

import signal
import socket
import stat
import time

import httpx
import psutil
import pytest

from cli.local import LocalMode, LocalModeError
from domain.settings import StoreSettings
from gateway.db import create_database
from gateway.tokens import TokenStore
from tests.cli.conftest import READY_TIMEOUT_S, LocalEnv, Supervisor, free_port


def eventually_json(url: str, token: str, path: str, check: str) -> dict[str, object]:
    """GET `path` until the answer's text contains `check`."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            answer = http.get(path)
            if answer.status_code == 200 and check in answer.text:
                body: dict[str, object] = answer.json()
                return body
            if time.monotonic() > deadline:
                pytest.fail(f"GET {path} never showed {check!r}: {answer.text}")
            time.sleep(0.2)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The ones still running (pid reuse is told apart by start time)."""
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_local_mode_serves_the_api_and_leaves_nothing_running(
    local_mode: LocalMode, local_env: LocalEnv
) -> None:
    health = httpx.get(f"{local_mode.url}/healthz").json()
    assert health == {
        "status": "ok",
        "checks": {"event_store": {"ok": True}, "job_board": {"ok": True}, "redis": {"ok": True}},
    }
    assert local_mode.token is not None
    auth = {"Authorization": f"Bearer {local_mode.token}"}
    jobs = httpx.get(f"{local_mode.url}/jobs", headers=auth)
    assert jobs.status_code == 200
    assert jobs.json()["jobs"] == []
    assert httpx.get(f"{local_mode.url}/jobs").status_code == 401

    nodes = eventually_json(local_mode.url, local_mode.token, "/nodes", local_env.node_id)
    assert nodes["nodes"] == [
        {
            **nodes["nodes"][0],  # type: ignore[index]
            "node_id": local_env.node_id,
            "slots": 1,
            "free_slots": 1,
            "draining": False,
        }
    ]

    # The embedded stores live in the data directory, the token readable by its owner only.
    data = local_env.data_dir
    assert (data / "trainyard.sqlite3").is_file()
    assert stat.S_IMODE((data / "client-token").stat().st_mode) == 0o600
    assert (data / "client-token").read_text().strip() == local_mode.token
    assert {p.name for p in (data / "logs").iterdir()} >= {
        "gateway.log",
        "handlers.log",
        "projections.log",
        "train-node.log",
    }
    handlers_log = (data / "logs" / "handlers.log").read_text()
    assert "FastStream app started" in handlers_log
    assert "\x1b[" not in handlers_log  # no terminal colours in a file

    children = [psutil.Process(child.pid) for child in local_mode.children.values()]
    local_mode.stop()
    assert alive(children) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{local_mode.url}/healthz")


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_exits_0(
    local_env: LocalEnv, supervisors: list[Supervisor]
) -> None:
    supervisor = Supervisor(local_env, "--port", str(free_port()))
    supervisors.append(supervisor)
    url, token = supervisor.wait_ready()
    assert httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {token}"}).is_success
    eventually_json(url, token, "/nodes", local_env.node_id)
    children = psutil.Process(supervisor.proc.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in children]
    for app in ("gateway.app:app", "handlers.app:app", "-m projections", "trainer.node:app"):
        assert any(app in command for command in commands), commands

    supervisor.proc.send_signal(signal.SIGINT)

    assert supervisor.wait() == 0, supervisor.errors()
    assert alive(children) == []
    output = supervisor.output()
    assert output.rstrip().endswith("stopped")
    # The train node stops first (the handlers still record what it reports), the handlers last.
    stopping = output[output.index("stopping (a second Ctrl-C") :].splitlines()[1:]
    speakers = [line.split(" | ")[0].strip() for line in stopping]
    assert list(dict.fromkeys(speakers)) == [
        "train-node",
        "gateway",
        "projections",
        "handlers",
        "trainyard",
    ]


@pytest.mark.slow
def test_a_child_that_dies_stops_the_others_and_fails(
    local_env: LocalEnv, supervisors: list[Supervisor]
) -> None:
    supervisor = Supervisor(local_env, "--port", str(free_port()), "--quiet")
    supervisors.append(supervisor)
    supervisor.wait_ready()
    children = psutil.Process(supervisor.proc.pid).children(recursive=True)
    (projections,) = [p for p in children if p.cmdline()[1:3] == ["-m", "projections"]]

    projections.kill()

    assert supervisor.wait() == 1
    assert alive(children) == []
    errors = supervisor.errors()
    assert "projections exited unexpectedly (killed by SIGKILL)" in errors
    # Its last words are shown, since --quiet kept them out of the terminal.
    tail = errors[errors.index("last lines from projections:") :]
    assert "job board following" in tail


@pytest.mark.parametrize(
    ("variable", "url", "named", "not_named"),
    [
        ("TRAINYARD_REDIS_URL", "redis://127.0.0.1:{port}/0", "Redis", "RabbitMQ"),
        ("TRAINYARD_AMQP_URL", "amqp://guest:secret@127.0.0.1:{port}/", "RabbitMQ", "Redis"),
    ],
)
def test_an_unreachable_service_is_named_and_nothing_starts(
    local_env: LocalEnv,
    supervisors: list[Supervisor],
    variable: str,
    url: str,
    named: str,
    not_named: str,
) -> None:
    port = free_port()
    env = {**local_env.env, variable: url.format(port=port)}
    supervisor = Supervisor(local_env, "--port", str(free_port()), env=env)
    supervisors.append(supervisor)

    assert supervisor.wait() == 1
    errors = supervisor.errors()
    assert f"{named} does not answer at " in errors
    assert f"127.0.0.1:{port}" in errors
    assert "start it with" in errors
    assert variable in errors
    assert f"{not_named} does not answer" not in errors
    assert "secret" not in errors  # a password in a URL is not printed
    assert "started" not in supervisor.output()


def test_invalid_settings_are_named_before_anything_starts(local_env: LocalEnv) -> None:
    env = {**local_env.env, "TRAINYARD_HEARTBEAT_S": "-1", "TRAINYARD_EVENT_STORE": "mysql"}
    mode = LocalMode(local_env.data_dir, port=0, environ=env)

    with pytest.raises(LocalModeError) as raised:
        mode.start()

    message = str(raised.value)
    assert "TRAINYARD_HEARTBEAT_S: Input should be greater than 0" in message
    assert "TRAINYARD_EVENT_STORE: Input should be 'sqlite' or 'postgres'" in message
    assert mode.children == {}


def test_a_busy_port_is_refused_before_anything_starts(local_env: LocalEnv) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mode = LocalMode(local_env.data_dir, port=port, environ=local_env.env)

        with pytest.raises(LocalModeError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            mode.start()

    assert mode.children == {}


def test_the_token_is_kept_across_restarts_until_revoked(local_env: LocalEnv) -> None:
    first = LocalMode(local_env.data_dir, environ=local_env.env)
    first.prepare()
    first.stop()
    again = LocalMode(local_env.data_dir, environ=local_env.env)
    again.prepare()
    again.stop()
    assert first.token is not None
    assert again.token == first.token

    store = StoreSettings(sqlite_path=local_env.data_dir / "trainyard.sqlite3")
    db = create_database(store, pool_size=1)
    db.open()
    try:
        assert TokenStore(db).revoke(first.token)
    finally:
        db.close()
    renewed = LocalMode(local_env.data_dir, environ=local_env.env)
    renewed.prepare()
    renewed.stop()
    assert renewed.token not in (None, first.token)
    assert (local_env.data_dir / "client-token").read_text().strip() == renewed.token


def test_one_data_directory_serves_one_local_mode_at_a_time(local_env: LocalEnv) -> None:
    first = LocalMode(local_env.data_dir, environ=local_env.env)
    first.prepare()
    try:
        second = LocalMode(local_env.data_dir, environ=local_env.env)
        with pytest.raises(LocalModeError, match="another `trainyard local`"):
            second.prepare()
    finally:
        first.stop()
    third = LocalMode(local_env.data_dir, environ=local_env.env)
    third.prepare()
    third.stop()
