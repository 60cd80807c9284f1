"""One attempt of one job: mlagents-learn in its own directory and ports, watched to its one end.

`JobRun.run()` writes the trainer configuration, resolves the environment build, starts
`python -m trainer.launcher` in a session of its own, turns every stats line the launcher writes
into a Progress report, and ends in exactly one terminal report: Completed (models uploaded),
Failed (crash, bad environment, no progress, time limit, or the node giving the run up) or
Cancelled (the central node asked). Nothing the run started is left running afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
import yaml

from domain.contracts import (
    MAX_STATS,
    Cancelled,
    Completed,
    Dispatch,
    Failed,
    Progress,
    Report,
    Started,
    StartedInfo,
)
from domain.errors import JobSpecError
from trainer import procs
from trainer.archive import ArchiveLimits
from trainer.builds import EnvError, resolve_env, sha256_file
from trainer.launcher import STATS_FILE_ENV
from trainer.modelstore import ModelStore, ModelStoreError, model_key
from trainer.ports import NoFreePortsError, PortAllocator, PortBlock

logger = logging.getLogger(__name__)

PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
LOG_TAIL_BYTES: Final = 4096
MAX_REASON: Final = 4096
RUN_ID: Final = "run"

ReportSink = Callable[[Report], Awaitable[None]]


@dataclass(frozen=True)
class RunnerConfig:
    """What every run on a node shares."""

    runs_root: Path  # each attempt runs in {runs_root}/{job_id}/attempt-{n}/
    builds_dir: Path  # built-in builds are written here; uploaded ones live in {sha256}/
    node_id: str
    watchdog_s: float = 300.0  # no stats line and no log growth this long: the run is stuck
    grace_s: float = 15.0  # after SIGINT, how long the trainer may take to save and exit
    poll_s: float = 0.5
    timeout_wait_s: int | None = None  # mlagents-learn --timeout-wait; None keeps its default
    env_args: tuple[str, ...] = ()  # passed to every build through --env-args
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)  # of uploaded builds
    python: str = sys.executable


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _file_name(text: str) -> str:
    """A model store file name for a behaviour name (keys take letters, digits, '._-')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    return name if name[:1].isalnum() else f"b{name}"


class StatsTail:
    """Reads the complete JSON lines appended to the launcher's stats file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read(self) -> list[dict[str, Any]]:
        """The records appended since the last call (a half-written last line waits)."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        records = []
        for line in data[:end].splitlines():
            if line.strip():
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


