"""Train node throughput: the job runner against bare mlagents-learn, and two jobs against one.

(a) steps/s of one job run through the train node's job runner (`JobRun`, a LocalModelStore in a
    temporary directory, reports kept in memory) against the bare command line the runner builds
    (`python -m trainer.launcher CONFIG --env=... --seed ... --base-port ... --no-graphics
    --force`), started in a new session and waited for. Plain `mlagents-learn` is not the
    baseline: with torch 2.13 it fails at its first ONNX export, and without the launcher's
    polling patch it spins a core of its own, so it measures a different trainer, not the
    runner's overhead. The bare run gets the same stats-file variable, so the trainer does the
    same work on both sides and the difference is the runner alone.
(b) total steps/s of two jobs run at once (two JobRuns, disjoint port blocks) against one alone.

Steps/s is max_steps / wall time: for the runner from calling `run()` until it returns its
terminal report (spawn, watching, model upload, cleanup included: what a job costs the node); for
the bare run from `Popen` to the trainer's exit. Both include the trainer's start-up (imports,
handshake), the same on both sides. The rate between the first and the last stats summary is
printed too, as a check that the trainers themselves ran equally fast.
All runs use the stand-in build `reach`, one tiny PPO configuration and one seed; bare, node and
pair runs alternate round by round so that each sees the same machine load; medians are used.

Run: .venv/bin/python bench/trainer.py   (BENCH_MAX_STEPS: steps per job, default 12000)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python bench/trainer.py`, sys.path[0] is bench/, where this file would hide the
# `trainer` package it measures.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass

import psutil
import yaml

from domain.contracts import Completed, Dispatch, Report
from domain.spec import EnvRef, JobSpec
from trainer import procs
from trainer.launcher import STATS_FILE_ENV
from trainer.modelstore import LocalModelStore
from trainer.ports import PortAllocator
from trainer.runner import PROJECT_ROOT, RUN_ID, JobRun, RunnerConfig
from trainer.standin import builtin_build

# A job of about half a minute here: the runner's fixed cost (about 0.3 s to write the run
# directory, resolve the build, upload the model with its sha256 and clean up) is then weighed
# against a run of a realistic share; BENCH_MAX_STEPS changes it.
MAX_STEPS = int(os.environ.get("BENCH_MAX_STEPS", "12000"))
SUMMARY_FREQ = 500
SEED = 1
ROUNDS = 3
_PR_SET_CHILD_SUBREAPER = 36
WARM_UP = "import torch, mlagents.trainers.learn, trainer.launcher"


def target(name: str, measured: float, op: str, goal: float) -> str:
    ok = measured >= goal if op == ">=" else measured <= goal
    return f"TARGET {name} measured={measured:.3f} goal={op}{goal:g} {'PASS' if ok else 'FAIL'}"


# The tests' tiny PPO configuration (tests/trainer/conftest.py, ppo_config).
PPO_CONFIG = {
    "behaviors": {
        "Reach": {
            "trainer_type": "ppo",
            "hyperparameters": {
                "batch_size": 32,
                "buffer_size": 320,
                "learning_rate": 1.0e-2,
                "beta": 1.0e-3,
                "epsilon": 0.2,
                "lambd": 0.95,
                "num_epoch": 3,
                "learning_rate_schedule": "constant",
            },
            "network_settings": {"normalize": False, "hidden_units": 32, "num_layers": 1},
            "reward_signals": {"extrinsic": {"gamma": 0.9, "strength": 1.0}},
            "max_steps": MAX_STEPS,
            "time_horizon": 32,
            "summary_freq": SUMMARY_FREQ,
        }
    }
}


def free_base_port() -> int:
    """A free port below the ephemeral range, picked at random (as the tests pick theirs)."""
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


def job_spec() -> JobSpec:
    return JobSpec(
        config=yaml.safe_dump(PPO_CONFIG),
        env=EnvRef(builtin="reach"),
        seed=SEED,
        time_limit_s=600,
    )


@dataclass
class Phases:
    """Where one trainer's wall time went, and its rate between its first and last summary."""

    startup: float  # start to the first summary
    training: float  # first to last summary
    ending: float  # last summary to the end
    rate: float


def phases(stats_file: Path, start: float, end: float) -> Phases:
    """The phases of a run that began at `start` and ended at `end` (Unix times)."""
    records = [json.loads(line) for line in stats_file.read_text().splitlines() if line.strip()]
    summaries = [r for r in records if r.get("kind") == "summary"]
    assert len(summaries) >= 2, f"{stats_file}: fewer than two summaries"
    first, last = summaries[0], summaries[-1]
    training = float(last["time"]) - float(first["time"])
    return Phases(
        startup=float(first["time"]) - start,
        training=training,
        ending=end - float(last["time"]),
        rate=(last["step"] - first["step"]) / training,
    )


