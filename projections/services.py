"""The dispatcher and the lease watchdog, run together on one event loop in their own thread.

`python -m projections` runs the job board in its main thread and these two in a second
one. Each takes its own single-runner lock, so a standby process stands by for each of
them. A failure of either is logged as one clear line, sets `stop` (so the whole process
ends, the job board after its current batch), and makes the process exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from domain.application import JobsApplication
from domain.contracts import Topology
from domain.settings import StoreSettings
from projections.amqp import AmqpPublisher
from projections.dispatcher import DISPATCHER_NAME, Dispatcher, DispatcherStoppedError
from projections.jobboard import JobBoardView
from projections.leader import Leader
from projections.settings import ProjectionSettings
from projections.tracking import build_tracking, close_tracking
from projections.watchdog import WATCHDOG_NAME, Watchdog

log = logging.getLogger("projections")


class LockFactory(Protocol):
    """`build_lock` of the composition root: the single-runner lock named `name`."""

    def __call__(
        self, store: StoreSettings, app: JobsApplication, name: str, *, channel: str | None = None
    ) -> Leader:
        """The lock; it waits on the events channel, or on `channel` if given."""


# The watchdog's lock listens on a channel nobody notifies: it only sleeps on it.
WATCHDOG_CHANNEL = "trainyard_watchdog"


@dataclass
class Services:
    """The dispatcher's and watchdog's shared parts; `failures` names what failed."""

    settings: ProjectionSettings
    store: StoreSettings
    app: JobsApplication
    build_lock: LockFactory
    build_view: Callable[[StoreSettings], JobBoardView]
    stop: threading.Event
    failures: list[str] = field(default_factory=list)

    async def _guarded(self, name: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as error:  # noqa: BLE001
            # The outermost guard of a service: whatever stopped it, the whole process ends,
            # says why in one line and exits non-zero.
            self.failures.append(name)
            if isinstance(error, DispatcherStoppedError):
                log.error("%s", error)
            else:
                log.error("%s failed, stopping: %s: %s", name, type(error).__name__, error)
            self.stop.set()

    async def _dispatch(self, publisher: AmqpPublisher) -> None:
        lock = self.build_lock(self.store, self.app, DISPATCHER_NAME)
        tracking = None
        try:
            if not await asyncio.to_thread(lock.acquire, self.stop):
                return
            tracking = await asyncio.to_thread(build_tracking, self.store, DISPATCHER_NAME)
            # Reads the tracked position: a query, so off the event loop.
            dispatcher = await asyncio.to_thread(
                Dispatcher,
                self.app,
                tracking,
                publisher,
                batch_size=self.settings.dispatch_batch_size,
            )
            await dispatcher.run(lock, self.stop, idle_wait=self.settings.projection_poll_interval)
        finally:
            if tracking is not None:
                close_tracking(tracking)
            lock.close()

    async def _watch(self, publisher: AmqpPublisher) -> None:
        s = self.settings
        lock = self.build_lock(self.store, self.app, WATCHDOG_NAME, channel=WATCHDOG_CHANNEL)
        redis = Redis.from_url(s.redis_url)
        view = None
        try:
            if not await asyncio.to_thread(lock.acquire, self.stop):
                return
            view = await asyncio.to_thread(self.build_view, self.store)
            watchdog = Watchdog(
                self.app,
                view,
                redis,
                publisher,
                key_prefix=s.redis_key_prefix,
                lease_ttl_s=s.lease_ttl_s,
                grace_s=s.watchdog_grace_s,
                redispatch_s=s.redispatch_interval_s,
            )
            await watchdog.run(lock, self.stop, interval=s.watchdog_interval_s)
        finally:
            if view is not None:
                view.close()
            await redis.aclose()
            lock.close()

    async def run(self) -> None:
        """Connect to the broker, then run the dispatcher and the watchdog until `stop`."""
        s = self.settings
        publisher = AmqpPublisher(s.amqp_url, Topology(s.queue_prefix), timeout=s.amqp_timeout_s)
        try:
            await self._guarded("broker", publisher.open())
            if self.failures:
                return
            await asyncio.gather(
                self._guarded("dispatcher", self._dispatch(publisher)),
                self._guarded("lease watchdog", self._watch(publisher)),
            )
        finally:
            await publisher.close()

    def run_in_thread(self) -> threading.Thread:
        """Start `run()` on its own event loop in a new thread."""
        thread = threading.Thread(target=self._run_loop, name="dispatch")
        thread.start()
        return thread

    def _run_loop(self) -> None:
        try:
            asyncio.run(self.run())
        except Exception as error:  # noqa: BLE001
            # Closing the broker connection failed: still one line and a non-zero exit.
            self.failures.append("broker")
            log.error("broker failed, stopping: %s: %s", type(error).__name__, error)
            self.stop.set()
