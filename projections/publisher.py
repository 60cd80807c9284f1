"""The live publisher: the job board's committed updates, appended to Redis Streams.

Every update goes to its job's stream `{prefix}jobs:{job_id}:updates` and to the global
stream `{prefix}jobs:updates`, with the stream entry id `{position}-0` where `position` is
the event's position in the log. Explicit ids make publishing idempotent: Redis refuses an
id not above the stream's last id, so an update published before a crash and published
again after it is refused, not duplicated. The updates themselves come from the view's
outbox, written in the same transaction as the rows, so none is lost either. A client
resumes with `XREAD ... STREAMS key <last id seen>`; the id is also the `position` field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import redis

from domain.job import TERMINAL_STATUSES
from projections.board import Update

log = logging.getLogger(__name__)

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_FINISHED = frozenset(status.value for status in TERMINAL_STATUSES)
_ALREADY_ADDED = "equal or smaller than the target stream top item"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def job_stream(prefix: str, job_id: str) -> str:
    """The key of one job's update stream."""
    return f"{prefix}jobs:{job_id}:updates"


def global_stream(prefix: str) -> str:
    """The key of the stream of every job's updates."""
    return f"{prefix}jobs:updates"


class StreamPublisher:
    """Appends updates to the per-job and global Redis Streams, each exactly once."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "",
        job_maxlen: int = 10_000,
        global_maxlen: int = 100_000,
        finished_ttl_s: int = 0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.job_maxlen = job_maxlen
        self.global_maxlen = global_maxlen
        self.finished_ttl_s = finished_ttl_s
        self.published_upto: int | None = None

    def publish(self, updates: Sequence[Update]) -> int:
        """Append `updates` (in log order); returns how many entries were new."""
        if not updates:
            return 0
        pipe = self.client.pipeline(transaction=False)
        everything = global_stream(self.prefix)
        for update in updates:
            entry_id = f"{update['position']}-0"
            pipe.xadd(
                job_stream(self.prefix, update["job_id"]),
                dict(update),  # type: ignore[arg-type]
                id=entry_id,
                maxlen=self.job_maxlen,
                approximate=True,
            )
            pipe.xadd(
                everything,
                dict(update),  # type: ignore[arg-type]
                id=entry_id,
                maxlen=self.global_maxlen,
                approximate=True,
            )
        expiring = [pipe.expire(key, self.finished_ttl_s) for key in self._finished(updates)]
        added = 0
        results = pipe.execute(raise_on_error=False)
        for result in results[: len(results) - len(expiring)]:
            if isinstance(result, redis.ResponseError) and _ALREADY_ADDED in str(result):
                continue  # published before a crash: the id proves it is there
            if isinstance(result, Exception):
                raise result
            added += 1
        self.published_upto = int(updates[-1]["position"])
        return added

    def adopt(self, position: int | None) -> int:
        """Drop the streams under the prefix if they did not come from this log; returns the
        number of streams dropped.

        Updates are published only after the job board committed them, so streams written from
        this log never hold an id above the board's position. Streams that do were written from
        another event store (one that was deleted or reset, e.g. a removed local data directory):
        their ids would make Redis refuse this log's updates as already published, and clients
        would see nothing. They are derived data; what they held is in the other store's log.
        """
        try:
            info = self.client.xinfo_stream(global_stream(self.prefix))
        except redis.ResponseError:
            return 0  # no stream yet
        last = int(_text(info["last-generated-id"]).partition("-")[0])
        if last <= (position or 0):
            return 0
        pattern = _GLOB_SPECIAL.sub(r"\\\1", f"{self.prefix}jobs:") + "*:updates"
        found = (
            k.decode() if isinstance(k, bytes) else str(k) for k in self.client.scan_iter(pattern)
        )
        ordered = sorted({global_stream(self.prefix), *found})
        for start in range(0, len(ordered), 500):
            self.client.unlink(*ordered[start : start + 500])
        log.warning(
            "the update streams under %r hold positions up to %d but the job board is at %s: "
            "they come from another event store; dropped %d streams",
            self.prefix,
            last,
            position,
            len(ordered),
        )
        return len(ordered)

    def _finished(self, updates: Sequence[Update]) -> list[str]:
        """The streams of jobs whose update here is terminal, when finished streams expire.

        A finished job's stream is dropped `finished_ttl_s` after its last update; a client
        resuming later is served from the job board and the event log instead.
        """
        if self.finished_ttl_s <= 0:
            return []
        keys = {
            job_stream(self.prefix, update["job_id"])
            for update in updates
            if update["status"] in _FINISHED
        }
        return sorted(keys)

    def close(self) -> None:
        """Close the Redis connection pool."""
        self.client.close()
