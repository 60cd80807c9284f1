"""Every process of an installation creates its tables at start, and they start together."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One process of an installation: the event store (events, snapshots), the job board and a
# tracking record, all created as the gateway, the handlers and the projections create them.
START = """
import sys, time
from domain.application import JobsApplication
from projections.__main__ import build_view
from projections.tracking import build_tracking, close_tracking
from tests.conftest import postgres_settings

store = postgres_settings(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
JobsApplication(store.eventsourcing_env()).close()
build_view(store).close()
close_tracking(build_tracking(store, "Dispatcher"))
"""


def test_processes_starting_together_on_a_fresh_database_all_create_their_tables(
    pg_schema: str,
) -> None:
    at = time.time() + 1.5  # every process past its imports, then all at once
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", START, pg_schema, str(at)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    failures = []
    for process in processes:
        _, err = process.communicate(timeout=60)
        if process.returncode:
            failures.append(err.strip().splitlines()[-1])
    assert failures == []
