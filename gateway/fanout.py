"""One Redis reader per process, fanning every job's live updates out to its WebSocket clients.

The reader follows the global update stream with `XREAD BLOCK` on a connection of its own
(its socket timeout longer than the block: redis-py's default would break a long block), and
always passes the last id it read: re-reading from `$` would lose entries added between two
reads. Each entry is turned into its frame once and put on the bounded queue of every
subscriber to its job; a subscriber whose queue is full is marked overflowed (its connection
then closes with 1013) instead of slowing the reader and everyone else. After each read the
reader yields, so connections that keep up empty their queues before the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.updates import Outgoing, outgoing
from projections.publisher import global_stream, job_stream

log = logging.getLogger(__name__)

BLOCK_MS = 5000
READ_COUNT = 1000
CONNECT_TIMEOUT_S = 5.0
RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)

Entry = tuple[str, dict[str, str]]


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """One connection's live updates of one job: a bounded queue, and whether it overflowed."""

    def __init__(self, job_id: str, size: int) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[Outgoing] = asyncio.Queue(size)
        self.overflowed = asyncio.Event()
        self.reason = "client too slow"

    def end(self, reason: str) -> None:
        """Close the subscription for `reason` (the client resumes with `after`)."""
        if not self.overflowed.is_set():
            self.reason = reason
            self.overflowed.set()

    def offer(self, item: Outgoing) -> None:
        """Queue `item`, or mark the subscription overflowed when its queue is full."""
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed.set()


class FanoutUnavailableError(Exception):
    """The reader could not start following the update stream (Redis does not answer)."""


class Fanout:
    """The process's one reader of the global update stream and its subscribers."""

    def __init__(self, redis_url: str, prefix: str, queue_size: int) -> None:
        self.prefix = prefix
        self.queue_size = queue_size
        # A read never brings more than a client's queue holds: a burst larger than the queue
        # must not close clients that keep up with it.
        self.read_count = min(READ_COUNT, queue_size)
        self.key = global_stream(prefix)
        # Per-connection catch-up reads (short commands) and the blocking reader's own line.
        self.redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )
        self._reader = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=BLOCK_MS / 1000 + 10,
            socket_connect_timeout=2,
        )
        self._subscribers: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.last_id: str | None = None
        # How many entries the stream had ever had when `last_id` was added (Redis's
        # `entries-added`), None if unknown: what tells that entries were trimmed unread.
        self._added: int | None = None

    def job_key(self, job_id: str) -> str:
        """The key of one job's update stream."""
        return job_stream(self.prefix, job_id)

    async def subscribe(self, job_id: str) -> Subscription:
        """A subscription to the job's updates read from now on.

        Returns once the reader knows where it starts, so that everything a catch-up read
        after this call does not see is still to come through the subscription.
        """
        sub = Subscription(job_id, self.queue_size)
        self._subscribers.setdefault(job_id, set()).add(sub)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="trainyard-update-fanout")
            self._task.add_done_callback(self._stopped)
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            self.unsubscribe(sub)
            raise FanoutUnavailableError(
                "live updates are unavailable: Redis does not answer"
            ) from None
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to `sub`."""
        subs = self._subscribers.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.job_id]

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return sum(len(s) for s in self._subscribers.values())

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("the update reader failed", exc_info=task.exception())
        # Its subscribers would wait forever: close them (1013, they resume with `after`),
        # and let the next subscription start a new reader.
        for subs in self._subscribers.values():
            for sub in subs:
                sub.end("live updates stopped")
        self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self.last_id is None:
                    self.last_id, self._added = await self._tip()
                    self._ready.set()
                    log.info("following %s after %s", self.key, self.last_id)
                reply: Any = await self._reader.xread(
                    {self.key: self.last_id}, count=self.read_count, block=BLOCK_MS
                )
            except (RedisError, OSError) as error:
                delay = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.warning("reading %s failed (%s); retrying in %.1f s", self.key, error, delay)
                await asyncio.sleep(delay)
                continue
            entries = [entry for _key, found in reply or () for entry in found]
            # After an idle read, after reads failed, and when behind: is the stream still
            # the one read, and is nothing after the last id read trimmed away unread?
            if not entries or failures or len(entries) >= self.read_count:
                with contextlib.suppress(RedisError, OSError):  # the next read retries
                    await self._check_stream()
            failures = 0
            self._deliver(entries)
            # Let the connections send what was just queued before the next read.
            await asyncio.sleep(0)

    async def _check_stream(self) -> None:
        """Start over if the stream was reset; end every subscriber if entries were missed.

        Reset: the stream now ends below where the reader is. That happens when the
        projections dropped streams written from another event store (a local data directory
        deleted and started afresh) and write this log's from id 1: reading on after the old
        id would skip them.

        Missed: entries above the last id read were trimmed before the reader got to them
        (it could not reach Redis, or fell that far behind): its subscribers would never
        see them.

        Either way open connections are closed (1013) and resume, from their own last id,
        from the job's stream or the event log.
        """
        if self.last_id is None or self.last_id == "0-0":
            return
        try:
            info: Any = await self._reader.xinfo_stream(self.key)
        except ResponseError:
            info = {}  # no stream: it was deleted
        tip = str(info.get("last-generated-id") or "0-0")
        length = int(info.get("length") or 0)
        added = None if info.get("entries-added") is None else int(info["entries-added"])
        if _id_key(tip) < _id_key(self.last_id):
            log.warning(
                "%s was reset (it ends at %s, read up to %s): reading it again from the start",
                self.key,
                tip,
                self.last_id,
            )
            # Read from the start, every entry it holds comes next (none: a stream made anew).
            self.last_id = "0-0"
            self._added = 0 if not info else None if added is None else added - length
            self._end_all("update stream reset")
            return
        # Trimming drops the oldest entries first: if any entry added after `last_id` is
        # gone, so is every entry up to it, and the stream holds fewer than were added since.
        if self._added is None or added is None or added - self._added <= length:
            return
        log.warning(
            "%s: %d entries after %s were trimmed before they were read: clients resume",
            self.key,
            added - self._added - length,
            self.last_id,
        )
        self._added = added - length  # the entries still there are read next
        self._end_all("updates missed")

    def _end_all(self, reason: str) -> None:
        for subs in self._subscribers.values():
            for sub in subs:
                sub.end(reason)

    async def _tip(self) -> tuple[str, int | None]:
        """The stream's last id and how many entries it has ever had ("0-0", 0: no stream)."""
        try:
            info: Any = await self._reader.xinfo_stream(self.key)
        except ResponseError:
            return "0-0", 0
        added = info.get("entries-added")  # Redis 7
        return str(info["last-generated-id"]), None if added is None else int(added)

    def _deliver(self, entries: Sequence[Entry]) -> None:
        subscribers = self._subscribers
        for entry_id, fields in entries:
            self.last_id = entry_id
            if self._added is not None:
                self._added += 1
            subs = subscribers.get(fields.get("job_id", ""))
            if not subs:
                continue
            try:
                item = outgoing(entry_id, fields)
            except ValueError as error:
                # Not an update the projections wrote: it cannot be sent, and waiting for it
                # would stop every client's stream.
                log.error("skipped entry %s of %s: %s", entry_id, self.key, error)
                continue
            for sub in list(subs):
                sub.offer(item)

    async def aclose(self) -> None:
        """Stop the reader and close its connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._reader.aclose()
        await self.redis.aclose()
