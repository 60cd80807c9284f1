"""Messages between the central node and the train nodes over RabbitMQ, and where they go.

Both sides import this module, so it holds only data: pydantic models, queue and
exchange names, and the queue arguments every declarer must agree on (RabbitMQ
refuses to redeclare a queue with other arguments). No I/O, no event store.

Every message names its job and attempt; reports also carry a per-attempt
sequence number (the node counts from 1 for each attempt it runs, over all its
reports of that attempt), so a redelivered or repeated report changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from domain.spec import JobSpec, parse_job_spec

# --- names ------------------------------------------------------------------

DISPATCH_QUEUE: Final = "trainyard.dispatch"  # central -> any train node
CLAIMS_QUEUE: Final = "trainyard.claims"  # train node -> central, request/reply
REPORTS_QUEUE: Final = "trainyard.reports"  # train node -> central: lifecycle and progress
HEARTBEATS_QUEUE: Final = "trainyard.heartbeats"  # train node -> central: presence, leases
CONTROL_EXCHANGE: Final = "trainyard.control"  # central -> one node, routing key = node id
CONTROL_QUEUE_PREFIX: Final = "trainyard.control."  # + node id: each node's own queue
DEAD_LETTER_EXCHANGE: Final = "trainyard.dlx"  # fanout: everything that could not be processed
DEAD_LETTER_QUEUE: Final = "trainyard.dead"

# Headers on a dead-lettered message, set by whoever gave up on it.
REASON_HEADER: Final = "x-trainyard-reason"
SOURCE_QUEUE_HEADER: Final = "x-trainyard-queue"

# A message is delivered at most DELIVERY_LIMIT + 1 times before RabbitMQ dead-letters it.
DELIVERY_LIMIT: Final = 5


@dataclass(frozen=True)
class Topology:
    """The broker names of one Trainyard installation; `prefix` keeps installations apart."""

    prefix: str = ""

    @property
    def dispatch(self) -> str:
        """The queue of jobs waiting for a train node."""
        return self.prefix + DISPATCH_QUEUE

    @property
    def claims(self) -> str:
        """The queue of claims (request/reply)."""
        return self.prefix + CLAIMS_QUEUE

    @property
    def reports(self) -> str:
        """The queue of train-node reports."""
        return self.prefix + REPORTS_QUEUE

    @property
    def heartbeats(self) -> str:
        """The queue of train-node heartbeats."""
        return self.prefix + HEARTBEATS_QUEUE

    @property
    def control_exchange(self) -> str:
        """The direct exchange of control messages, routed by node id."""
        return self.prefix + CONTROL_EXCHANGE

    def control_queue(self, node_id: str) -> str:
        """The control queue of one train node."""
        return self.prefix + CONTROL_QUEUE_PREFIX + node_id

    @property
    def dead_letter_exchange(self) -> str:
        """The fanout exchange every work queue dead-letters into."""
        return self.prefix + DEAD_LETTER_EXCHANGE

    @property
    def dead_letter_queue(self) -> str:
        """The queue holding every dead-lettered message, with its reason."""
        return self.prefix + DEAD_LETTER_QUEUE

    @property
    def work_queues(self) -> tuple[str, ...]:
        """The shared quorum queues (not the per-node control queues)."""
        return (self.dispatch, self.claims, self.reports, self.heartbeats)

    def work_queue_arguments(self) -> dict[str, Any]:
        """Arguments of every work queue: quorum, bounded redelivery, dead-lettered."""
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead_letter_exchange,
        }


# --- field types ------------------------------------------------------------

NodeId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"),
    Field(description="The train node's id: letters, digits and _.:- (at most 128)"),
]
# Numbers and flags are strict: a JSON string or float where an integer belongs is a bug upstream.
Attempt = Annotated[
    int, Field(strict=True, ge=1, le=1000, description="The job's attempt number, from 1")
]
Seq = Annotated[
    int,
    Field(strict=True, ge=1, le=2**53, description="Per-attempt sequence number of the report"),
]
Sha256 = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="A SHA-256 digest, 64 lowercase hex digits"),
]
Text = Annotated[str, StringConstraints(max_length=4096)]
StatName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
MAX_LOG_TAIL: Final = 64 * 1024
MAX_STATS: Final = 256


class Message(BaseModel):
    """Base of every contract: unknown fields are refused; numbers and flags are strict."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class AttemptRef(Message):
    """One attempt of one job."""

    job_id: UUID = Field(description="The job's id")
    attempt: Attempt


# --- dispatch and claim -----------------------------------------------------


