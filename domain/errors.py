"""Typed errors raised by the domain: every broken rule has its own class."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


class TrainyardError(Exception):
    """Base class of every error the domain raises on purpose."""


# --- job spec ---------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    """One problem in a submitted job spec: where it is and what is wrong."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class JobSpecError(TrainyardError):
    """A submitted job spec is invalid; `errors` names every bad field and why."""

    def __init__(self, errors: list[FieldError]) -> None:
        assert errors, "a JobSpecError needs at least one FieldError"
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def single(cls, field: str, reason: str) -> JobSpecError:
        """A spec error about one field."""
        return cls([FieldError(field, reason)])


# --- job lifecycle ----------------------------------------------------------


class JobError(TrainyardError):
    """A command on one job broke a lifecycle rule."""

    def __init__(self, job_id: UUID, message: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: {message}")


class JobNotFoundError(JobError):
    """No job has this id."""

    def __init__(self, job_id: UUID) -> None:
        super().__init__(job_id, "not found")


class JobTerminalError(JobError):
    """The job has ended (completed, failed or cancelled); nothing changes it any more."""

    def __init__(self, job_id: UUID, status: str) -> None:
        self.status = status
        super().__init__(job_id, f"already {status}")


class StaleAttemptError(JobError):
    """A claim or report names an attempt that is not the job's current one."""

    def __init__(self, job_id: UUID, attempt: int, current: int) -> None:
        self.attempt = attempt
        self.current = current
        super().__init__(job_id, f"attempt {attempt} is stale (current attempt is {current})")


class DuplicateReportError(JobError):
    """A report with this attempt and sequence number was already recorded."""

    def __init__(self, job_id: UUID, attempt: int, seq: int) -> None:
        self.attempt = attempt
        self.seq = seq
        super().__init__(job_id, f"report {seq} of attempt {attempt} was already recorded")


class ClaimConflictError(JobError):
    """Another node holds the claim on this attempt."""

    def __init__(self, job_id: UUID, attempt: int, holder: str) -> None:
        self.attempt = attempt
        self.holder = holder
        super().__init__(job_id, f"attempt {attempt} is already claimed by node {holder!r}")


class NotClaimHolderError(JobError):
    """A report came from a node that does not hold the attempt's claim."""

    def __init__(self, job_id: UUID, attempt: int, node_id: str, holder: str) -> None:
        self.attempt = attempt
        self.node_id = node_id
        self.holder = holder
        super().__init__(
            job_id, f"node {node_id!r} reported on attempt {attempt}, which {holder!r} holds"
        )


class InvalidTransitionError(JobError):
    """The command does not apply to the job's current status."""

    def __init__(self, job_id: UUID, command: str, status: str) -> None:
        self.command = command
        self.status = status
        super().__init__(job_id, f"cannot {command} a job that is {status}")


class IdempotencyConflictError(JobError):
    """A submit repeated a request id with a different spec."""

    def __init__(self, job_id: UUID) -> None:
        super().__init__(job_id, "this request id was already used for a different job spec")


class ConcurrencyConflictError(JobError):
    """Concurrent writers kept conflicting on one job; the command was not applied."""

    def __init__(self, job_id: UUID, tries: int) -> None:
        self.tries = tries
        super().__init__(job_id, f"conflicting concurrent writes, gave up after {tries} tries")
