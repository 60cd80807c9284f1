"""A batching projection runner: many events per transaction, live and in a rebuild.

The library's `ProjectionRunner` hands its projection one event at a time, so every event
costs a transaction (~2,000 events/s here). This runner reads up to `batch_size`
notifications at once, decodes them, and has the view apply them and record the position
of the last one in one transaction. Behind the log it applies full batches; caught up, a
batch is whatever arrived since the last read, so latency stays low without a timer.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import Tracking

from projections.board import Positioned, RowCache
from projections.jobboard import JobBoardProjection, JobBoardView
from projections.leader import Leader
from projections.postgres import PostgresJobBoardView
from projections.publisher import StreamPublisher

log = logging.getLogger(__name__)


class ProjectionStoppedError(Exception):
    """The projection hit an event it could not apply; it stopped there."""


@dataclass
class Progress:
    """What a run or rebuild did."""

    events: int = 0
    batches: int = 0
    published: int = 0
    position: int | None = None
    seconds: float = 0.0


class BatchRunner:
    """Follows an application's log into a job board view, a batch per transaction."""

    def __init__(
        self,
        app: Application[Any],
        view: JobBoardView,
        *,
        publisher: StreamPublisher | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.app = app
        self.view = view
        self.projection = JobBoardProjection(view)
        self.publisher = publisher
        self.batch_size = batch_size
        # The rows this runner committed: a batch reads only rows it has not seen yet.
        self.cache = RowCache()
        self.name = app.name
        self.position: int | None = view.max_tracking_id(app.name)
        self.progress = Progress(position=self.position)

    def read(self, after: int | None) -> list[Positioned]:
        """The next batch of events after position `after`, decoded."""
        start = 1 if after is None else after + 1
        notifications = self.app.recorder.select_notifications(start=start, limit=self.batch_size)
        to_domain_event = self.app.mapper.to_domain_event
        return [(to_domain_event(n), n.id) for n in notifications]

    def apply(self, events: list[Positioned]) -> None:
        """Apply (and publish) one batch read after the tracked position."""
        last = events[-1][1]
        try:
            updates = self.projection.process_batch(
                events,
                Tracking(self.name, last),
                with_updates=self.publisher is not None,
                published_upto=self.publisher.published_upto if self.publisher else None,
                cache=self.cache,
            )
        except Exception as error:
            raise self._stopped(events[0][1], last, error) from error
        self.position = last
        if self.publisher is not None:
            self.progress.published += self.publisher.publish(updates)
        self.progress.events += len(events)
        self.progress.batches += 1
        self.progress.position = last

    def catch_up(self, stop: threading.Event | None = None) -> Progress:
        """Apply batches until the log has no more events (or `stop` is set)."""
        started = time.perf_counter()
        while not (stop is not None and stop.is_set()):
            events = self.read(self.position)
            if events:
                self.apply(events)
            if len(events) < self.batch_size:
                break
        self.progress.seconds += time.perf_counter() - started
        return self.progress

    def replay(self, stop: threading.Event | None = None) -> Progress:
        """`catch_up` for a replay, each batch's write overlapping the next batch's read.

        On PostgreSQL a batch is applied in memory here, and its transaction (the rows, one
        COPY of metric rows, the tracking record) runs in a writer thread while this thread
        reads, decodes and applies the next batch: the database ingests one batch while
        Python decodes the next. One write is in flight at a time, so batches commit in log
        order. The cache takes a batch's rows before its write commits; a failed write stops
        the replay, and its runner with the cache goes with it.
        """
        view = self.view
        if not isinstance(view, PostgresJobBoardView) or self.publisher is not None:
            return self.catch_up(stop)
        started = time.perf_counter()
        pending: tuple[Future[None], int, int] | None = None

        def settle() -> None:
            nonlocal pending
            if pending is None:
                return
            writing, first, last = pending
            pending = None
            try:
                writing.result()
            except Exception as error:
                raise self._stopped(first, last, error) from error
            self.position = last
            self.progress.position = last

        with ThreadPoolExecutor(1, thread_name_prefix="jobboard-writer") as writer:
            try:
                after = self.position
                while not (stop is not None and stop.is_set()):
                    events = self.read(after)
                    if events:
                        first, last = events[0][1], events[-1][1]
                        tracking = Tracking(self.name, last)
                        try:
                            prepared = view.prepare_replay(events, tracking, self.cache, settle)
                        except ProjectionStoppedError:
                            raise
                        except Exception as error:
                            raise self._stopped(first, last, error) from error
                        self.cache.store(prepared.batch.rows.values())
                        settle()
                        pending = (writer.submit(prepared.write), first, last)
                        after = last
                        self.progress.events += len(events)
                        self.progress.batches += 1
                    if len(events) < self.batch_size:
                        break
                settle()
            finally:
                if pending is not None:
                    pending[0].cancel()
        self.progress.seconds += time.perf_counter() - started
        return self.progress

    def _stopped(self, first: int, last: int, error: BaseException) -> ProjectionStoppedError:
        return ProjectionStoppedError(
            f"job board stopped after position {self.position}: events "
            f"{first}..{last} could not be applied: {type(error).__name__}: {error}"
        )

    def publish_pending(self) -> None:
        """Publish what an earlier run committed but may not have published (after a crash)."""
        if self.publisher is not None:
            self.publisher.adopt(self.position)
            pending = self.view.pending_updates()
            added = self.publisher.publish(pending)
            if pending:
                log.info("re-published %d outbox updates (%d were new)", len(pending), added)
            self.progress.published += added

    def run(self, leader: Leader, stop: threading.Event, idle_wait: float = 0.5) -> Progress:
        """Follow the log until `stop` is set."""
        self.publish_pending()
        log.info("job board following %s from position %s", self.name, self.position)
        while not stop.is_set():
            self.catch_up(stop)
            if not stop.is_set():
                leader.wait_for_events(idle_wait)
        log.info("job board stopped cleanly at position %s", self.position)
        return self.progress


def rebuild(
    app: Application[Any],
    view: JobBoardView,
    *,
    batch_size: int = 10_000,
    stop: threading.Event | None = None,
) -> Progress:
    """Drop the job board and its tracking record, and apply the whole log again in batches.

    Nothing is published: the streams already hold every update, and their entry ids are
    positions in the log, so a rebuilt board and the streams still agree.
    """
    view.drop(app.name)
    view.create_table()
    runner = BatchRunner(app, view, batch_size=batch_size)
    # A replay's objects (events, rows, metric rows) hold no reference cycles and are freed
    # as each batch is done, but allocating them triggers collections that walk every live
    # object: a third of a rebuild's time. Cycles left meanwhile are collected at the end.
    collecting = gc.isenabled()
    gc.disable()
    try:
        progress = runner.replay(stop)
    finally:
        if collecting:
            gc.enable()
            gc.collect()
    log.info(
        "rebuilt the job board: %d events in %d batches, %.1f s, up to position %s",
        progress.events,
        progress.batches,
        progress.seconds,
        progress.position,
    )
    return progress
