"""The job board as an eventsourcing `Projection`, over either database's view."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from projections.board import Positioned, RowCache, Update
from projections.postgres import PostgresJobBoardView
from projections.sqlite import SQLiteJobBoardView
from projections.view import PROJECTION_NAME

JobBoardView = PostgresJobBoardView | SQLiteJobBoardView
"""The job board's tables and tracking record, written together in one transaction."""


class JobBoardProjection(Projection[JobBoardView]):
    """Jobs and their metric series, projected from the Jobs application's log."""

    name = PROJECTION_NAME

    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Apply one event (what the library's one-event-per-transaction runner calls)."""
        self.process_batch([(domain_event, tracking.notification_id)], tracking)

    def process_batch(
        self,
        events: Sequence[Positioned],
        tracking: Tracking,
        *,
        with_updates: bool = False,
        published_upto: int | None = None,
        cache: RowCache | None = None,
    ) -> list[Update]:
        """Apply a batch and record `tracking` (its last position) in one transaction.

        `cache` holds rows committed earlier by this runner; only the others are read.
        """
        return self.view.project(
            events,
            tracking,
            with_updates=with_updates,
            published_upto=published_upto,
            cache=cache,
        )