class JobRun:
    """One attempt of a job on this node: start it with `run()`, stop it with `cancel()`."""

    def __init__(
        self,
        dispatch: Dispatch,
        config: RunnerConfig,
        ports: PortAllocator,
        store: ModelStore,
        report: ReportSink,
        *,
        first_seq: int = 1,
        on_launch: Callable[[JobRun], Awaitable[None]] | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.config = config
        self.ports = ports
        self.store = store
        self._report = report
        self._on_launch = on_launch
        self._next_seq = first_seq
        # Absolute: the run's processes are found by this path in their command lines.
        self.run_dir = (
            config.runs_root.resolve() / str(dispatch.job_id) / f"attempt-{dispatch.attempt}"
        )
        self.log_file = self.run_dir / "trainer.log"
        self.stats_file = self.run_dir / "stats.jsonl"
        self.results_dir = self.run_dir / "results"
        self.pid: int | None = None
        self.port_block: PortBlock | None = None
        self.command: list[str] = []
        self._stop: str | None = None  # why the run was asked to stop, if it was
        self._cancelled = False  # asked by the central node (else the node gives the run up)
        self._stopping = asyncio.Event()
        self._known: set[psutil.Process] = set()

    @property
    def last_seq(self) -> int:
        """The seq of the last report made (0 before the first)."""
        return self._next_seq - 1

    def _seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _ref(self) -> dict[str, Any]:
        return {
            "job_id": self.dispatch.job_id,
            "attempt": self.dispatch.attempt,
            "node_id": self.config.node_id,
        }

    def _failed(
        self,
        reason: str,
        *,
        exit_code: int | None = None,
        log_tail: str | None = None,
        retryable: bool = False,
    ) -> Failed:
        return Failed(
            **self._ref(),
            seq=self._seq(),
            reason=reason[:MAX_REASON],
            exit_code=exit_code,
            log_tail=log_tail,
            retryable=retryable,
        )

    def cancel(self) -> None:
        """Stop the run because the central node asked: it ends Cancelled."""
        if self._stop is None:
            self._stop, self._cancelled = "cancelled", True
            self._stopping.set()

    def abandon(self, reason: str) -> None:
        """Stop the run because this node gives it up (shutdown): it ends Failed, retryable."""
        if self._stop is None:
            self._stop = reason
            self._stopping.set()

    def _stopped(self) -> Report:
        """The terminal report of a run stopped on request."""
        assert self._stop is not None
        if self._cancelled:
            return Cancelled(**self._ref(), seq=self._seq())
        return self._failed(self._stop, log_tail=self.log_tail(), retryable=True)

    def log_tail(self, size: int = LOG_TAIL_BYTES) -> str:
        """The last `size` bytes of the trainer's log, as text."""
        try:
            with self.log_file.open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - size))
                return file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    async def run(self) -> Report:
        """Run the attempt to its end; report and return its one terminal report."""
        try:
            terminal = await self._run()
        except (OSError, ValueError, yaml.YAMLError) as error:
            # The node's own trouble (disk, model store, a broken stats line): say so.
            logger.exception("run %s failed on the node", self.run_dir)
            terminal = self._failed(
                f"train node error: {type(error).__name__}: {error}", log_tail=self.log_tail()
            )
        finally:
            await asyncio.shield(asyncio.to_thread(self._cleanup))
        await self._report(terminal)
        return terminal

    async def _run(self) -> Report:
        if self._stop is not None:
            return self._stopped()  # stopped before it started
        try:
            spec = self.dispatch.job_spec()
        except JobSpecError as error:
            return self._failed(f"cannot run the job: {error}")
        try:
            # Off the event loop: an uploaded build may be downloaded and unpacked first.
            env_path = await asyncio.to_thread(
                resolve_env,
                spec.env,
                self.config.builds_dir,
                self.store,
                self.config.archive_limits,
            )
        except EnvError as error:
            return self._failed(f"cannot run the job: {error}", retryable=error.retryable)
        if self._stopping.is_set():
            return self._stopped()  # stopped while the build was being fetched
        try:
            self.port_block = self.ports.allocate()
        except NoFreePortsError as error:
            return self._failed(str(error), retryable=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stats_file.unlink(missing_ok=True)  # a rerun of the same attempt starts afresh
        trainer_config = spec.trainer_config()
        config_file = self.run_dir / "config.yaml"
        config_file.write_text(yaml.safe_dump(trainer_config, sort_keys=False))
        build_sha256 = await asyncio.to_thread(sha256_file, env_path)
        self.command = [
            self.config.python,
            "-m",
            "trainer.launcher",
            str(config_file),
            f"--env={env_path}",
            f"--run-id={RUN_ID}",
            f"--results-dir={self.results_dir}",
            f"--seed={spec.seed}",
            f"--num-envs={spec.num_envs}",
            f"--base-port={self.port_block.base}",
            "--no-graphics",
            "--force",
        ]
        if self.config.timeout_wait_s is not None:
            self.command.append(f"--timeout-wait={self.config.timeout_wait_s}")
        if self.config.env_args:
            self.command += ["--env-args", *self.config.env_args]
        pythonpath = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        environ = {
            **os.environ,
            STATS_FILE_ENV: str(self.stats_file),
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",  # the log growing is how the watchdog sees a live trainer
        }
        proc = await asyncio.to_thread(self._spawn, environ)
        self.pid = proc.pid
        try:
            if self._on_launch is not None:
                await self._on_launch(self)
            info = StartedInfo(
                mlagents_version=_version("mlagents"),
                torch_version=_version("torch"),
                python_version=platform.python_version(),
                build_sha256=build_sha256,
                command=self.command,
                config=trainer_config,
            )
            await self._report(Started(**self._ref(), seq=self._seq(), info=info))
            return await self._watch(proc, spec.time_limit_s, spec.behavior_names)
        finally:
            if proc.poll() is None:
                await asyncio.to_thread(self._terminate, proc, 0.0)

    async def _watch(
        self, proc: subprocess.Popen[bytes], time_limit_s: int, behaviors: list[str]
    ) -> Report:
        tail = StatsTail(self.stats_file)
        started = last_activity = time.monotonic()
        sizes = (-1, -1)
        while True:
            self._known |= procs.descendants(proc.pid)
            rc = proc.poll()  # before reading stats, so the last lines are read after the exit
            for record in tail.read():
                await self._progress(record, behaviors)
            if rc is not None:
                break
            now = time.monotonic()
            if self._stop is not None:
                await asyncio.to_thread(self._terminate, proc, self.config.grace_s)
                return self._stopped()
            current = (_size(self.stats_file), _size(self.log_file))
            if current != sizes:
                sizes, last_activity = current, now
            stop: Report | None = None
            if now - last_activity > self.config.watchdog_s:
                stop = self._failed(
                    f"no progress for {self.config.watchdog_s:g} s", log_tail=self.log_tail()
                )
            elif now - started > time_limit_s:
                stop = self._failed(
                    f"time limit of {time_limit_s} s reached", log_tail=self.log_tail()
                )
            if stop is not None:
                await asyncio.to_thread(self._terminate, proc, self.config.grace_s)
                return stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.poll_s)
        if self._stop is not None:
            return self._stopped()  # asked to stop as it was ending
        if rc != 0:
            return self._failed(
                f"mlagents-learn exited with code {rc}", exit_code=rc, log_tail=self.log_tail()
            )
        return await self._complete(behaviors)

    async def _progress(self, record: dict[str, Any], behaviors: list[str]) -> None:
        if record.get("kind") != "summary":
            return
        prefix = f"{record.get('category')}/" if len(behaviors) > 1 else ""
        stats: dict[str, float] = {}
        for key, summary in dict(record.get("stats") or {}).items():
            mean = summary.get("mean") if isinstance(summary, dict) else None
            if isinstance(mean, int | float) and len(stats) < MAX_STATS:
                stats[f"{prefix}{key}"[:256]] = float(mean)
        step = max(0, int(record.get("step", 0)))
        await self._report(Progress(**self._ref(), seq=self._seq(), step=step, stats=stats))

    async def _complete(self, behaviors: list[str]) -> Report:
        results = self.results_dir / RUN_ID
        models = [results / f"{name}.onnx" for name in behaviors]
        missing = [m.name for m in models if not m.is_file()]
        if missing:
            return self._failed(
                f"mlagents-learn exited normally but wrote no {', '.join(missing)}",
                exit_code=0,
                log_tail=self.log_tail(),
            )
        uploads = [(model, f"{_file_name(model.stem)}.onnx") for model in models]
        for name in behaviors:
            checkpoint = results / name / "checkpoint.pt"
            if checkpoint.is_file():
                uploads.append((checkpoint, f"{_file_name(name)}-checkpoint.pt"))
        stored = []
        try:
            for path, filename in uploads:
                key = model_key(self.dispatch.job_id, self.dispatch.attempt, filename)
                stored.append(await asyncio.to_thread(self.store.put_file, key, path))
        except ModelStoreError as error:
            # The model exists on this node but not in the store; another attempt may do better.
            return self._failed(f"could not store the model: {error}", retryable=True)
        primary = stored[0]
        return Completed(
            **self._ref(), seq=self._seq(), model_key=primary.key, model_sha256=primary.sha256
        )

    def _spawn(self, environ: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log_file.open("ab") as log:
            return subprocess.Popen(
                self.command,
                cwd=self.run_dir,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # SIGINT reaches the whole group (trainer and env workers), not the node.
                start_new_session=True,
            )

    def _terminate(self, proc: subprocess.Popen[bytes], grace_s: float) -> None:
        """SIGINT the trainer's group, give it `grace_s` to save and exit, then kill everything."""
        self._known |= procs.descendants(proc.pid)
        procs.signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            procs.signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        procs.kill_all(self._known)

    def _cleanup(self) -> None:
        """Kill whatever of the run is still alive, and give the ports back."""
        # A build closing after a normal end exits by itself within moments; wait for it first.
        psutil.wait_procs([p for p in self._known if p.is_running()], timeout=3)
        leftovers = self._known | procs.mentioning(f"{self.run_dir}{os.sep}")
        survivors = procs.kill_all(leftovers)
        if survivors:
            logger.error("processes of %s survived SIGKILL: %s", self.run_dir, survivors)
        if self.port_block is not None:
            self.port_block.release()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1
