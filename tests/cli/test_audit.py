"""`trainyard audit`: provenance replayed from the events, the model verified, a rerun compared."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from cli.audit import first_difference, fold
from domain.application import JobsApplication, ProgressReport
from domain.spec import parse_job_spec
from gateway.db import create_database
from gateway.history import History
from tests.cli.conftest import SharedLocal, trainyard
from tests.conftest import sqlite_settings
from tests.trainer.conftest import ppo_config
from trainer.builds import sha256_file
from trainer.standin import builtin_build

SEED = 3
REWARD = "Environment/Cumulative Reward"
CONFIG = "behaviors:\n  Reach:\n    trainer_type: ppo\n"


@pytest.fixture(scope="module")
def trained(shared_local: SharedLocal, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small GridGoal job, trained to completion (three reports)."""
    config = tmp_path_factory.mktemp("audit") / "gridgoal.yaml"
    config.write_text(ppo_config("GridGoal", 1500, summary_freq=500, hyper={"beta": 1.0e-2}))
    env = shared_local.cli_env()
    submitted = trainyard(
        "--json", "submit", str(config), "--env", "builtin:gridgoal", "--seed", str(SEED), env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id: str = json.loads(submitted.stdout)["job_id"]
    watched = trainyard("watch", job_id, env=env)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    return job_id


def audit_json(shared: SharedLocal, *args: str) -> dict[str, Any]:
    result = trainyard("--json", "audit", *args, env=shared.cli_env())
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.slow
def test_audit_prints_the_provenance_and_verifies_the_model(
    shared_local: SharedLocal, trained: str
):
    result = trainyard("audit", trained, env=shared_local.cli_env())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    node = shared_local.local.node_id
    build = builtin_build("gridgoal", shared_local.local.data_dir / "builds" / "builtin")
    assert f"job         {trained} (client cli-tests)" in out
    assert "status      completed, replayed from" in out
    assert "the job board agrees" in out
    assert f"seed        {SEED}" in out
    assert "spec        env builtin:gridgoal" in out
    assert f"build       sha256 {sha256_file(build)}" in out
    versions = (
        f"versions    ML-Agents {version('mlagents')}, torch {version('torch')}, "
        f"Python {platform.python_version()}"
    )
    assert versions in out
    assert f"node        {node}" in out
    command = next(line for line in out.splitlines() if line.startswith("command"))
    assert "-m trainer.launcher" in command
    assert f"--seed={SEED}" in command
    assert "--num-envs=1" in command
    assert "    behaviors:" in out  # the trainer configuration, as submitted
    assert f"    #1 on {node}: queued" in out
    assert "completed (3 reports)" in out
    assert "metrics     3 reports; steps 500 → 1500; mean reward" in out
    assert f"model       jobs/{trained}/1/GridGoal.onnx" in out or f"{trained}" in out
    assert "verified    yes: downloaded" in out
    assert "matches the recorded one; onnx.checker passed" in out

    report = audit_json(shared_local, trained)
    status = json.loads(trainyard("--json", "status", trained, env=shared_local.cli_env()).stdout)
    assert report["status"] == "completed"
    assert report["seed"] == SEED
    assert report["env"] == {"builtin": "gridgoal"}
    assert report["build_sha256"] == sha256_file(build)
    assert report["node_id"] == node
    assert report["model_sha256"] == status["model_sha256"]
    assert report["model_check"]["ok"] is True
    assert report["model_check"]["sha256"] == status["model_sha256"]
    assert report["effective_config"]["behaviors"]["GridGoal"]["max_steps"] == 1500
    assert [a["outcome"] for a in report["attempts"]] == ["completed"]
    assert [p[0] for p in report["metrics"]["curve"]] == [500, 1000, 1500]
    assert report["problems"] == []


@pytest.mark.slow
def test_a_rerun_gives_the_identical_reward_curve(shared_local: SharedLocal, trained: str):
    report = audit_json(shared_local, trained, "--rerun")
    recorded = report["metrics"]["curve"]
    rerun = report["rerun"]
    assert rerun["status"] == "completed"
    assert rerun["job_id"] != trained
    assert len(recorded) == 3
    assert rerun["curve"] == recorded
    assert rerun["identical"] is True
    assert rerun["first_difference"] is None


@pytest.mark.slow
def test_a_tampered_model_fails_the_audit(shared_local: SharedLocal, trained: str, tmp_path: Path):
    report = audit_json(shared_local, trained)
    stored = shared_local.local.data_dir / "models" / report["model_key"]
    original = stored.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    stored.write_bytes(bytes(flipped))
    try:
        kept = tmp_path / "kept.onnx"
        result = trainyard("audit", trained, "-o", str(kept), env=shared_local.cli_env())
    finally:
        stored.write_bytes(original)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "the model transfer broke off" in result.stderr
    assert not kept.exists()


def test_the_fold_tells_each_attempt_of_a_recorded_history(tmp_path: Path):
    """A lost lease, a retried failure and a completion, as the events endpoint returns them."""
    store = sqlite_settings(tmp_path)
    app = JobsApplication(store.eventsourcing_env(), max_attempts=3)
    db = create_database(store)
    db.open()
    try:
        spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}, "seed": 7})
        job_id = app.submit(spec, client_id="auditor", request_id="r1")
        info = {"build_sha256": "ab" * 32, "command": ["mlagents-learn", "--seed=7"]}
        app.claim(job_id, 1, "node-a")
        app.report_started(job_id, 1, 1, info)
        app.report_progress_batch(job_id, [ProgressReport(1, 2, 500, {REWARD: -1.0})])
        app.expire_lease(job_id, 1)
        app.claim(job_id, 2, "node-b")
        app.report_started(job_id, 2, 1, info)
        app.report_failed(job_id, 2, 2, "node-b shut down", retryable=True)
        app.claim(job_id, 3, "node-c")
        app.report_started(job_id, 3, 1, {**info, "mlagents_version": "1.1.0"})
        reports = [ProgressReport(3, s, s * 500, {REWARD: s / 10}) for s in (2, 3)]
        app.report_progress_batch(job_id, reports)
        app.report_completed(job_id, 3, 4, f"jobs/{job_id}/attempt-3/Reach.onnx", "cd" * 32)
        events = History(app, db).events(job_id, after=0, limit=1000)
    finally:
        db.close()
        app.close()

    job = fold(str(job_id), events)
    assert job.status == "completed"
    assert job.client_id == "auditor"
    assert job.spec["seed"] == 7
    assert [(a.number, a.node_id, a.outcome) for a in job.attempts.values()] == [
        (1, "node-a", "lease expired"),
        (2, "node-b", "failed, retried"),
        (3, "node-c", "completed"),
    ]
    assert job.attempts[2].reason == "node-b shut down"
    assert job.attempts[1].reason == "node node-a stopped renewing its lease"
    assert all(a.started_at and a.ended_at for a in job.attempts.values())
    assert job.final is not None
    assert job.final.info is not None
    assert job.final.info["mlagents_version"] == "1.1.0"
    assert job.curve() == [(1000, 0.2), (1500, 0.3)]  # the final attempt's, not the lost one's
    assert job.report_count == 3
    assert job.model_sha256 == "cd" * 32
    assert job.problems == []

    # A history with a hole in it is called out, not silently folded.
    holed = fold(str(job_id), [e for e in events if e["type"] != "Job.Claimed"][:-1])
    assert any("the history has a gap" in p for p in holed.problems)
    assert first_difference(job.curve(), [(1000, 0.2), (1500, 0.31)]) == (
        "report 2: recorded step 1500 reward 0.3, rerun step 1500 reward 0.31"
    )
    assert first_difference(job.curve(), job.curve()[:1]) == (
        "the recorded curve has 2 points, the rerun 1"
    )
