"""The dispatcher: follows the Jobs log and tells the train nodes about it over RabbitMQ.

- `Job.Queued(attempt)` -> a `Dispatch(job_id, attempt, spec)` on the dispatch queue.
- `Job.CancelRequested(attempt)` -> a `Cancel(job_id, attempt)` on the control exchange,
  routed to the node that holds the attempt.

At least once: a batch's messages are published and confirmed by the broker first, and only
then is the batch's last position recorded in the dispatcher's own tracking record. A crash
between the two publishes the batch again on restart, which is harmless: a node's claim is
refused for an attempt that is stale or already claimed, and a node ignores a Cancel of an
attempt it does not run.

Most events of the log (progress reports above all) send nothing. A batch that sends
nothing advances the position in memory only; the position is recorded later, when one of
these comes first:

- a batch sends a message (recorded right after the broker's confirms, as above);
- the unrecorded position is `record_after_events` events ahead of the recorded one, or
  the last record is `record_after_s` seconds old (checked after every batch and every
  time the dispatcher has caught up, so an idle dispatcher records within about
  `record_after_s` plus one idle wait);
- `run()` ends because it was asked to stop.

This is safe by construction: every batch that sent a message was recorded before the next
batch was read, so the events after the recorded position (the unrecorded window) sent
nothing. A crash loses only that window: on restart the dispatcher re-reads at most the
events after its last record (fewer than `record_after_events` plus one batch, or the events
of about `record_after_s` seconds) and again sends nothing for them, since `plan()` decides
from each job's current state, which only moves on: an attempt that was not waiting for a
node then is not waiting now. Nothing is skipped either: the window is read again in full,
in log order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Notification, Tracking, TrackingRecorder
from eventsourcing.utils import get_topic

from domain.application import JobsApplication
from domain.contracts import Cancel, Dispatch
from domain.job import ACTIVE_STATUSES, Job, JobStatus
from projections.amqp import AmqpPublisher
from projections.leader import Leader

log = logging.getLogger(__name__)

DISPATCHER_NAME = "Dispatcher"
"""Names the dispatcher's tracking table (`dispatcher_tracking`) and its leader lock."""

RECORD_AFTER_S = 5.0
"""Seconds after which an unrecorded position is recorded although nothing was sent."""

RECORD_AFTER_EVENTS = 5_000
"""Events after which an unrecorded position is recorded although nothing was sent."""

_QUEUED = get_topic(Job.Queued)
_CANCEL_REQUESTED = get_topic(Job.CancelRequested)


class DispatcherStoppedError(Exception):
    """The dispatcher could not publish or record a batch; it stopped there."""


@dataclass
class Outgoing:
    """What one batch of events sends: dispatches, and cancels with the node they go to."""

    dispatches: list[Dispatch] = field(default_factory=list)
    cancels: list[tuple[Cancel, str]] = field(default_factory=list)


def dispatch_for(job: Job, attempt: int) -> Dispatch | None:
    """The Dispatch of `attempt`, or None if the attempt no longer waits for a node."""
    # A dispatch of an attempt that is claimed, stale or ended would only be refused by
    # the claim; skipping it keeps a fresh dispatcher from flooding the queue with history.
    if job.attempt != attempt or job.status is not JobStatus.QUEUED:
        return None
    return Dispatch(job_id=job.id, attempt=attempt, spec=job.spec)


def cancel_for(job: Job, attempt: int) -> tuple[Cancel, str] | None:
    """The Cancel of `attempt` and the node holding it, or None if the attempt has ended."""
    # The node is the one that claimed `attempt`: a job's node only changes when a new
    # attempt is queued, so while the current attempt is still `attempt` and active, the
    # job's node is the holder the CancelRequested event was about.
    if job.attempt != attempt or job.status not in ACTIVE_STATUSES or job.node_id is None:
        return None
    return Cancel(job_id=job.id, attempt=attempt), job.node_id