class Dispatch(AttemptRef):
    """A queued attempt, offered to whichever train node claims it first."""

    spec: dict[str, Any] = Field(description="The job spec, as JobSpec.to_dict()")

    def job_spec(self) -> JobSpec:
        """The validated spec; raises JobSpecError."""
        return parse_job_spec(self.spec)


class ClaimRequest(AttemptRef):
    """A train node asks to run an attempt it took from the dispatch queue."""

    node_id: NodeId


class ClaimReply(Message):
    """The central node's answer: only a granted claim may run."""

    granted: bool = Field(strict=True, description="Whether the node may run the attempt")
    reason: Text = Field("", description="Why the claim was refused (empty when granted)")


# --- reports ----------------------------------------------------------------


class Report(AttemptRef):
    """Base of the reports a node sends about an attempt it holds."""

    node_id: NodeId
    seq: Seq


class StartedInfo(Message):
    """What exactly runs, recorded for a reproducibility audit."""

    mlagents_version: Text = Field(description="mlagents package version")
    torch_version: Text = Field(description="torch package version")
    python_version: Text = Field(description="Python version of the trainer")
    build_sha256: Sha256 = Field(description="SHA-256 of the Unity build (or stand-in) run")
    command: list[Text] = Field(max_length=256, description="The mlagents-learn argument list")
    config: dict[str, Any] = Field(description="The effective trainer configuration")


class Started(Report):
    """The node started training the attempt."""

    kind: Literal["started"] = Field("started", description="Report type")
    info: StartedInfo = Field(description="What runs, for the audit")


class Progress(Report):
    """A training progress report: the trainer's step and its summary statistics."""

    kind: Literal["progress"] = Field("progress", description="Report type")
    step: int = Field(
        strict=True, ge=0, le=2**53, description="Trainer step the statistics belong to"
    )
    stats: dict[StatName, Annotated[float, Field(strict=True)]] = Field(
        max_length=MAX_STATS, description="Statistic name -> finite value (ML-Agents StatsWriter)"
    )

    @field_validator("stats")
    @classmethod
    def _finite(cls, stats: dict[str, float]) -> dict[str, float]:
        bad = sorted(name for name, value in stats.items() if not math.isfinite(value))
        if bad:
            raise ValueError(f"values must be finite numbers: {', '.join(bad)}")
        return stats


class Completed(Report):
    """The attempt trained to the end and its model is in the model store."""

    kind: Literal["completed"] = Field("completed", description="Report type")
    model_key: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="Key of the .onnx model in the model store"
    )
    model_sha256: Sha256 = Field(description="SHA-256 of the model file")


class Failed(Report):
    """The attempt failed: the trainer or Unity crashed, or the node gave it up."""

    kind: Literal["failed"] = Field("failed", description="Report type")
    reason: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = Field(
        description="Why it failed, for a human"
    )
    exit_code: int | None = Field(
        None, strict=True, description="Exit code of the process that failed"
    )
    log_tail: Annotated[str, StringConstraints(max_length=MAX_LOG_TAIL)] | None = Field(
        None, description="The end of the run's log (at most 64 KiB of text)"
    )
    retryable: bool = Field(
        False,
        strict=True,
        description="Whether another attempt could succeed (e.g. the node shut down)",
    )


class Cancelled(Report):
    """The node stopped the attempt because it was asked to cancel it."""

    kind: Literal["cancelled"] = Field("cancelled", description="Report type")


AnyReport = Annotated[
    Started | Progress | Completed | Failed | Cancelled,
    Field(discriminator="kind", description="A report about one attempt"),
]


# --- heartbeats and control -------------------------------------------------


class Heartbeat(Message):
    """A train node is alive: its slots and the attempts it runs (renews their leases)."""

    node_id: NodeId
    slots: int = Field(strict=True, ge=0, le=1024, description="Jobs the node can run at once")
    free_slots: int = Field(strict=True, ge=0, le=1024, description="Slots not in use")
    running: list[AttemptRef] = Field(
        default_factory=list, max_length=1024, description="The attempts the node runs now"
    )
    draining: bool = Field(
        False, strict=True, description="The node finishes its jobs and takes no new ones"
    )

    @model_validator(mode="after")
    def _slots_add_up(self) -> Heartbeat:
        if self.free_slots > self.slots:
            raise ValueError("free_slots cannot exceed slots")
        return self


class Cancel(AttemptRef):
    """Stop running an attempt: the client cancelled the job."""

    kind: Literal["cancel"] = Field("cancel", description="Control message type")


class Drain(Message):
    """Finish the running jobs, take no new ones."""

    kind: Literal["drain"] = Field("drain", description="Control message type")


AnyControl = Annotated[
    Cancel | Drain,
    Field(discriminator="kind", description="A control message to one node"),
]
