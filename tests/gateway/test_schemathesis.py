"""Property-based checks of every documented operation against the live gateway (schemathesis).

The OpenAPI document is fetched from the running server, exactly as a client would see it;
each operation then gets generated requests, valid and invalid, and every answer must be one
the document lists, with the documented content type and body schema, and never a 5xx.
Examples are derandomized (a fixed seed per operation), so a run is repeatable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio.to_thread
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from redis.asyncio import Redis
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import postgres_settings
from tests.gateway.conftest import REDIS_URL, Gateway, start
from tests.gateway.test_jobs import complete, submit
from tests.gateway.test_nodes import beat, delete_prefix, presence_for, unique_prefix

# Uploads (builds) are opaque bytes, sent as they are generated.
schemathesis.serializer.alias(["application/gzip", "application/zip"], "application/octet-stream")

EXAMPLES = 20  # per operation and mode: bounded, so the whole test takes well under a minute
Operation = schemathesis.APIOperation[Any, Any, Any, Any]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def run_operation(
    operation: Operation,
    mode: schemathesis.GenerationMode,
    base_url: str,
    headers: dict[str, str],
    path_parameters: dict[str, str] | None = None,
) -> str | None:
    """Generated requests to one operation; the first failure found, as text, or None."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case: schemathesis.Case[Operation]) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)

    try:
        run()
    except FailureGroup as group:  # one request failed several checks
        found = "\n".join(str(failure) for failure in group.exceptions)
    except AssertionError as failure:  # one request failed one check
        found = str(failure)
    except Unsatisfiable:
        if mode is schemathesis.GenerationMode.NEGATIVE:
            return None  # nothing in this operation's request can be made invalid
        raise
    else:
        return None
    return f"{operation.label} ({mode.value}):\n{found}"


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, pg_schema: str, tmp_path: Path) -> Iterator[Gateway]:
    """The gateway on a fresh PostgreSQL schema, with a Redis key prefix of its own."""
    monkeypatch.setenv("TRAINYARD_REDIS_KEY_PREFIX", unique_prefix())
    with start(postgres_settings(pg_schema), tmp_path) as gateway:
        yield gateway


async def test_every_operation_answers_as_documented(gateway: Gateway, tmp_path: Path) -> None:
    token = gateway.tokens.create("client-a")
    headers = {"Authorization": f"Bearer {token}"}
    # A completed job with metrics and a model, and a running one on a live node, so that
    # operations on a job also meet real ones and the node list is not empty.
    with gateway.client(token=token) as http:
        job_id = submit(http)
        running = submit(http)
    complete(gateway, job_id, tmp_path, b"onnx" * 100)
    assert gateway.jobs.claim(UUID(running), 1, "node-1").granted
    gateway.project()
    prefix = os.environ["TRAINYARD_REDIS_KEY_PREFIX"]
    redis = Redis.from_url(REDIS_URL)
    try:
        await presence_for(redis, prefix).record(beat("node-1", slots=2, running=[(running, 1)]))
        await presence_for(redis, prefix).record(beat("node-2", slots=1, draining=True))
        # schemathesis is synchronous: run it off this test's event loop.
        await anyio.to_thread.run_sync(check_every_operation, gateway.url, headers, job_id)
    finally:
        await delete_prefix(redis, prefix)
        await redis.aclose()


def check_every_operation(base_url: str, headers: dict[str, str], job_id: str) -> None:
    """Generated requests to every operation of the live document; every failure found."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers)
    failures: list[str] = []
    operations: list[Operation] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"an operation the document cannot describe: {result.err()}"
        operations.append(result.ok())
    assert {op.label for op in operations} >= {"GET /nodes", "POST /jobs", "GET /jobs/{job_id}"}
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            failure = run_operation(operation, mode, base_url, headers)
            if failure:
                failures.append(failure)
            if "{job_id}" in operation.path and mode is schemathesis.GenerationMode.POSITIVE:
                failure = run_operation(
                    operation, mode, base_url, headers, path_parameters={"job_id": job_id}
                )
                if failure:
                    failures.append(failure)
    assert not failures, "\n\n".join(failures)