class Bench:
    """The node's surroundings, shared by every run of the bench."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = PortAllocator(free_base_port() // 20 * 20, blocks=8, lock_dir=tmp / "locks")
        self.store = LocalModelStore(tmp / "models")
        self.config = RunnerConfig(
            runs_root=tmp / "runs", builds_dir=tmp / "builds", node_id="bench"
        )
        self.env_path = builtin_build("reach", self.config.builds_dir)
        self.bare_runs = 0

    def bare(self) -> tuple[float, list[Phases]]:
        """One bare trainer run: (steps/s over its wall time, its phases)."""
        self.bare_runs += 1
        workdir = (self.tmp / "bare" / str(self.bare_runs)).resolve()
        workdir.mkdir(parents=True)
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(job_spec().trainer_config(), sort_keys=False))
        stats_file = workdir / "stats.jsonl"
        block = self.ports.allocate()
        command = [
            sys.executable,
            "-m",
            "trainer.launcher",
            str(config_file),
            f"--env={self.env_path}",
            f"--run-id={RUN_ID}",
            f"--results-dir={workdir / 'results'}",
            f"--seed={SEED}",
            "--num-envs=1",
            f"--base-port={block.base}",
            "--no-graphics",
            "--force",
        ]
        environ = {
            **os.environ,
            STATS_FILE_ENV: str(stats_file),
            "PYTHONPATH": str(PROJECT_ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        try:
            with (workdir / "trainer.log").open("wb") as log:
                start, unix_start = time.perf_counter(), time.time()
                proc = subprocess.Popen(
                    command,
                    cwd=workdir,
                    env=environ,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                rc = proc.wait(timeout=600)
                wall, unix_end = time.perf_counter() - start, time.time()
            finally:
                # The trainer's group, then anything of the run that lives elsewhere (the build
                # has a session of its own and names its log under the run's directory).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                if proc.poll() is None:
                    proc.wait()
                procs.kill_all(procs.mentioning(f"{workdir}{os.sep}"))
        finally:
            block.release()
        assert rc == 0, f"bare run exited with {rc}; see {workdir / 'trainer.log'}"
        return MAX_STEPS / wall, [phases(stats_file, unix_start, unix_end)]

    def job_run(self) -> tuple[JobRun, list[Report]]:
        """A runner for a fresh job, and the list its reports go to."""
        reports: list[Report] = []

        async def report(message: Report) -> None:
            reports.append(message)

        dispatch = Dispatch(job_id=uuid.uuid4(), attempt=1, spec=job_spec().to_dict())
        return JobRun(dispatch, self.config, self.ports, self.store, report), reports

    async def node(self, jobs: int) -> tuple[float, list[Phases]]:
        """`jobs` JobRuns at once: (total steps/s over the wall time, each one's phases)."""
        runs = [self.job_run()[0] for _ in range(jobs)]
        start, unix_start = time.perf_counter(), time.time()
        terminals = await asyncio.gather(*(run.run() for run in runs))
        wall, unix_end = time.perf_counter() - start, time.time()
        for run, terminal in zip(runs, terminals, strict=True):
            assert isinstance(terminal, Completed), f"{terminal!r}; see {run.log_file}"
        return jobs * MAX_STEPS / wall, [phases(r.stats_file, unix_start, unix_end) for r in runs]


def figures(label: str, values: list[float], digits: int = 1) -> None:
    listed = ", ".join(f"{v:.{digits}f}" for v in values)
    print(f"{label}: {listed} (median {statistics.median(values):.{digits}f})")


def leftovers(me: psutil.Process) -> list[psutil.Process]:
    """This process's descendants still alive after a few seconds (orphaned builds included)."""
    alive = me.children(recursive=True)
    _gone, alive = psutil.wait_procs(alive, timeout=5)
    return alive


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # Builds whose trainer is gone are re-parented to this process, so none escapes the check.
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = psutil.Process()
    bare: list[float] = []
    node: list[float] = []
    pair: list[float] = []
    runs: dict[str, list[Phases]] = {"bare": [], "node": [], "pair": []}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        bench = Bench(Path(tmp))
        # Not timed: loads torch and mlagents into the page cache, so the first run is not slower.
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", WARM_UP], check=True, cwd=PROJECT_ROOT
        )
        try:
            for round_no in range(1, ROUNDS + 1):
                # Bare and node swap places each round, so neither is always first.
                order = ("bare", "node", "pair") if round_no % 2 else ("node", "bare", "pair")
                for kind in order:
                    if kind == "bare":
                        rate, measured = bench.bare()
                        bare.append(rate)
                    elif kind == "node":
                        rate, measured = asyncio.run(bench.node(1))
                        node.append(rate)
                    else:
                        rate, measured = asyncio.run(bench.node(2))
                        pair.append(rate)
                    runs[kind] += measured
                    split = "; ".join(
                        f"{m.startup:.1f} s + {m.training:.1f} s + {m.ending:.1f} s"
                        for m in measured
                    )
                    print(f"round {round_no} {kind}: {rate:.1f} steps/s ({split})", flush=True)
        finally:
            stray = leftovers(me)
            procs.kill_all(stray)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    load = os.getloadavg()
    print(f"reach, tiny PPO, max_steps={MAX_STEPS}, seed={SEED}, {ROUNDS} rounds")
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    figures("bare launcher, steps/s over wall time", bare)
    figures("node JobRun, steps/s over wall time", node)
    figures("two JobRuns, total steps/s over wall time", pair)
    for kind, measured in runs.items():
        figures(f"{kind}: steps/s between first and last summary", [m.rate for m in measured])
        figures(f"{kind}: s from start to first summary", [m.startup for m in measured])
        figures(f"{kind}: s from first to last summary", [m.training for m in measured])
        figures(f"{kind}: s from last summary to the end", [m.ending for m in measured])
    # Each round's bare and node runs are adjacent in time; their ratio shows how much the load
    # moved the figures from round to round.
    figures("node/bare, per round", [n / b for n, b in zip(node, bare, strict=True)], 3)
    print(f"processes left behind: {len(stray)}")
    ratio = statistics.median(node) / statistics.median(bare)
    print(target("node_vs_bare_steps", ratio, ">=", 0.97))
    print(
        target(
            "two_jobs_vs_one_throughput",
            statistics.median(pair) / statistics.median(node),
            ">=",
            1.7,
        )
    )


if __name__ == "__main__":
    main()
