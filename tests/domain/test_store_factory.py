"""Every process of an installation creates its tables at start, and they start together."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One process of an installation: the event store (events, snapshots), the job board, a
# tracking record and the gateway's tokens, all created as the processes create them.
START = """
import sys, time
from domain.application import JobsApplication
from gateway.db import create_database
from gateway.tokens import TokenStore
from projections.__main__ import build_view
from projections.tracking import build_tracking, close_tracking
from tests.conftest import postgres_settings

store = postgres_settings(sys.argv[1])
while time.time() < float(sys.argv[2]):
    pass
JobsApplication(store.eventsourcing_env()).close()
build_view(store).close()
close_tracking(build_tracking(store, "Dispatcher"))
db = create_database(store)
db.open()
TokenStore(db).create_table()
db.close()
"""

# The gateway's workers: the tokens table only.
TOKENS = """
import sys, time
from gateway.db import create_database
from gateway.tokens import TokenStore
from tests.conftest import postgres_settings

db = create_database(postgres_settings(sys.argv[1]))
db.open()
while time.time() < float(sys.argv[2]):
    pass
TokenStore(db).create_table()
db.close()
"""


def start_together(script: str, schema: str, count: int = 6) -> list[str]:
    """Run `script` in `count` processes that reach its work at the same moment; failures."""
    at = time.time() + 1.5  # every process past its imports, then all at once
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, schema, str(at)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    failures = []
    for process in processes:
        _, err = process.communicate(timeout=60)
        if process.returncode:
            failures.append(err.strip().splitlines()[-1])
    return failures


def test_processes_starting_together_on_a_fresh_database_all_create_their_tables(
    pg_schema: str,
) -> None:
    assert start_together(START, pg_schema) == []


def test_gateway_workers_starting_together_all_create_the_tokens_table(pg_schema: str) -> None:
    assert start_together(TOKENS, pg_schema) == []
