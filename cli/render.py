"""What the command-line client shows: tables, job details, the live watch view, JSON.

Human output goes through rich (tables, a progress bar on a terminal, one line per report
otherwise); `--json` output is plain JSON on stdout, one document per command (one object
per line for `watch`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

REWARD_KEY: Final = "Environment/Cumulative Reward"
DEFAULT_MAX_STEPS: Final = 500_000  # ML-Agents' own default for a behaviour's max_steps


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr); plain text, lines not wrapped, when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=not terminal,
        width=None if terminal else 200,
    )


def emit_json(value: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def emit_json_line(value: Any) -> None:
    """One JSON object on one line of stdout (a stream of them for `watch --json`)."""
    sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
    sys.stdout.flush()


def reward_of(stats: Mapping[str, Any] | str | None) -> float | None:
    """The mean cumulative reward in a progress report's stats (any behaviour), or None."""
    if isinstance(stats, str):
        try:
            stats = json.loads(stats)
        except ValueError:
            return None
    if not isinstance(stats, Mapping):
        return None
    for key, value in stats.items():
        if (key == REWARD_KEY or key.endswith(f"/{REWARD_KEY}")) and isinstance(value, int | float):
            return float(value)
    return None


def local_time(timestamp: str | None, *, date: bool = False) -> str:
    """An ISO 8601 time as local time (HH:MM:SS, with the date if asked)."""
    if not timestamp:
        return "-"
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


def fmt_reward(value: float | None) -> str:
    """A reward with three decimals, or '-'."""
    return "-" if value is None else f"{value:.3f}"


