"""The handlers app on the real RabbitMQ, Redis and event store: what a train node's messages do."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from uuid import UUID, uuid4

from domain.application import JobsApplication
from domain.contracts import (
    REASON_HEADER,
    AttemptRef,
    Cancelled,
    ClaimReply,
    ClaimRequest,
    Completed,
    Failed,
    Heartbeat,
    Progress,
    Started,
    StartedInfo,
)
from domain.job import Job, JobStatus
from domain.metrics import JobMetrics
from domain.spec import parse_job_spec
from tests.handlers.conftest import Central, eventually

CONFIG = """
behaviors:
  Reach:
    trainer_type: ppo
    max_steps: 5000
"""
SHA = "ab" * 32
NODE = "node-1"


def submit(jobs: JobsApplication) -> UUID:
    spec = parse_job_spec({"config": CONFIG, "env": {"builtin": "reach"}, "seed": 1})
    return jobs.submit(spec, client_id="client-a")


def history(jobs: JobsApplication, aggregate_id: UUID) -> list[str]:
    return [type(e).__name__ for e in jobs.repository.event_store.get(aggregate_id)]


def info() -> StartedInfo:
    return StartedInfo(
        mlagents_version="1.1.0",
        torch_version="2.13.0",
        python_version="3.11.9",
        build_sha256=SHA,
        command=["mlagents-learn", "config.yaml", "--no-graphics"],
        config={"behaviors": {"Reach": {"trainer_type": "ppo"}}},
    )


def started(job_id: UUID, seq: int = 1, attempt: int = 1) -> Started:
    return Started(job_id=job_id, attempt=attempt, node_id=NODE, seq=seq, info=info())


def progress(job_id: UUID, seq: int, attempt: int = 1) -> Progress:
    stats = {"Environment/Cumulative Reward": seq * 0.5, "Losses/Value Loss": 0.1}
    return Progress(
        job_id=job_id, attempt=attempt, node_id=NODE, seq=seq, step=seq * 100, stats=stats
    )


def completed(job_id: UUID, seq: int) -> Completed:
    return Completed(
        job_id=job_id,
        attempt=1,
        node_id=NODE,
        seq=seq,
        model_key=f"models/{job_id}.onnx",
        model_sha256=SHA,
    )


async def claim(central: Central, job_id: UUID, node_id: str = NODE) -> ClaimReply:
    request = ClaimRequest(job_id=job_id, attempt=1, node_id=node_id)
    reply = await central.client.request(request, queue=central.topology.claims, timeout=30)
    return ClaimReply.model_validate_json(reply.body)


async def wait_status(central: Central, job_id: UUID, status: JobStatus) -> None:
    await eventually(lambda: central.jobs.get_job(job_id).status is status, f"job {status}")


async def test_a_whole_lifecycle_lands_as_events_in_order(central: Central) -> None:
    job_id = submit(central.jobs)
    assert (await claim(central, job_id)).granted
    messages: list[Any] = [started(job_id, 1), *(progress(job_id, s) for s in (2, 3, 4))]
    messages.append(completed(job_id, 5))
    for message in messages:
        await central.publish(message, central.topology.reports)

    await wait_status(central, job_id, JobStatus.COMPLETED)
    assert history(central.jobs, job_id) == [
        "Submitted",
        "Queued",
        "Claimed",
        "Started",
        "Completed",
    ]
    metrics = central.jobs.repository.event_store.get(central.jobs.get_metrics(job_id).id)
    assert [(e.seq, e.step) for e in metrics if isinstance(e, JobMetrics.Reported)] == [
        (2, 200),
        (3, 300),
        (4, 400),
    ]
    job = central.jobs.get_job(job_id)
    assert (job.node_id, job.model_key, job.model_sha256) == (NODE, f"models/{job_id}.onnx", SHA)
    assert await central.dead_letters() == []


async def test_every_message_delivered_twice_changes_nothing_the_second_time(
    central: Central,
) -> None:
    job_id = submit(central.jobs)
    assert (await claim(central, job_id)).granted
    assert (await claim(central, job_id)).granted  # a redelivered claim from the holder
    for message in (started(job_id, 1), progress(job_id, 2), progress(job_id, 3)):
        for _ in range(2):
            await central.publish(message, central.topology.reports)
    failed = Failed(
        job_id=job_id,
        attempt=1,
        node_id=NODE,
        seq=4,
        reason="Unity crashed",
        exit_code=134,
        log_tail="Segmentation fault\n",
        retryable=False,
    )
    for _ in range(2):
        await central.publish(failed, central.topology.reports)
    # A marker behind the duplicates: once it is handled, every duplicate before it was too.
    other = submit(central.jobs)
    assert (await claim(central, other)).granted
    await central.publish(started(other, 1), central.topology.reports)
    await wait_status(central, other, JobStatus.RUNNING)

    assert history(central.jobs, job_id) == ["Submitted", "Queued", "Claimed", "Started", "Failed"]
    assert central.jobs.get_metrics(job_id).count == 2
    failed_event = list(central.jobs.repository.event_store.get(job_id))[-1]
    assert isinstance(failed_event, Job.Failed)
    assert failed_event.details["exit_code"] == 134
    assert await central.dead_letters() == []


async def test_reports_of_one_attempt_out_of_order(central: Central) -> None:
    job_id = submit(central.jobs)
    assert (await claim(central, job_id)).granted
    # Sent 1..6 by the node; arrive 3, 2, 1, 5 (final), 4 (sent before the final one), 6.
    late = Progress(job_id=job_id, attempt=1, node_id=NODE, seq=6, step=600, stats={})
    for message in (
        progress(job_id, 3),
        progress(job_id, 2),
        started(job_id, 1),
        completed(job_id, 5),
        progress(job_id, 4),
        late,
    ):
        await central.publish(message, central.topology.reports)
    await wait_status(central, job_id, JobStatus.COMPLETED)
    await eventually(lambda: central.jobs.get_metrics(job_id).count == 3, "progress 2, 3, 4")

    assert history(central.jobs, job_id) == [
        "Submitted",
        "Queued",
        "Claimed",
        "Started",
        "Completed",
    ]
    metrics = central.jobs.repository.event_store.get(central.jobs.get_metrics(job_id).id)
    assert sorted(e.seq for e in metrics if isinstance(e, JobMetrics.Reported)) == [
        2,
        3,
        4,
    ]  # 6 came after the end
    assert await central.dead_letters() == []


async def test_concurrent_claims_from_two_nodes_grant_exactly_one(central: Central) -> None:
    for _ in range(3):
        job_id = submit(central.jobs)
        replies = await asyncio.gather(*(claim(central, job_id, n) for n in ("node-a", "node-b")))
        granted = [n for n, r in zip(("node-a", "node-b"), replies, strict=True) if r.granted]
        assert len(granted) == 1
        refused = next(r for r in replies if not r.granted)
        assert "already claimed" in refused.reason
        assert central.jobs.get_job(job_id).node_id == granted[0]
        assert history(central.jobs, job_id).count("Claimed") == 1
    unknown = uuid4()
    refused = await claim(central, unknown)
    assert not refused.granted
    assert refused.reason == f"job {unknown}: not found"


async def test_poison_messages_are_dead_lettered_with_their_reason(central: Central) -> None:
    reports = central.topology.reports
    job_id = submit(central.jobs)
    assert (await claim(central, job_id)).granted
    unknown = uuid4()
    bad_progress = {
        "kind": "progress",
        "job_id": str(job_id),
        "attempt": 1,
        "node_id": NODE,
        "seq": 2,
        "step": -1,
        "stats": {},
    }
    await central.publish(b"{not json", reports, content_type="application/json")
    await central.publish(
        json.dumps(bad_progress).encode(), reports, content_type="application/json"
    )
    await central.publish(started(unknown), reports)
    # Confirming a cancellation nobody asked for breaks a lifecycle rule.
    await central.publish(Cancelled(job_id=job_id, attempt=1, node_id=NODE, seq=3), reports)
    await central.publish(b"\x00\x01", central.topology.claims)
    await central.publish(started(job_id), reports)  # the handler still serves good messages
    await wait_status(central, job_id, JobStatus.RUNNING)

    letters = await central.wait_dead_letters(5)
    reasons = sorted(str((m.headers or {})[REASON_HEADER]) for m in letters)
    assert len(reasons) == 5
    assert any("not JSON" in r for r in reasons), reasons
    assert any("step: Input should be greater than or equal to 0" in r for r in reasons), reasons
    assert any(f"JobNotFoundError: job {unknown}: not found" in r for r in reasons), reasons
    assert any("InvalidTransitionError" in r for r in reasons), reasons
    by_body = {m.body: m for m in letters}
    assert b"{not json" in by_body
    assert by_body[b"\x00\x01"].headers["x-trainyard-queue"] == central.topology.claims
    assert history(central.jobs, job_id)[-1] == "Started"


async def test_heartbeats_set_presence_and_lease_keys_with_ttls(central: Central) -> None:
    job_a, job_b = uuid4(), uuid4()
    beat = Heartbeat(
        node_id=NODE,
        slots=2,
        free_slots=0,
        running=[AttemptRef(job_id=job_a, attempt=1), AttemptRef(job_id=job_b, attempt=2)],
    )
    events_before = central.jobs.recorder.max_notification_id()
    await central.publish(beat, central.topology.heartbeats)
    prefix = central.settings.redis_key_prefix
    node_key = f"{prefix}node:{NODE}"

    async def node_is_live() -> bool:
        return bool(await central.redis.exists(node_key))

    await eventually(node_is_live, "the node key")

    stored = await central.redis.get(node_key)
    assert stored is not None
    assert Heartbeat.model_validate_json(stored) == beat
    assert 0 < await central.redis.ttl(node_key) <= central.settings.node_ttl_s
    for job_id, attempt in ((job_a, 1), (job_b, 2)):
        lease = f"{prefix}lease:{job_id}:{attempt}"
        assert await central.redis.get(lease) == NODE.encode()
        assert 0 < await central.redis.ttl(lease) <= central.settings.lease_ttl_s
    assert central.jobs.recorder.max_notification_id() == events_before  # not events
