"""`trainyard audit JOB [--rerun]`: a job's provenance, replayed from its recorded events.

The audit reads the job's whole history (GET /jobs/{id}/events, every page) and folds it here,
in the client, without trusting the job board: the spec, the exact command, versions and build
hash each attempt ran with, every attempt's outcome, the metric series and the model's key and
sha256 all come from the events. The model is then downloaded and checked against the recorded
sha256 (and with `onnx.checker` when onnx is installed). `--rerun` submits the same spec again,
waits for it, and compares the two reward curves value for value.
"""

from __future__ import annotations

import shlex
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cli.client import EXIT_FAILED, EXIT_VERIFY, ApiError, CliError, Gateway, ModelFile
from cli.render import console, emit_json, fmt_reward, local_time, reward_of


@dataclass
class AttemptRecord:
    """One attempt, as its events tell it."""

    number: int
    queued_at: str | None = None
    node_id: str | None = None
    claimed_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    outcome: str = "queued"
    reason: str | None = None
    info: dict[str, Any] | None = None  # what the Started report carried
    reports: list[dict[str, Any]] = field(default_factory=list)  # {seq, step, stats}

    def curve(self) -> list[tuple[int, float]]:
        """(step, mean cumulative reward) of each report that had one, in seq order."""
        points = []
        for report in sorted(self.reports, key=lambda r: r["seq"]):
            reward = reward_of(report["stats"])
            if reward is not None:
                points.append((int(report["step"]), reward))
        return points


@dataclass
class JobRecord:
    """A job folded from its events."""

    job_id: str
    client_id: str | None = None
    job_key: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    max_attempts: int | None = None
    submitted_at: str | None = None
    status: str = "unknown"
    cancel_requested: bool = False
    model_key: str | None = None
    model_sha256: str | None = None
    attempts: dict[int, AttemptRecord] = field(default_factory=dict)
    events: int = 0
    problems: list[str] = field(default_factory=list)

    def attempt(self, number: int) -> AttemptRecord:
        """The record of attempt `number` (made on first mention)."""
        if number not in self.attempts:
            self.attempts[number] = AttemptRecord(number)
        return self.attempts[number]

    @property
    def final(self) -> AttemptRecord | None:
        """The attempt the job ended with (the last one)."""
        return self.attempts[max(self.attempts)] if self.attempts else None

    def curve(self) -> list[tuple[int, float]]:
        """The reward curve of the final attempt."""
        return self.final.curve() if self.final else []

    @property
    def report_count(self) -> int:
        """Progress reports recorded, over every attempt."""
        return sum(len(a.reports) for a in self.attempts.values())


def fold(job_id: str, events: Iterable[Mapping[str, Any]]) -> JobRecord:
    """Replay a job's events (job and metrics streams, in log order) into a JobRecord."""
    job = JobRecord(job_id)
    last_position = 0
    versions: dict[str, int] = {}
    for event in events:
        job.events += 1
        position = int(event.get("position", 0))
        if position <= last_position:
            job.problems.append(f"event at position {position} is out of log order")
        last_position = position
        stream = str(event.get("stream"))
        version = int(event.get("version", 0))
        expected = versions.get(stream, 0) + 1
        if version != expected:
            job.problems.append(
                f"{stream} stream jumps from version {expected - 1} to {version}: "
                "the history has a gap"
            )
        versions[stream] = version
        _apply(job, str(event.get("type")), event.get("data") or {}, event.get("timestamp"))
    if "job" not in versions:
        job.problems.append("the history has no events of the job itself")
    return job