def fmt_duration(seconds: float | None) -> str:
    """Seconds as H:MM:SS or M:SS."""
    if seconds is None or seconds < 0:
        return "-:--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# --- tables ---------------------------------------------------------------------


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> Table:
    """The `list` table."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("JOB", "STATUS", "ATTEMPT", "NODE", "STEP", "REWARD", "SUBMITTED"):
        table.add_column(column, no_wrap=True)
    for job in jobs:
        latest = job.get("latest") or {}
        step = latest.get("step")
        table.add_row(
            str(job.get("job_id")),
            status_text(str(job.get("status"))),
            str(job.get("attempt", "-")),
            job.get("node_id") or "-",
            "-" if step is None else str(step),
            fmt_reward(reward_of(latest.get("stats"))),
            local_time(job.get("submitted_at"), date=True),
        )
    return table


def status_text(status: str) -> Text:
    """A status, coloured by what it means."""
    style = {
        "completed": "green",
        "failed": "red",
        "cancelled": "yellow",
        "running": "cyan",
        "claimed": "cyan",
    }.get(status, "")
    return Text(status, style=style)


def job_details(job: Mapping[str, Any]) -> Table:
    """The `status` view: one job's fields, one per line."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    latest = job.get("latest") or {}
    rows: list[tuple[str, str | Text]] = [
        ("job", str(job.get("job_id"))),
        ("status", status_text(str(job.get("status")))),
        ("attempt", str(job.get("attempt", "-"))),
        ("node", job.get("node_id") or "-"),
        ("submitted", local_time(job.get("submitted_at"), date=True)),
        ("started", local_time(job.get("started_at"), date=True)),
        ("finished", local_time(job.get("finished_at"), date=True)),
        ("updated", local_time(job.get("updated_at"), date=True)),
    ]
    if latest:
        rows.append(("step", str(latest.get("step"))))
        rows.append(("mean reward", fmt_reward(reward_of(latest.get("stats")))))
    if job.get("cancel_requested"):
        rows.append(("cancel", "requested"))
    if job.get("reason"):
        rows.append(("reason", str(job["reason"])))
    if job.get("model_sha256"):
        rows.append(("model sha256", str(job["model_sha256"])))
    if job.get("projected") is False:
        rows.append(("note", "not on the job board yet: read from the event store"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def event_details(event: Mapping[str, Any]) -> str:
    """The interesting fields of one recorded event, briefly."""
    data: Mapping[str, Any] = event.get("data") or {}
    kind = str(event.get("type", ""))
    if kind == "Job.Submitted":
        spec = data.get("spec") or {}
        env = spec.get("env") or {}
        env_text = ", ".join(f"{k}:{v}" for k, v in env.items())
        return (
            f"client {data.get('client_id')}, env {env_text}, seed {spec.get('seed')}, "
            f"max_steps {spec.get('max_steps') or 'from the config'}"
        )
    if kind == "JobMetrics.Reported":
        reward = reward_of(data.get("stats"))
        return (
            f"attempt {data.get('attempt')} seq {data.get('seq')} step {data.get('step')} "
            f"reward {fmt_reward(reward)}"
        )
    if kind == "Job.Started":
        info = data.get("info") or {}
        return (
            f"attempt {data.get('attempt')}: mlagents {info.get('mlagents_version')}, "
            f"torch {info.get('torch_version')}, build {str(info.get('build_sha256'))[:12]}"
        )
    if kind == "Job.Completed":
        return f"attempt {data.get('attempt')}: model {data.get('model_key')}"
    parts = []
    for key in ("attempt", "node_id", "reason"):
        if data.get(key) is not None:
            parts.append(f"{key} {data[key]}")
    return ", ".join(parts)


def events_table(events: Iterable[Mapping[str, Any]]) -> Table:
    """The `events` table."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("POSITION", "TIME", "EVENT", "DETAILS"):
        table.add_column(column, no_wrap=column != "DETAILS")
    for event in events:
        table.add_row(
            str(event.get("position")),
            local_time(event.get("timestamp"), date=True),
            str(event.get("type")),
            event_details(event),
        )
    return table


def nodes_table(nodes: Iterable[Mapping[str, Any]]) -> Table:
    """The `nodes` table (job ids are shown for the client's own jobs only)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NODE", "SLOTS", "FREE", "STATE", "RUNNING", "YOUR JOBS", "LAST SEEN"):
        table.add_column(column, no_wrap=column != "YOUR JOBS")
    for node in nodes:
        own = node.get("jobs") or []
        jobs = ", ".join(
            f"{r.get('job_id')} (attempt {r.get('attempt')})" if isinstance(r, Mapping) else str(r)
            for r in own
        )
        table.add_row(
            str(node.get("node_id")),
            str(node.get("slots", "-")),
            str(node.get("free_slots", "-")),
            "draining" if node.get("draining") else "ready",
            str(node.get("running_jobs", len(own))),
            jobs or "-",
            local_time(node.get("last_seen")),
        )
    return table


# --- the live view ----------------------------------------------------------------


def max_steps_of(spec: Mapping[str, Any] | None, trainer_config: Mapping[str, Any] | None) -> int:
    """The steps a job trains for: its max_steps, else its behaviours' largest."""
    if spec and isinstance(spec.get("max_steps"), int):
        return int(spec["max_steps"])
    behaviors = (trainer_config or {}).get("behaviors") or {}
    steps = [b.get("max_steps") for b in behaviors.values() if isinstance(b, Mapping)]
    numbers = [int(s) for s in steps if isinstance(s, int | float)]
    return max(numbers) if numbers else DEFAULT_MAX_STEPS


class _ClockColumn(ProgressColumn):
    """Elapsed time and ETA, computed when drawn so they tick between reports."""

    def __init__(self, view: WatchView) -> None:
        super().__init__()
        self.view = view

    def render(self, task: Task) -> Text:
        return Text(f"elapsed {fmt_duration(self.view.elapsed())}  ETA {self.view.eta()}")


class WatchView:
    """Shows a job's stream: a progress bar and status lines (or JSON lines)."""

    def __init__(
        self, out: Console, job_id: str, max_steps: int, *, json_mode: bool, quiet: bool = False
    ) -> None:
        self.out = out
        self.job_id = job_id
        self.max_steps = max(1, max_steps)
        self.json_mode = json_mode
        self.quiet = quiet
        self.live = out.is_terminal and not json_mode and not quiet
        self.started = time.monotonic()
        self.step = 0
        self.reward: float | None = None
        self.status = "connecting"
        self.attempt: int | None = None
        self._rate_origin: tuple[float, int] | None = None  # (time, step) of this attempt
        self._rate: float | None = None
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> WatchView:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[status]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("reward {task.fields[reward]}"),
                _ClockColumn(self),
                console=self.out,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.max_steps, status=self.status, reward="-"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def elapsed(self) -> float:
        """Seconds since the watch began."""
        return time.monotonic() - self.started

    def eta(self) -> str:
        """Time left at the step rate seen in this attempt."""
        if not self._rate or self.step >= self.max_steps:
            return "-:--"
        return fmt_duration((self.max_steps - self.step) / self._rate)

    def line(self, text: str | Text) -> None:
        """A line above the bar (or on its own)."""
        if self.json_mode or self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            self.out.print(text)

    def _refresh(self) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=min(self.step, self.max_steps),
                status=self.status,
                reward=fmt_reward(self.reward),
            )

    def snapshot(self, entry_id: str, job: Mapping[str, Any]) -> None:
        """The job as the stream began."""
        if self.json_mode or self.quiet:
            if not self.quiet:
                emit_json_line({"type": "snapshot", "id": entry_id, "job": job})
            return
        self.status = str(job.get("status"))
        self.attempt = job.get("attempt")
        latest = job.get("latest") or {}
        if latest:
            self.step = int(latest.get("step") or 0)
            self.reward = reward_of(latest.get("stats"))
        node = f" on {job['node_id']}" if job.get("node_id") else ""
        self.line(
            f"job {self.job_id}: {self.status}, attempt {self.attempt}{node}"
            + (f", step {self.step}/{self.max_steps}" if latest else "")
        )
        self._refresh()

    def update(self, entry_id: str, update: Mapping[str, Any]) -> None:
        """One change of the job."""
        if self.json_mode or self.quiet:
            if not self.quiet:
                emit_json_line({"type": "update", "id": entry_id, "update": update})
            return
        kind = str(update.get("type"))
        self.status = str(update.get("status", self.status))
        attempt = update.get("attempt")
        if attempt != self.attempt:
            self.attempt = attempt
            self.step, self.reward, self._rate_origin, self._rate = 0, None, None, None
        if kind == "progress":
            self._progress_update(update)
            return
        when = local_time(update.get("timestamp"))
        text = f"{when}  {kind:<16}" + (f" attempt {attempt}" if attempt else "")
        if update.get("node_id"):
            text += f" on {update['node_id']}"
        if update.get("reason"):
            text += f": {update['reason']}"
        if kind == "completed" and update.get("model_sha256"):
            text += f", model sha256 {update['model_sha256']}"
        self.line(text)
        self._refresh()

    def _progress_update(self, update: Mapping[str, Any]) -> None:
        self.step = int(update.get("step") or 0)
        reward = reward_of(update.get("stats"))
        if reward is not None:
            self.reward = reward
        now = time.monotonic()
        if self._rate_origin is None:
            self._rate_origin = (now, self.step)
        elif now > self._rate_origin[0] and self.step > self._rate_origin[1]:
            self._rate = (self.step - self._rate_origin[1]) / (now - self._rate_origin[0])
        if self._progress is None:
            self.line(
                f"{local_time(update.get('timestamp'))}  step {self.step}/{self.max_steps}  "
                f"mean reward {fmt_reward(reward)}  elapsed {fmt_duration(self.elapsed())}  "
                f"ETA {self.eta()}"
            )
        self._refresh()

    def model(self, sha256: str, size: int, path: str | None) -> None:
        """The pushed model arrived (and was saved to `path`, if any)."""
        if self.json_mode or self.quiet:
            if not self.quiet:
                emit_json_line({"type": "model", "sha256": sha256, "size": size, "path": path})
            return
        where = f", saved to {path}" if path else ""
        self.line(f"model received: {size} bytes, sha256 {sha256} verified{where}")

    def reconnecting(self, reason: str, delay: float, after: str | None) -> None:
        """The connection dropped; the stream resumes after `after`."""
        if self.json_mode or self.quiet:
            if not self.quiet:
                emit_json_line(
                    {"type": "reconnecting", "reason": reason, "delay": delay, "after": after}
                )
            return
        self.line(
            f"connection lost ({reason}); resuming after {after or 'the start'} in {delay:.1f} s"
        )

    def end(self, status: str) -> None:
        """The job ended."""
        self.status = status
        self._refresh()
        if self.json_mode or self.quiet:
            if not self.quiet:
                emit_json_line({"type": "end", "status": status})
            return
        self.line(f"job {self.job_id} {status}")
