"""A job's projected updates as the WebSocket sends them, from Redis or rebuilt from the log.

An update is a Redis Stream entry whose id is `{position}-0` (see projections/publisher.py)
and whose fields are strings; on the WebSocket it becomes one JSON text frame with typed
values. When a stream no longer holds what a client missed, the updates are rebuilt from
the job's events with the projections' own `BoardBatch`, the code that produced them, so
the fields are identical.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification

from domain.metrics import metrics_id_for
from gateway.history import History
from projections.board import BoardBatch, Positioned, Update

StreamId = tuple[int, int]
"""A Redis Stream entry id, `ms-seq`, as a pair that sorts like the ids do."""

TERMINAL_TYPES = frozenset({"completed", "failed", "cancelled"})
_INT_FIELDS = frozenset({"position", "attempt", "seq", "step"})
_ID = re.compile(r"(\d{1,19})(?:-(\d{1,19}))?")
_REPLAY_PAGE = 1000


def parse_stream_id(text: str) -> StreamId:
    """`123-0` (or `123`) as a StreamId; ValueError otherwise."""
    match = _ID.fullmatch(text)
    if match is None:
        raise ValueError(f"{text[:40]!r} is not an update id like 123-0")
    return int(match[1]), int(match[2] or 0)


def format_stream_id(stream_id: StreamId) -> str:
    """A StreamId as Redis writes it."""
    return f"{stream_id[0]}-{stream_id[1]}"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One update ready to send: its id, its frame's text, and what it says of the job."""

    id: StreamId
    text: str
    kind: str
    status: str

    @property
    def terminal(self) -> bool:
        """Whether the job ended with this update (nothing follows it)."""
        return self.kind in TERMINAL_TYPES


def typed(fields: Update) -> dict[str, Any]:
    """An update's string fields as the JSON the WebSocket sends (numbers, bools, null)."""
    update: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _INT_FIELDS:
            update[name] = int(value)
        elif name == "node_id":
            update[name] = value or None
        elif name == "cancel_requested":
            update[name] = value == "1"
        elif name == "stats":
            update[name] = json.loads(value)
        else:
            update[name] = value
    return update


def outgoing(entry_id: str, fields: Update) -> Outgoing:
    """A stream entry (or a rebuilt update) as a frame; ValueError if its fields do not fit."""
    stream_id = parse_stream_id(entry_id)
    try:
        update = typed(fields)
        kind, status = fields["type"], fields["status"]
    except (KeyError, ValueError) as error:
        raise ValueError(f"update {entry_id} has malformed fields: {error}") from error
    text = json.dumps({"type": "update", "id": entry_id, "update": update}, separators=(",", ":"))
    return Outgoing(stream_id, text, kind, status)


def from_update(update: Update) -> Outgoing:
    """A rebuilt update as a frame, with the entry id the publisher gives it."""
    return outgoing(f"{update['position']}-0", update)


class UpdateHistory(History):
    """The job's history, and its updates rebuilt from it."""

    def positioned(self, job_id: UUID, *, after: int, limit: int) -> list[Positioned]:
        """Up to `limit` domain events of the job and its metrics stream after `after`."""
        ids = (job_id, metrics_id_for(job_id))
        params = [str(i) if self._postgres else i.hex for i in ids]
        rows = self.db.fetchall(self._select, (*params, after, limit))
        to_domain_event = self.app.mapper.to_domain_event
        return [
            (
                to_domain_event(
                    Notification(
                        id=row["position"],
                        originator_id=UUID(str(row["originator_id"])),
                        originator_version=row["originator_version"],
                        topic=row["topic"],
                        state=bytes(row["state"]),
                    )
                ),
                row["position"],
            )
            for row in rows
        ]

    def updates(self, job_id: UUID, after: StreamId) -> list[Update]:
        """The job's updates with ids above `after`, as the projections publish them (blocks).

        The whole history is applied, from the job's first event: an update carries the
        job's state after its event (status, reason), which depends on everything before.
        """
        batch = BoardBatch(rows={}, with_updates=True)
        position = 0
        while True:
            events = self.positioned(job_id, after=position, limit=_REPLAY_PAGE)
            batch.apply_all(events)
            if len(events) < _REPLAY_PAGE:
                break
            position = events[-1][1]
        return [u for u in batch.updates if (int(u["position"]), 0) > after]