def _apply(job: JobRecord, kind: str, data: Mapping[str, Any], when: str | None) -> None:
    attempt = data.get("attempt")
    record = job.attempt(int(attempt)) if isinstance(attempt, int) else None
    if kind == "Job.Submitted":
        job.client_id = data.get("client_id")
        job.job_key = data.get("job_key")
        job.spec = dict(data.get("spec") or {})
        job.max_attempts = data.get("max_attempts")
        job.submitted_at = when
        job.status = "queued"
    elif kind == "Job.Queued" and record:
        record.queued_at = when
        job.status = "queued"
    elif kind == "Job.Claimed" and record:
        record.node_id = data.get("node_id")
        record.claimed_at = when
        record.outcome = "claimed"
        job.status = "claimed"
    elif kind == "Job.Started" and record:
        record.started_at = when
        record.info = dict(data.get("info") or {})
        if job.status == "claimed":
            record.outcome = "running"
            job.status = "running"
    elif kind == "Job.Completed" and record:
        record.ended_at, record.outcome = when, "completed"
        job.status = "completed"
        job.model_key = data.get("model_key")
        job.model_sha256 = data.get("model_sha256")
    elif kind == "Job.AttemptFailed" and record:
        record.ended_at, record.outcome = when, "failed, retried"
        record.reason = data.get("reason")
    elif kind == "Job.Failed" and record:
        if record.outcome not in ("lease expired",):
            record.ended_at, record.outcome = when, "failed"
        record.reason = data.get("reason")
        job.status = "failed"
    elif kind == "Job.CancelRequested" and record:
        job.cancel_requested = True
        record.reason = data.get("reason")
    elif kind == "Job.Cancelled" and record:
        record.ended_at = record.ended_at or when
        record.outcome = "cancelled"
        job.status = "cancelled"
    elif kind == "Job.LeaseExpired" and record:
        record.ended_at, record.outcome = when, "lease expired"
        record.reason = f"node {data.get('node_id')} stopped renewing its lease"
    elif kind == "JobMetrics.Reported" and record:
        seq = data.get("seq")
        if any(r["seq"] == seq for r in record.reports):
            job.problems.append(f"progress report {attempt}/{seq} is recorded twice")
        record.reports.append({"seq": seq, "step": data.get("step"), "stats": data.get("stats")})
    elif kind == "JobMetrics.Opened":
        pass
    else:
        job.problems.append(f"unrecognised event {kind}")


# --- model and curves -----------------------------------------------------------


@dataclass(frozen=True)
class ModelCheck:
    """What checking the downloaded model found."""

    ok: bool
    size: int
    sha256: str
    onnx: str  # "passed", "not installed", or the checker's error
    path: str | None


def check_model(gateway: Gateway, job: JobRecord, output: Path | None) -> ModelCheck:
    """Download the job's model and check it against the recorded sha256 and onnx.checker."""
    assert job.model_sha256 is not None
    with tempfile.TemporaryDirectory(prefix="trainyard-audit-") as tmp:
        dest = output if output is not None else Path(tmp) / "model.onnx"
        saved: ModelFile = gateway.download_model(job.job_id, dest)
        onnx_result = _onnx_check(saved.path)
        ok = saved.sha256 == job.model_sha256 and onnx_result in ("passed", "not installed")
        return ModelCheck(
            ok, saved.size, saved.sha256, onnx_result, str(output) if output is not None else None
        )


def _onnx_check(path: Path) -> str:
    try:
        import onnx
    except ImportError:
        return "not installed"
    try:
        onnx.checker.check_model(onnx.load(str(path)))
    except Exception as error:  # noqa: BLE001 -- any checker failure is the answer
        return f"failed: {type(error).__name__}: {error}"
    return "passed"


def first_difference(
    recorded: list[tuple[int, float]], rerun: list[tuple[int, float]]
) -> str | None:
    """None if the curves are identical, else where they first differ."""
    for index, (a, b) in enumerate(zip(recorded, rerun, strict=False)):
        if a != b:
            return (
                f"report {index + 1}: recorded step {a[0]} reward {a[1]!r}, "
                f"rerun step {b[0]} reward {b[1]!r}"
            )
    if len(recorded) != len(rerun):
        return f"the recorded curve has {len(recorded)} points, the rerun {len(rerun)}"
    return None


# --- output ------------------------------------------------------------------------


def _env_text(spec: Mapping[str, Any]) -> str:
    env = spec.get("env") or {}
    return ", ".join(f"{k}:{v}" for k, v in env.items()) or "-"


