"""Jobs run through the train node daemon learn: the reward rises and the model is valid ONNX.

The configurations and thresholds are those of the bare mlagents-learn learning test
(`test_standin.LEARNING`); here the job goes through the event store, the dispatch queue, the
node's claim, its runner and the central handlers, and the curve is read back from the job's
recorded progress reports. One run per build serves both assertions.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import onnx
import pytest
from faststream import TestApp

from domain.contracts import Dispatch
from domain.job import JobStatus
from domain.metrics import JobMetrics, metrics_id_for
from domain.spec import EnvRef, JobSpec
from tests.trainer.conftest import ppo_config
from tests.trainer.test_node import Setup, installation, model_settings
from tests.trainer.test_standin import LEARNING
from trainer.node import create_app as create_node
from trainer.standin.envs import ENVIRONMENTS

pytestmark = pytest.mark.slow

REWARD = "Environment/Cumulative Reward"


def recorded_progress(setup: Setup, job_id: uuid.UUID) -> list[tuple[int, dict[str, float]]]:
    """(step, stats) of every progress report recorded for the job, in order."""
    events = setup.jobs.repository.event_store.get(metrics_id_for(job_id))
    return [(e.step, e.stats) for e in events if isinstance(e, JobMetrics.Reported)]


@pytest.mark.parametrize("build", sorted(LEARNING))
async def test_a_job_through_the_node_learns_the_build(tmp_path: Path, build: str) -> None:
    behavior, max_steps, hyper, final_above, rise_above = LEARNING[build]
    spec = JobSpec(
        config=ppo_config(behavior, max_steps, hyper=hyper), env=EnvRef(builtin=build), seed=1
    )
    async with installation(tmp_path) as setup:
        job_id = await asyncio.to_thread(setup.jobs.submit, spec, "client-1")
        async with TestApp(create_node(setup.node, model_settings(setup))):
            await setup.dispatch(Dispatch(job_id=job_id, attempt=1, spec=spec.to_dict()))
            job = await setup.wait_job(job_id, lambda j: j.status.is_terminal, "the job to end")

        assert job.status is JobStatus.COMPLETED, job.reason
        assert job.model_key is not None
        with setup.models.open(job.model_key) as reader:
            model = reader.read()
        assert reader.info.sha256 == job.model_sha256
        onnx.checker.check_model(onnx.load_from_string(model))

        progress = await asyncio.to_thread(recorded_progress, setup, job_id)
        assert [step for step, _ in progress] == list(range(1000, max_steps + 1, 1000))
        curve = [stats[REWARD] for _, stats in progress if REWARD in stats]
        assert len(curve) == len(progress), progress
        first, last = curve[0], curve[-1]
        assert last > final_above, curve
        assert last - first > rise_above, curve
        # The build's own statistic came through the stats side channel into every report.
        assert all(ENVIRONMENTS[build].stat_key in stats for _, stats in progress)
        assert setup.leftovers() == []
