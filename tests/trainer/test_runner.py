"""The job runner with the real mlagents-learn and stand-in builds: each run ends once, cleanly."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import psutil
import pytest

from domain.contracts import Cancelled, Completed, Dispatch, Failed, Progress, Report, Started
from domain.spec import EnvRef, JobSpec
from tests.trainer.conftest import free_base_port, ppo_config
from trainer import procs
from trainer.modelstore import LocalModelStore, model_key
from trainer.ports import NoFreePortsError, PortAllocator
from trainer.runner import JobRun, RunnerConfig

NODE = "node-test"
_PR_SET_CHILD_SUBREAPER = 36


def dispatch_for(env: EnvRef, max_steps: int = 1000, *, summary_freq: int = 500) -> Dispatch:
    """A dispatch of a fresh job training Reach for `max_steps`."""
    spec = JobSpec(
        config=ppo_config("Reach", max_steps, summary_freq=summary_freq),
        env=env,
        seed=1,
        time_limit_s=600,
    )
    return Dispatch(job_id=uuid.uuid4(), attempt=1, spec=spec.to_dict())


@dataclass
class Node:
    """What runs share on one test node, and the reports every run made."""

    tmp: Path
    ports: PortAllocator
    store: LocalModelStore
    reports: dict[uuid.UUID, list[Report]] = field(default_factory=dict)

    def config(self, **options: object) -> RunnerConfig:
        return RunnerConfig(
            runs_root=self.tmp / "runs",
            builds_dir=self.tmp / "builds",
            node_id=NODE,
            **options,  # type: ignore[arg-type]
        )

    def job_run(self, dispatch: Dispatch, **options: object) -> JobRun:
        sent = self.reports.setdefault(dispatch.job_id, [])

        async def report(message: Report) -> None:
            sent.append(message)

        return JobRun(dispatch, self.config(**options), self.ports, self.store, report)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A runner's surroundings; afterwards no process of the test may be left."""
    libc = ctypes.CDLL(None, use_errno=True)
    # Orphaned builds are re-parented to this process, where the check below can see them.
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    allocator = PortAllocator(free_base_port() // 20 * 20, blocks=8, lock_dir=tmp_path / "locks")
    try:
        yield Node(tmp_path, allocator, LocalModelStore(tmp_path / "models"))
    finally:
        strays = [p for p in me.children(recursive=True) if p.pid not in before]
        strays += list(procs.mentioning(str(tmp_path / "runs")))
        described = [(p.pid, p.cmdline()) for p in strays if p.is_running()]
        procs.kill_all(strays)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert not described, f"processes left behind: {described}"


def progress_of(reports: list[Report]) -> list[Progress]:
    return [r for r in reports if isinstance(r, Progress)]


@pytest.mark.slow
async def test_a_run_completes_with_a_checked_model_and_ordered_reports(node: Node) -> None:
    dispatch = dispatch_for(EnvRef(builtin="reach"), 1500)
    run = node.job_run(dispatch)

    terminal = await run.run()

    reports = node.reports[dispatch.job_id]
    assert isinstance(terminal, Completed), reports[-1]
    assert reports[-1] == terminal
    assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
    started = reports[0]
    assert isinstance(started, Started)
    assert started.info.mlagents_version == "1.1.0"
    assert started.info.command == run.command
    assert f"--base-port={run.port_block.base}" in run.command  # type: ignore[union-attr]
    assert started.info.config["behaviors"]["Reach"]["network_settings"]["hidden_units"] == 32
    progress = progress_of(reports)
    assert [p.step for p in progress] == [500, 1000, 1500]
    assert all("Environment/Cumulative Reward" in p.stats for p in progress)

    assert terminal.model_key == model_key(dispatch.job_id, 1, "Reach.onnx")
    with node.store.open(terminal.model_key) as reader:
        data = reader.read()
    assert reader.info.sha256 == terminal.model_sha256
    onnx.checker.check_model(onnx.load_from_string(data))
    checkpoint = node.store.stat(model_key(dispatch.job_id, 1, "Reach-checkpoint.pt"))
    assert checkpoint is not None
    assert checkpoint.size > 0


@pytest.mark.slow
async def test_two_runs_at_once_get_disjoint_ports_and_both_complete(node: Node) -> None:
    dispatches = [dispatch_for(EnvRef(builtin="reach"), 1000) for _ in range(2)]
    runs = [node.job_run(d) for d in dispatches]

    terminals = await asyncio.gather(*(run.run() for run in runs))

    assert all(isinstance(t, Completed) for t in terminals), terminals
    first, second = (run.port_block for run in runs)
    assert first is not None
    assert second is not None
    assert abs(first.base - second.base) >= 20
    # Both blocks were given back: the allocator hands out the first one again.
    again = node.ports.allocate()
    assert again.base == node.ports.base
    again.release()


@pytest.mark.slow
async def test_cancel_mid_run_ends_the_process_tree(node: Node) -> None:
    dispatch = dispatch_for(EnvRef(builtin="reach"), 100_000)
    run = node.job_run(dispatch)
    task = asyncio.create_task(run.run())
    while not progress_of(node.reports[dispatch.job_id]):
        assert not task.done(), node.reports[dispatch.job_id]
        await asyncio.sleep(0.2)
    assert run.pid is not None
    tree = procs.descendants(run.pid)
    assert any("--mlagents-port" in p.cmdline() for p in tree)  # the build runs

    run.cancel()
    terminal = await asyncio.wait_for(task, 120)

    assert isinstance(terminal, Cancelled)
    assert [r.seq for r in node.reports[dispatch.job_id]][-1] == terminal.seq
    assert not psutil.pid_exists(run.pid) or psutil.Process(run.pid).status() == "zombie"
    assert not [p for p in tree if p.is_running() and p.status() != "zombie"]


@pytest.mark.slow
async def test_crashing_build_fails_with_exit_code_and_log_tail(node: Node) -> None:
    dispatch = dispatch_for(EnvRef(builtin="reach"), 5000)
    run = node.job_run(
        dispatch, env_args=("--fault", "crash-after", "20"), timeout_wait_s=10, watchdog_s=200
    )

    terminal = await run.run()

    assert isinstance(terminal, Failed), terminal
    assert terminal.exit_code not in (None, 0)
    assert f"exited with code {terminal.exit_code}" in terminal.reason
    assert terminal.log_tail is not None
    assert "Environment shut down with return code 3" in terminal.log_tail
    assert not terminal.retryable


@pytest.mark.slow
async def test_build_that_never_connects_fails_on_the_watchdog(node: Node) -> None:
    dispatch = dispatch_for(EnvRef(builtin="reach"), 5000)
    # mlagents-learn itself would wait 60 s (--timeout-wait) first; the watchdog acts sooner.
    run = node.job_run(dispatch, env_args=("--fault", "never-connect"), watchdog_s=15)

    terminal = await run.run()

    assert isinstance(terminal, Failed), terminal
    assert terminal.reason == "no progress for 15 s"
    assert isinstance(node.reports[dispatch.job_id][0], Started)


@pytest.mark.slow
async def test_a_run_past_its_time_limit_is_stopped_and_fails(node: Node) -> None:
    spec = JobSpec(
        config=ppo_config("Reach", 100_000), env=EnvRef(builtin="reach"), time_limit_s=15
    )
    dispatch = Dispatch(job_id=uuid.uuid4(), attempt=1, spec=spec.to_dict())

    terminal = await node.job_run(dispatch).run()

    assert isinstance(terminal, Failed), terminal
    assert terminal.reason == "time limit of 15 s reached"
    assert not terminal.retryable


async def test_an_uploaded_build_runs_from_its_directory(node: Node) -> None:
    """A build by sha256 is the one executable in {builds_dir}/{sha256}/; here it fails fast."""
    sha = "cd" * 32
    build = node.tmp / "builds" / sha / "Player.x86_64"
    build.parent.mkdir(parents=True)
    build.write_text("#!/bin/sh\necho player starting\nexit 7\n")
    build.chmod(0o755)
    dispatch = dispatch_for(EnvRef(sha256=sha))
    run = node.job_run(dispatch, timeout_wait_s=5)

    terminal = await run.run()

    started = node.reports[dispatch.job_id][0]
    assert isinstance(started, Started)
    assert started.info.build_sha256 == hashlib.sha256(build.read_bytes()).hexdigest()
    assert f"--env={build}" in started.info.command
    assert isinstance(terminal, Failed)
    assert terminal.exit_code not in (None, 0)
    assert "Environment shut down with return code 7" in (terminal.log_tail or "")


def test_port_blocks_are_disjoint_within_and_across_allocators(tmp_path: Path) -> None:
    # Two allocators on one lock directory stand for two node processes on one machine.
    first = PortAllocator(30000, blocks=3, lock_dir=tmp_path)
    second = PortAllocator(30000, blocks=3, lock_dir=tmp_path, first_block=1)
    blocks = [first.allocate(), second.allocate(), first.allocate()]
    assert sorted(b.base for b in blocks) == [30000, 30020, 30040]
    with pytest.raises(NoFreePortsError):
        second.allocate()
    blocks[0].release()
    assert second.allocate().base == 30000


def _not_executable(builds: Path) -> EnvRef:
    (builds / ("ef" * 32)).mkdir(parents=True)
    (builds / ("ef" * 32) / "Player.x86_64").write_text("not executable")
    return EnvRef(sha256="ef" * 32)


@pytest.mark.parametrize(
    ("make_env", "reason"),
    [
        (lambda _: EnvRef(builtin="no-such-env"), "unknown built-in build 'no-such-env'"),
        (lambda _: EnvRef(sha256="ab" * 32), f"build {'ab' * 32} is not on this node"),
        (_not_executable, "expected one executable file"),
    ],
)
async def test_a_bad_env_fails_with_its_reason_and_starts_nothing(
    node: Node, make_env: Callable[[Path], EnvRef], reason: str
) -> None:
    dispatch = dispatch_for(make_env(node.tmp / "builds"))
    run = node.job_run(dispatch)

    terminal = await run.run()

    assert node.reports[dispatch.job_id] == [terminal]
    assert isinstance(terminal, Failed)
    assert terminal.seq == 1
    assert reason in terminal.reason
    assert run.pid is None
    assert not (node.tmp / "runs").exists()