def provenance(job: JobRecord) -> dict[str, Any]:
    """The audit as one JSON-ready object."""
    final = job.final
    info = (final.info if final else None) or {}
    curve = job.curve()
    return {
        "job_id": job.job_id,
        "client_id": job.client_id,
        "status": job.status,
        "submitted_at": job.submitted_at,
        "spec": job.spec,
        "env": job.spec.get("env"),
        "seed": job.spec.get("seed"),
        "build_sha256": info.get("build_sha256"),
        "mlagents_version": info.get("mlagents_version"),
        "torch_version": info.get("torch_version"),
        "python_version": info.get("python_version"),
        "command": info.get("command"),
        "node_id": final.node_id if final else None,
        "effective_config": info.get("config"),
        "attempts": [
            {
                "attempt": a.number,
                "node_id": a.node_id,
                "queued_at": a.queued_at,
                "started_at": a.started_at,
                "ended_at": a.ended_at,
                "outcome": a.outcome,
                "reason": a.reason,
                "reports": len(a.reports),
            }
            for a in sorted(job.attempts.values(), key=lambda a: a.number)
        ],
        "metrics": {
            "reports": job.report_count,
            "first_step": curve[0][0] if curve else None,
            "last_step": curve[-1][0] if curve else None,
            "first_reward": curve[0][1] if curve else None,
            "last_reward": curve[-1][1] if curve else None,
            "curve": [list(p) for p in curve],
        },
        "model_key": job.model_key,
        "model_sha256": job.model_sha256,
        "events": job.events,
        "problems": job.problems,
    }


def print_provenance(out: Console, job: JobRecord, board_status: str | None) -> None:
    """The human-readable audit."""
    final = job.final
    info = (final.info if final else None) or {}
    spec = job.spec
    agree = (
        ""
        if board_status is None
        else (
            ", the job board agrees"
            if board_status == job.status
            else f", but the job board says {board_status}"
        )
    )
    out.print(f"[bold]job[/]         {job.job_id} (client {job.client_id})")
    out.print(f"[bold]status[/]      {job.status}, replayed from {job.events} events{agree}")
    out.print(f"[bold]submitted[/]   {local_time(job.submitted_at, date=True)}")
    out.print(
        f"[bold]spec[/]        env {_env_text(spec)}, seed {spec.get('seed')}, "
        f"max_steps {spec.get('max_steps') or 'from the config'}, num_envs {spec.get('num_envs')}, "
        f"time_limit_s {spec.get('time_limit_s')}"
    )
    out.print(f"[bold]seed[/]        {spec.get('seed')}")
    out.print(f"[bold]build[/]       sha256 {info.get('build_sha256', '- (never started)')}")
    out.print(
        f"[bold]versions[/]    ML-Agents {info.get('mlagents_version', '-')}, "
        f"torch {info.get('torch_version', '-')}, Python {info.get('python_version', '-')}"
    )
    command = info.get("command")
    out.print(f"[bold]node[/]        {final.node_id if final and final.node_id else '-'}")
    out.print(
        f"[bold]command[/]     {shlex.join(command) if isinstance(command, list) else '-'}",
        soft_wrap=True,
    )
    out.print("[bold]trainer configuration[/] (as submitted):")
    for line in str(spec.get("config", "")).rstrip().splitlines():
        out.print(f"    {line}", markup=False, highlight=False)
    out.print("[bold]attempts[/]")
    for a in sorted(job.attempts.values(), key=lambda a: a.number):
        reason = f": {a.reason}" if a.reason else ""
        out.print(
            f"    #{a.number} on {a.node_id or '-'}: queued {local_time(a.queued_at)}, "
            f"started {local_time(a.started_at)}, ended {local_time(a.ended_at)}, "
            f"{a.outcome}{reason} ({len(a.reports)} reports)",
            markup=False,
        )
    curve = job.curve()
    if curve:
        out.print(
            f"[bold]metrics[/]     {job.report_count} reports; steps {curve[0][0]} → "
            f"{curve[-1][0]}; mean reward {fmt_reward(curve[0][1])} → {fmt_reward(curve[-1][1])}"
        )
    else:
        out.print(f"[bold]metrics[/]     {job.report_count} reports, no reward recorded")
    out.print(f"[bold]model[/]       {job.model_key or '-'}")
    if job.model_sha256:
        out.print(f"            sha256 {job.model_sha256}")
    for problem in job.problems:
        out.print(f"[yellow]warning[/]     {problem}", markup=True)


