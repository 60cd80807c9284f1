"""The `trainyard` command against a real local mode: every command, as a user runs it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import TRAINYARD, SharedLocal, free_port, trainyard
from tests.trainer.conftest import ppo_config

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def submit(shared: SharedLocal, config: Path, *args: str) -> str:
    result = trainyard("--json", "submit", str(config), *args, env=shared.cli_env())
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    assert isinstance(job_id, str)
    return job_id


def status_of(shared: SharedLocal, job_id: str) -> dict[str, Any]:
    result = trainyard("--json", "status", job_id, env=shared.cli_env())
    assert result.returncode == 0, result.stderr
    job: dict[str, Any] = json.loads(result.stdout)
    return job


def wait_for_status(shared: SharedLocal, job_id: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while True:
        job = status_of(shared, job_id)
        if job["status"] in wanted:
            return job
        assert time.monotonic() < deadline, f"job stayed {job['status']}"
        time.sleep(0.5)


def test_a_bad_spec_is_refused_naming_each_field(shared_local: SharedLocal, tmp_path: Path):
    config = write_config(
        tmp_path,
        "behaviors:\n  Reach:\n    trainer_type: ppo\n    hyperparameters: {batch_size: -3}\n",
    )
    result = trainyard(
        "submit", str(config), "--env", "builtin:reach", "--seed", "-1", env=shared_local.cli_env()
    )
    assert result.returncode == 1
    assert "(HTTP 422)" in result.stderr
    assert "config.behaviors.Reach.hyperparameters.batch_size:" in result.stderr
    assert "seed: must be between 0 and 2147483647, got -1" in result.stderr

    bad_env = trainyard("submit", str(config), "--env", "reach", env=shared_local.cli_env())
    assert bad_env.returncode == 2
    assert "Invalid value for '--env': must be builtin:NAME" in bad_env.stderr

    missing = trainyard(
        "submit", str(tmp_path / "nope.yaml"), "--env", "builtin:reach", env=shared_local.cli_env()
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


def test_a_jobs_life_through_the_commands(shared_local: SharedLocal, tmp_path: Path):
    env = shared_local.cli_env()
    config = write_config(tmp_path, ppo_config("Reach", 200_000))
    job_id = submit(shared_local, config, "--env", "builtin:reach", "--seed", "4")

    human = trainyard("list", env=env)
    assert human.returncode == 0, human.stderr
    assert job_id in human.stdout
    assert "STATUS" in human.stdout
    listed = json.loads(trainyard("--json", "list", env=env).stdout)
    assert job_id in [job["job_id"] for job in listed]

    running = wait_for_status(shared_local, job_id, {"running"})
    assert running["node_id"] == shared_local.local.node_id
    details = trainyard("status", job_id, env=env)
    assert details.returncode == 0
    assert f"job          {job_id}" in details.stdout or job_id in details.stdout
    assert "running" in details.stdout
    assert shared_local.local.node_id in details.stdout

    only_running = json.loads(trainyard("--json", "list", "--status", "running", env=env).stdout)
    assert [job["job_id"] for job in only_running] == [job_id]

    cancelled = trainyard("cancel", job_id, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancel requested: job {job_id} is running; its node was told to stop" in (
        cancelled.stdout
    )
    watched = trainyard("watch", job_id, env=env)
    assert watched.returncode == 1
    assert f"job {job_id} cancelled" in watched.stdout
    assert f"error: job {job_id} cancelled" in watched.stderr

    history = trainyard("events", job_id, env=env)
    assert history.returncode == 0
    for kind in ("Job.Submitted", "Job.Claimed", "Job.Started", "Job.CancelRequested"):
        assert kind in history.stdout
    events = json.loads(trainyard("--json", "events", job_id, env=env).stdout)
    assert events[0]["type"] == "Job.Submitted"
    assert events[-1]["type"] == "Job.Cancelled"
    assert [e["position"] for e in events] == sorted({e["position"] for e in events})

    no_model = trainyard("model", job_id, "-o", str(tmp_path / "m.onnx"), env=env)
    assert no_model.returncode == 1
    assert "the job is cancelled; its model is there once it completes (HTTP 409)" in (
        no_model.stderr
    )
    assert not (tmp_path / "m.onnx").exists()
    again = trainyard("cancel", job_id, env=env)  # repeating a cancel is harmless
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"job {job_id} cancelled\n"

    unknown = trainyard("status", "00000000-0000-0000-0000-000000000000", env=env)
    assert unknown.returncode == 1
    assert "(HTTP 404)" in unknown.stderr


def test_nodes_and_a_second_node_started_with_trainyard_node(
    shared_local: SharedLocal, tmp_path: Path
):
    env = shared_local.cli_env()
    node_id = shared_local.local.node_id
    table = trainyard("nodes", env=env)
    assert table.returncode == 0, table.stderr
    assert node_id in table.stdout
    assert "ready" in table.stdout

    second = f"{node_id}-b"
    node_env = {
        **env,
        "TRAINYARD_NODE_ID": second,
        "TRAINYARD_RUNS_DIR": str(tmp_path / "runs"),
        "TRAINYARD_BUILDS_DIR": str(tmp_path / "builds"),
        "TRAINYARD_TRAINER_SLOTS": "2",
        "TRAINYARD_DRAIN_TIMEOUT_S": "0",
    }
    dry = trainyard("node", "--dry-run", env=node_env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"train node {second}: 2 slot(s)" in dry.stdout
    assert "broker  amqp://guest:***@127.0.0.1:5672/" in dry.stdout
    assert f"queue prefix '{shared_local.local.topology.prefix}'" in dry.stdout

    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(
        [str(TRAINYARD), "node"], env=node_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            nodes = json.loads(trainyard("--json", "nodes", env=env).stdout)
            seen = {n["node_id"]: n for n in nodes}
            if second in seen:
                break
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            assert time.monotonic() < deadline, "the second node never showed up"
            time.sleep(0.5)
        assert seen[second]["slots"] == 2
        assert seen[node_id]["slots"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_a_wrong_or_missing_token_is_refused_with_a_hint(shared_local: SharedLocal):
    wrong = shared_local.cli_env(TRAINYARD_TOKEN="ty_000000000000." + "A" * 43)
    listing = trainyard("list", env=wrong)
    assert listing.returncode == 4
    assert "the token is malformed, unknown or revoked (HTTP 401)" in listing.stderr
    assert "pass --token or set TRAINYARD_TOKEN" in listing.stderr

    watching = trainyard("watch", "00000000-0000-0000-0000-000000000000", env=wrong)
    assert watching.returncode == 4

    env = shared_local.cli_env()
    del env["TRAINYARD_TOKEN"]
    missing = trainyard("list", env=env)
    assert missing.returncode == 4
    assert "error: no token given: pass --token or set TRAINYARD_TOKEN" in missing.stderr


def test_a_gateway_that_is_down_is_named(shared_local: SharedLocal):
    url = f"http://127.0.0.1:{free_port()}"
    for command in (["list"], ["watch", "some-job"], ["status", "some-job"]):
        result = trainyard("--url", url, *command, env=shared_local.cli_env())
        assert result.returncode == 3, result.stderr
        assert f"cannot reach the gateway at {url}: is it running? (trainyard local)" in (
            result.stderr
        )


def test_a_new_token_from_trainyard_token_sees_only_its_own_jobs(shared_local: SharedLocal):
    data_dir = str(shared_local.local.data_dir)
    store_env = shared_local.local.env
    created = trainyard("token", "--data-dir", data_dir, "create", "someone-else", env=store_env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("ty_")
    listing = trainyard("list", env=shared_local.cli_env(TRAINYARD_TOKEN=token))
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "no jobs"
    listed = trainyard("token", "--data-dir", data_dir, "list", "someone-else", env=store_env)
    assert listed.returncode == 0, listed.stderr
    assert token.split(".")[0] in listed.stdout
    assert token not in listed.stdout  # never the secret
    revoked = trainyard("token", "--data-dir", data_dir, "revoke", token, env=store_env)
    assert revoked.returncode == 0, revoked.stderr
    refused = trainyard("list", env=shared_local.cli_env(TRAINYARD_TOKEN=token))
    assert refused.returncode == 4
    bad = trainyard("token", "--data-dir", data_dir, "create", "no:colons", env=store_env)
    assert bad.returncode == 2
    nowhere = trainyard("token", "--data-dir", data_dir + "-none", "list", env=store_env)
    assert nowhere.returncode == 1
    assert "no local mode data in" in nowhere.stderr


class CuttableProxy:
    """A TCP proxy to the gateway whose connections the test can cut."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.sockets += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection, as a network failure would."""
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets = []

    def close(self) -> None:
        self.server.close()
        self.cut()


