"""`python -m projections [run|rebuild]`: the projections process and its composition root.

`run` follows the log into the job board (main thread), and runs the dispatcher and the lease
watchdog beside it (projections.services); `rebuild` rebuilds the job board only.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import psycopg
import redis
from eventsourcing.persistence import PersistenceError
from eventsourcing.sqlite import SQLiteFactory
from eventsourcing.utils import Environment

from domain.application import JobsApplication
from domain.postgres import StoreFactory
from domain.settings import StoreSettings
from projections.jobboard import JobBoardView
from projections.leader import FileLeader, Leader, PostgresLeader
from projections.postgres import PostgresJobBoardView
from projections.publisher import StreamPublisher
from projections.runner import BatchRunner, ProjectionStoppedError, rebuild
from projections.services import Services
from projections.settings import ProjectionSettings
from projections.sqlite import SQLiteJobBoardView
from projections.view import PROJECTION_NAME

log = logging.getLogger("projections")


@dataclass
class Parts:
    """Everything the projections process runs with, built once at start."""

    settings: ProjectionSettings
    app: JobsApplication
    view: JobBoardView
    leader: Leader
    publisher: StreamPublisher

    def close(self) -> None:
        """Release connections, the lock last (a standby may take over at once)."""
        self.publisher.close()
        self.view.close()
        self.app.close()
        self.leader.close()


def build_view(store: StoreSettings) -> JobBoardView:
    """The job board view in the event store's own database."""
    env = Environment(PROJECTION_NAME, {**store.eventsourcing_env(), "POSTGRES_POOL_SIZE": "2"})
    if store.event_store == "postgres":
        return StoreFactory(env).tracking_recorder(PostgresJobBoardView)
    # SQLiteFactory.tracking_recorder() is not generic in the view class: build it directly.
    view = SQLiteJobBoardView(SQLiteFactory(env).datastore)
    view.create_table()
    return view


def build_leader(store: StoreSettings, app: JobsApplication) -> Leader:
    """The single-runner lock for the job board, in the event store's database."""
    return build_lock(store, app, PROJECTION_NAME)


def build_lock(
    store: StoreSettings, app: JobsApplication, name: str, *, channel: str | None = None
) -> Leader:
    """The single-runner lock of `name`; it wakes on the events table's NOTIFY (or `channel`)."""
    if store.event_store == "postgres":
        conninfo = {
            "host": store.postgres_host,
            "port": store.postgres_port,
            "dbname": store.postgres_dbname,
            "user": store.postgres_user,
            "password": store.postgres_password,
        }
        events: str = getattr(app.recorder, "channel_name", "jobs_events")
        return PostgresLeader(conninfo, store.postgres_schema, name, channel or events)
    lock_name = "jobboard" if name == PROJECTION_NAME else name.lower()
    return FileLeader(store.sqlite_path.with_name(f"{store.sqlite_path.name}.{lock_name}.lock"))


def compose(settings: ProjectionSettings, store: StoreSettings) -> Parts:
    """Build the process's parts; nothing here runs until `main` drives it."""
    app = JobsApplication(store.eventsourcing_env(), max_attempts=store.max_attempts)
    publisher = StreamPublisher(
        redis.Redis.from_url(settings.redis_url, decode_responses=True),
        prefix=settings.redis_key_prefix,
        job_maxlen=settings.stream_maxlen,
        global_maxlen=settings.global_stream_maxlen,
        finished_ttl_s=settings.finished_stream_ttl_s,
    )
    return Parts(settings, app, build_view(store), build_leader(store, app), publisher)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping after the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the projections (default) or rebuild the job board; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m projections", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "rebuild"], default="run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    _stop_on_signals(stop)
    settings = ProjectionSettings()
    store = StoreSettings()
    parts = compose(settings, store)
    services = Services(settings, store, parts.app, build_lock, build_view, stop)
    # The dispatcher and the watchdog run beside the job board, each under its own lock.
    # Start-up's long-lived objects (imports, connections) out of the garbage collector's way:
    # every full collection would walk them all and stall the live path for tens of ms.
    gc.collect()
    gc.freeze()
    thread = services.run_in_thread() if args.command == "run" else None
    try:
        status = _run_job_board(parts, args.command, stop)
    finally:
        stop.set()  # the job board ended: so do the dispatcher and the watchdog
        if thread is not None:
            thread.join()
        parts.close()
    return 1 if services.failures else status


def _run_job_board(parts: Parts, command: str, stop: threading.Event) -> int:
    settings = parts.settings
    try:
        if not parts.leader.acquire(stop):
            return 0
        if command == "rebuild":
            rebuild(
                parts.app,
                parts.view,
                batch_size=settings.projection_rebuild_batch_size,
                stop=stop,
            )
            return 0
        runner = BatchRunner(
            parts.app,
            parts.view,
            publisher=parts.publisher,
            batch_size=settings.projection_batch_size,
        )
        runner.run(parts.leader, stop, idle_wait=settings.projection_poll_interval)
    except ProjectionStoppedError as error:
        log.error("%s", error)
        return 1
    except redis.RedisError as error:
        # The batch is committed and its updates wait in the outbox: a restart publishes them.
        log.error("live publisher failed, stopping: %s: %s", type(error).__name__, error)
        return 1
    except (PersistenceError, psycopg.Error) as error:
        log.error("event store unavailable, stopping: %s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
