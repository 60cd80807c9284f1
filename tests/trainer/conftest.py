"""Runs the real mlagents-learn (through trainer.launcher) against stand-in builds, and makes sure
no process of a test outlives it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from trainer.standin import builtin_build

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_CHILD_SUBREAPER = 36


def ppo_config(
    behavior: str, max_steps: int, *, summary_freq: int = 1000, hyper: dict[str, Any] | None = None
) -> str:
    """A tiny PPO configuration (32 hidden units, one layer) as YAML text."""
    hyperparameters = {
        "batch_size": 32,
        "buffer_size": 320,
        "learning_rate": 1.0e-2,
        "beta": 1.0e-3,
        "epsilon": 0.2,
        "lambd": 0.95,
        "num_epoch": 3,
        "learning_rate_schedule": "constant",
        **(hyper or {}),
    }
    behavior_config = {
        "trainer_type": "ppo",
        "hyperparameters": hyperparameters,
        "network_settings": {"normalize": False, "hidden_units": 32, "num_layers": 1},
        "reward_signals": {"extrinsic": {"gamma": 0.9, "strength": 1.0}},
        "max_steps": max_steps,
        "time_horizon": 32,
        "summary_freq": summary_freq,
    }
    return yaml.safe_dump({"behaviors": {behavior: behavior_config}})


def free_base_port() -> int:
    """A port that is free now, picked at random so that concurrent test sessions rarely meet.

    It stays below Linux's ephemeral range (32768 and up): a port picked there can be
    taken by any outgoing connection before mlagents-learn binds it.
    """
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


@dataclass
class Run:
    """One mlagents-learn run in its own session, working directory and port."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    run_id: str
    stats_file: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def results(self) -> Path:
        """The run's results directory."""
        return self.workdir / "results" / self.run_id

    def wait(self, timeout: float) -> int:
        """Wait for the trainer to exit; returns its exit code."""
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        """The trainer's console output so far."""
        return (self.workdir / "console.log").read_text(errors="replace")

    def player_log(self) -> str:
        """What the build wrote to its -logFile (all launches of worker 0)."""
        path = self.results / "run_logs" / "Player-0.log"
        return path.read_text() if path.exists() else ""

    def records(self) -> list[dict[str, Any]]:
        """Everything the launcher's stats writer wrote, in order."""
        if not self.stats_file.exists():
            return []
        lines = self.stats_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def summaries(self, behavior: str) -> list[dict[str, Any]]:
        """The stats summaries of `behavior`, in order."""
        return [r for r in self.records() if r["kind"] == "summary" and r["category"] == behavior]

    def reward_curve(self, behavior: str) -> list[tuple[int, float]]:
        """(step, mean cumulative reward) of each summary that had finished episodes."""
        key = "Environment/Cumulative Reward"
        return [
            (r["step"], r["stats"][key]["mean"])
            for r in self.summaries(behavior)
            if key in r["stats"]
        ]


def _set_subreaper(on: bool) -> None:
    # Builds run in their own sessions; if their trainer dies first they are re-parented. As a
    # subreaper, this process inherits them, so they can still be found and killed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    # wait_procs reaps those that are our children, re-parented orphans included.
    psutil.wait_procs(procs, timeout=10)


class Trainers:
    """Starts trainer runs for one test and kills whatever is left of them afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runs: list[Run] = []
        self.me = psutil.Process()
        self.baseline = {p.pid for p in self.me.children(recursive=True)}

    def start(
        self,
        build: str,
        config: str,
        *extra: str,
        seed: int = 1,
        env_args: tuple[str, ...] = (),
        run_id: str = "run",
    ) -> Run:
        """Start `trainer.launcher` with `config` (YAML text) against the stand-in `build`."""
        workdir = self.tmp_path / f"{run_id}-{len(self.runs)}"
        workdir.mkdir()
        (workdir / "config.yaml").write_text(config)
        env_path = builtin_build(build, self.tmp_path / "builds")
        stats_file = workdir / "stats.jsonl"
        args = [
            sys.executable,
            "-m",
            "trainer.launcher",
            "config.yaml",
            f"--env={env_path}",
            f"--run-id={run_id}",
            "--results-dir=results",
            f"--seed={seed}",
            f"--base-port={free_base_port()}",
            "--no-graphics",
            "--force",
            *extra,
        ]
        if env_args:
            args += ["--env-args", *env_args]
        environ = {
            **os.environ,
            "TRAINYARD_STATS_FILE": str(stats_file),
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        with (workdir / "console.log").open("wb") as console:
            proc = subprocess.Popen(
                args,
                cwd=workdir,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = Run(proc, workdir, run_id, stats_file)
        self.runs.append(run)
        return run

    def strays(self) -> list[psutil.Process]:
        """Processes started during this test that still exist (unreaped zombies included)."""
        return [p for p in self.me.children(recursive=True) if p.pid not in self.baseline]

    def leftovers(self, timeout: float = 10.0) -> list[psutil.Process]:
        """Processes of this test still running after up to `timeout` s (zombies reaped)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = []
            for proc in self.strays():
                try:
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        proc.wait(timeout=0)
                    else:
                        alive.append(proc)
                except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def cleanup(self) -> None:
        """Kill every process this test started, however deep, then reap them."""
        for run in self.runs:
            if run.proc.poll() is None:
                # Still unreaped, so its pid cannot name anyone else's process group.
                descendants = psutil.Process(run.proc.pid).children(recursive=True)
                os.killpg(run.proc.pid, signal.SIGKILL)
                _kill_all(descendants)
                run.proc.wait(timeout=10)
        # Builds live in sessions of their own, and orphans were re-parented to this process.
        _kill_all(self.strays())


@pytest.fixture
def trainers(tmp_path: Path) -> Iterator[Trainers]:
    """Starts mlagents-learn runs; afterwards kills them and checks that nothing is left."""
    _set_subreaper(True)
    manager = Trainers(tmp_path)
    try:
        yield manager
    finally:
        manager.cleanup()
        strays = manager.strays()
        _set_subreaper(False)
    assert not strays, f"processes left behind: {[p.cmdline() for p in strays]}"