def test_watch_resumes_after_the_connection_drops(shared_local: SharedLocal, tmp_path: Path):
    config = write_config(
        tmp_path, ppo_config("GridGoal", 3000, summary_freq=500, hyper={"beta": 1.0e-2})
    )
    job_id = submit(shared_local, config, "--env", "builtin:gridgoal", "--seed", "2")
    port = int(shared_local.url.rsplit(":", 1)[1])
    proxy = CuttableProxy(port)
    model = tmp_path / "model.onnx"
    env = shared_local.cli_env(TRAINYARD_URL=f"http://127.0.0.1:{proxy.port}")
    proc = subprocess.Popen(
        [str(TRAINYARD), "--json", "watch", job_id, "-o", str(model)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    frames: list[dict[str, Any]] = []
    cuts = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            frame = json.loads(line)
            frames.append(frame)
            is_progress = frame["type"] == "update" and frame["update"]["type"] == "progress"
            # Cut after the first and the third progress report.
            progress_seen = sum(
                1 for f in frames if f["type"] == "update" and f["update"]["type"] == "progress"
            )
            if is_progress and progress_seen in (1, 3):
                proxy.cut()
                cuts += 1
        assert proc.stderr is not None
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proxy.close()

    assert cuts == 2
    reconnects = [f for f in frames if f["type"] == "reconnecting"]
    assert len(reconnects) >= 2
    # Each resume names the last update it had.
    assert all(r["after"] for r in reconnects)
    assert frames[0]["type"] == "snapshot"
    assert frames[-1] == {"type": "end", "status": "completed"}

    ids = [int(f["id"].split("-")[0]) for f in frames if f["type"] in ("snapshot", "update")]
    assert ids == sorted(set(ids)), "updates repeated or out of order"
    # No gap: every recorded event after the snapshot (but the invisible metrics Opened) came.
    events = json.loads(trainyard("--json", "events", job_id, env=shared_local.cli_env()).stdout)
    expected = [
        e["position"] for e in events if e["position"] > ids[0] and e["type"] != "JobMetrics.Opened"
    ]
    assert ids[1:] == expected

    sent = [f for f in frames if f["type"] == "model"]
    assert len(sent) == 1
    recorded = status_of(shared_local, job_id)["model_sha256"]
    assert sent[0]["sha256"] == recorded
    assert hashlib.sha256(model.read_bytes()).hexdigest() == recorded

    again = trainyard(
        "model", job_id, "-o", str(tmp_path / "again.onnx"), env=shared_local.cli_env()
    )
    assert again.returncode == 0, again.stderr
    assert f"sha256 {recorded} verified" in again.stdout
    assert (tmp_path / "again.onnx").read_bytes() == model.read_bytes()