def run_audit(
    gateway: Gateway, job_id: str, *, rerun: bool, output: Path | None, json_mode: bool
) -> None:
    """The `audit` command."""
    out = console()
    job = fold(job_id, gateway.events(job_id))
    try:
        board_status = gateway.job(job_id).get("status")
    except ApiError:
        board_status = None  # the board is only compared with, never needed
    report = provenance(job)
    report["board_status"] = board_status
    if not json_mode:
        print_provenance(out, job, board_status)
    failures: list[tuple[str, int]] = []

    if job.model_sha256 is not None:
        check = check_model(gateway, job, output)
        report["model_check"] = {
            "ok": check.ok,
            "size": check.size,
            "sha256": check.sha256,
            "onnx_checker": check.onnx,
            "path": check.path,
        }
        if not json_mode:
            where = f", kept at {check.path}" if check.path else ""
            out.print(
                f"[bold]verified[/]    {'yes' if check.ok else '[red]NO[/]'}: downloaded "
                f"{check.size} bytes, sha256 {check.sha256} "
                f"{'matches' if check.sha256 == job.model_sha256 else 'DOES NOT match'} "
                f"the recorded one; onnx.checker {check.onnx}{where}"
            )
        if not check.ok:
            failures.append((f"the model of job {job_id} does not verify", EXIT_VERIFY))
    elif not json_mode:
        out.print(f"[bold]verified[/]    no model to verify: the job is {job.status}")

    if rerun:
        failures += _rerun(gateway, job, report, out, json_mode)

    if json_mode:
        emit_json(report)
    if failures:
        message, code = failures[0]
        raise CliError(message, code)


def _rerun(
    gateway: Gateway, job: JobRecord, report: dict[str, Any], out: Console, json_mode: bool
) -> list[tuple[str, int]]:
    from cli.main import follow

    if not job.spec:
        return [("the job's spec is not in its history: nothing to rerun", EXIT_FAILED)]
    request_id = f"audit-rerun-{uuid.uuid4()}"
    new_id = gateway.submit(job.spec, request_id)
    if not json_mode:
        out.print(f"[bold]rerun[/]       submitted job {new_id} with the same spec")
    result = follow(gateway, new_id, json_mode=False, quiet=json_mode)
    rerun_job = fold(new_id, gateway.events(new_id))
    recorded, again = job.curve(), rerun_job.curve()
    difference = first_difference(recorded, again)
    if not recorded and not again:
        difference = "neither run recorded a reward"
    report["rerun"] = {
        "job_id": new_id,
        "status": result.status,
        "identical": difference is None,
        "first_difference": difference,
        "curve": [list(p) for p in again],
        "model_sha256": rerun_job.model_sha256,
    }
    if not json_mode:
        if difference is None:
            out.print(
                f"[bold]rerun[/]       identical: {len(again)} reward points, "
                f"{fmt_reward(again[0][1])} → {fmt_reward(again[-1][1])}"
            )
        else:
            out.print(f"[bold]rerun[/]       [red]differs[/]: {difference}")
        if rerun_job.model_sha256 and job.model_sha256:
            same = rerun_job.model_sha256 == job.model_sha256
            out.print(
                "            the rerun's model is "
                + ("byte-identical" if same else f"not byte-identical ({rerun_job.model_sha256})")
            )
    failures = []
    if result.status != "completed":
        failures.append((f"the rerun {new_id} {result.status}", EXIT_FAILED))
    if difference is not None:
        failures.append((f"the rerun's reward curve differs: {difference}", EXIT_VERIFY))
    return failures