class Dispatcher:
    """Publishes Dispatch and Cancel messages for the Jobs log, tracked in its own table.

    `position` is the last event applied; `recorded` the last position written to the
    tracking record, which lags behind over batches that sent nothing (see the module's
    docstring). `record_after_s` and `record_after_events` bound that lag.
    """

    def __init__(
        self,
        app: JobsApplication,
        tracking: TrackingRecorder,
        publisher: AmqpPublisher,
        *,
        batch_size: int = 1000,
        record_after_s: float = RECORD_AFTER_S,
        record_after_events: int = RECORD_AFTER_EVENTS,
    ) -> None:
        self.app = app
        self.tracking = tracking
        self.publisher = publisher
        self.batch_size = batch_size
        self.record_after_s = record_after_s
        self.record_after_events = record_after_events
        self.position: int | None = tracking.max_tracking_id(app.name)
        self.recorded: int | None = self.position
        self.recorded_at = time.monotonic()
        self.published = 0
        self.records = 0
        """Tracking records written by this dispatcher."""

    def read(self, after: int | None) -> list[Notification]:
        """The next batch of notifications after position `after` (not decoded)."""
        start = 1 if after is None else after + 1
        return list(self.app.recorder.select_notifications(start=start, limit=self.batch_size))

    def plan(self, notifications: Sequence[Notification]) -> Outgoing:
        """The messages a batch sends, from the jobs' current state (see `dispatch_for`)."""
        out = Outgoing()
        to_domain_event = self.app.mapper.to_domain_event
        for n in notifications:
            # Only two event types matter: decoding the rest (mostly progress) is wasted.
            if n.topic not in (_QUEUED, _CANCEL_REQUESTED):
                continue
            event: Any = to_domain_event(n)
            job = self.app.get_job(event.originator_id)
            if n.topic == _QUEUED:
                dispatch = dispatch_for(job, event.attempt)
                if dispatch is not None:
                    out.dispatches.append(dispatch)
            else:
                cancel = cancel_for(job, event.attempt)
                if cancel is not None:
                    out.cancels.append(cancel)
        return out

    async def publish(self, notifications: Sequence[Notification]) -> Outgoing:
        """Publish a batch's messages and wait for the broker's confirms (nothing recorded)."""
        out = await asyncio.to_thread(self.plan, notifications)
        if out.dispatches:
            await self.publisher.dispatch(out.dispatches)
        for cancel, node_id in out.cancels:
            if not await self.publisher.cancel(cancel, node_id):
                # The node's control queue is gone, so the node is too: it renews no lease,
                # and the watchdog expires the attempt, which ends it as cancelled.
                log.warning(
                    "cancel of %s/%s not delivered: node %s has no control queue",
                    cancel.job_id,
                    cancel.attempt,
                    node_id,
                )
        self.published += len(out.dispatches) + len(out.cancels)
        return out

    async def _write(self, position: int) -> None:
        await asyncio.to_thread(self.tracking.insert_tracking, Tracking(self.app.name, position))
        self.recorded = position
        self.recorded_at = time.monotonic()
        self.records += 1

    async def apply(self, notifications: Sequence[Notification]) -> Outgoing:
        """Publish a batch, then (if it sent anything) record its last position: in log order.

        A batch that sent nothing only advances `position`; `record()` writes it later.
        """
        first, last = notifications[0].id, notifications[-1].id
        try:
            out = await self.publish(notifications)
            if out.dispatches or out.cancels:
                await self._write(last)
        except Exception as error:
            raise DispatcherStoppedError(
                f"dispatcher stopped after position {self.position}: events {first}..{last} "
                f"could not be dispatched: {type(error).__name__}: {error}"
            ) from error
        self.position = last
        return out

    def record_due(self) -> bool:
        """Whether `position` is unrecorded and `record_after_events` ahead or the record old."""
        if self.position is None or self.position == self.recorded:
            return False
        behind = self.position - (self.recorded or 0)
        return (
            behind >= self.record_after_events
            or time.monotonic() - self.recorded_at >= self.record_after_s
        )

    async def record(self) -> None:
        """Record `position` if it is ahead of the recorded one (everything before it is sent)."""
        position = self.position
        if position is None or position == self.recorded:
            return
        try:
            await self._write(position)
        except Exception as error:
            raise DispatcherStoppedError(
                f"dispatcher stopped after position {position}: it could not be recorded: "
                f"{type(error).__name__}: {error}"
            ) from error

    async def catch_up(self, stop: threading.Event | None = None) -> int:
        """Apply batches until the log has no more events (or `stop` is set); messages sent.

        After every batch, and once caught up, the position is recorded if `record_due()`.
        """
        before = self.published
        while not (stop is not None and stop.is_set()):
            notifications = await asyncio.to_thread(self.read, self.position)
            if notifications:
                await self.apply(notifications)
            if len(notifications) < self.batch_size:
                break
            if self.record_due():
                await self.record()
        if self.record_due():
            await self.record()
        return self.published - before

    async def run(self, leader: Leader, stop: threading.Event, idle_wait: float = 0.5) -> None:
        """Follow the log until `stop` is set, then record the position reached."""
        log.info("dispatcher following %s from position %s", self.app.name, self.position)
        while not stop.is_set():
            await self.catch_up(stop)
            if not stop.is_set():
                await asyncio.to_thread(leader.wait_for_events, idle_wait)
        await self.record()
        log.info("dispatcher stopped cleanly at position %s", self.position)
