"""A train node with two slots runs two jobs at once, each on its own ports."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from faststream import TestApp

from domain.contracts import Dispatch
from domain.job import Job, JobStatus
from domain.spec import EnvRef, JobSpec
from tests.trainer.conftest import ppo_config
from tests.trainer.test_node import Setup, installation, model_settings
from trainer.node import create_app as create_node

pytestmark = pytest.mark.slow


def submit(setup: Setup, build: str, behavior: str) -> Dispatch:
    """A short job on a stand-in build, as the projections would dispatch it."""
    spec = JobSpec(
        config=ppo_config(behavior, 1000, summary_freq=500), env=EnvRef(builtin=build), seed=5
    )
    job_id = setup.jobs.submit(spec, "client-1")
    return Dispatch(job_id=job_id, attempt=1, spec=spec.to_dict())


def lifecycle(setup: Setup, job_id: uuid.UUID) -> list[Job.Event]:
    """The job's events in the order the event store recorded them."""
    events = list(setup.jobs.repository.event_store.get(job_id))
    return [e for e in events if isinstance(e, Job.Event)]


def base_port(started: Job.Started) -> int:
    (flag,) = [arg for arg in started.info["command"] if arg.startswith("--base-port=")]
    return int(flag.removeprefix("--base-port="))


async def test_two_slots_run_two_jobs_at_the_same_time_on_disjoint_ports(tmp_path: Path) -> None:
    async with installation(tmp_path) as setup:
        settings = setup.node.model_copy(update={"trainer_slots": 2})
        async with TestApp(create_node(settings, model_settings(setup))):
            dispatches = [submit(setup, "reach", "Reach"), submit(setup, "gridgoal", "GridGoal")]
            for dispatch in dispatches:
                await setup.dispatch(dispatch)
            jobs = [
                await setup.wait_job(d.job_id, lambda j: j.status.is_terminal, "the job to end")
                for d in dispatches
            ]
        assert [job.status for job in jobs] == [JobStatus.COMPLETED] * 2, [j.reason for j in jobs]
        assert {job.node_id for job in jobs} == {settings.node_id}

        intervals = []
        ports = []
        for dispatch in dispatches:
            events = await asyncio.to_thread(lifecycle, setup, dispatch.job_id)
            (started,) = [e for e in events if isinstance(e, Job.Started)]
            (completed,) = [e for e in events if isinstance(e, Job.Completed)]
            intervals.append((started.timestamp, completed.timestamp))
            ports.append(base_port(started))
        (start_a, end_a), (start_b, end_b) = intervals
        # Each started before the other completed: the two runs overlapped.
        assert start_a < end_b
        assert start_b < end_a
        # Each run got its own block of 20 ports.
        assert abs(ports[0] - ports[1]) >= 20
        assert setup.leftovers() == []
