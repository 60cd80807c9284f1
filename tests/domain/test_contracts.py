"""The message contracts refuse what a train node must never send, and round-trip what it may."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import pytest
from pydantic import TypeAdapter, ValidationError

from domain.contracts import (
    AnyControl,
    AnyReport,
    Cancel,
    Completed,
    Dispatch,
    Drain,
    Failed,
    Heartbeat,
    Progress,
    Topology,
)
from domain.spec import parse_job_spec

REPORTS: TypeAdapter[Any] = TypeAdapter(AnyReport)
BASE: dict[str, Any] = {"job_id": str(uuid4()), "attempt": 1, "node_id": "node-1", "seq": 1}


def test_a_report_is_parsed_by_its_kind() -> None:
    report = REPORTS.validate_json(
        Progress(**BASE, step=10, stats={"Environment/Cumulative Reward": 1.5}).model_dump_json()
    )
    assert isinstance(report, Progress)
    assert report.stats == {"Environment/Cumulative Reward": 1.5}
    control = TypeAdapter(AnyControl).validate_json(Drain().model_dump_json())
    assert isinstance(control, Drain)
    cancel = TypeAdapter(AnyControl).validate_python(
        {"kind": "cancel", "job_id": BASE["job_id"], "attempt": 2}
    )
    assert isinstance(cancel, Cancel)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"kind": "progress", "step": 1, "stats": {"x": float("nan")}}, "finite"),
        ({"kind": "progress", "step": 1, "stats": {}, "extra": 1}, "Extra inputs"),
        ({"kind": "progress", "step": 1, "stats": {}, "seq": 0}, "greater than or equal to 1"),
        ({"kind": "completed", "model_key": "m", "model_sha256": "AB" * 32}, "pattern"),
        ({"kind": "failed", "reason": "x", "log_tail": "x" * (64 * 1024 + 1)}, "at most"),
        ({"kind": "started", "info": {}}, "Field required"),
        ({"kind": "rumour"}, "does not match any of the expected tags"),
        ({"kind": "cancelled", "node_id": "no spaces"}, "pattern"),
        ({"kind": "cancelled", "job_id": "42"}, "UUID"),
        ({"kind": "cancelled", "attempt": "1"}, "valid integer"),
        ({"kind": "progress", "step": 1.5, "stats": {}}, "valid integer"),
        ({"kind": "progress", "step": 1, "stats": {"x": "1.5"}}, "valid number"),
        ({"kind": "failed", "reason": "x", "retryable": "yes"}, "valid boolean"),
    ],
)
def test_invalid_reports_are_refused_with_the_reason(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        REPORTS.validate_python({**BASE, **fields})


def test_completed_and_failed_carry_their_details() -> None:
    done = Completed(**BASE, model_key="models/a.onnx", model_sha256="0" * 64)
    assert Completed.model_validate_json(done.model_dump_json()) == done
    failed = Failed(**BASE, reason="exit 1", exit_code=1, log_tail="Traceback ...")
    assert failed.retryable is False


def test_a_heartbeat_cannot_have_more_free_slots_than_slots() -> None:
    with pytest.raises(ValidationError, match="free_slots cannot exceed slots"):
        Heartbeat(node_id="node-1", slots=1, free_slots=2)


def test_a_dispatch_carries_a_spec_that_parses_back() -> None:
    spec = parse_job_spec(
        {
            "config": "behaviors:\n  A:\n    trainer_type: ppo\n",
            "env": {"builtin": "reach"},
            "seed": 3,
        }
    )
    dispatch = Dispatch(job_id=uuid4(), attempt=1, spec=spec.to_dict())
    assert Dispatch.model_validate_json(dispatch.model_dump_json()).job_spec() == spec


def test_topology_prefixes_every_name() -> None:
    topology = Topology("t1.")
    names = [
        *topology.work_queues,
        topology.dead_letter_queue,
        topology.dead_letter_exchange,
        topology.control_exchange,
        topology.control_queue("node-1"),
    ]
    assert all(name.startswith("t1.trainyard.") for name in names)
    assert len(set(names)) == len(names)
    assert topology.work_queue_arguments()["x-dead-letter-exchange"] == "t1.trainyard.dlx"
