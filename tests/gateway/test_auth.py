"""Bearer tokens: who may call, and that a client sees only its own jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.conftest import BODY_LIMIT, SPEC, Gateway

PATHS = ["/jobs", "/jobs/00000000-0000-0000-0000-000000000001", "/nodes", "/openapi.json"]


def refused(response: httpx.Response, *, invalid_token: bool) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) == invalid_token
    assert "detail" in response.json()


@pytest.mark.parametrize("path", PATHS)
def test_a_request_without_a_token_is_refused(gateway: Gateway, path: str) -> None:
    with gateway.client() as http:
        refused(http.get(path), invalid_token=False)


def test_a_submit_without_a_token_records_nothing(gateway: Gateway) -> None:
    with gateway.client() as http:
        refused(http.post("/jobs", json=SPEC), invalid_token=False)
    assert gateway.jobs.recorder.max_notification_id() in (None, 0)


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "bearer", "", "Negotiate abc"],
)
def test_a_header_of_another_scheme_or_without_a_token_is_refused(
    gateway: Gateway, header: str
) -> None:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": header}) as http:
        refused(http.get("/jobs"), invalid_token=False)


def test_an_unknown_or_malformed_token_is_refused(gateway: Gateway) -> None:
    real = gateway.tokens.create("client-a")
    token_id, secret = real.split(".")
    forged = f"{token_id}.{'A' * len(secret)}"  # a real id with a wrong secret
    for token in ["not-a-token", "ty_000000000000." + "A" * 43, forged, real + "x"]:
        with gateway.client(token=token) as http:
            refused(http.get("/jobs"), invalid_token=True)
    with gateway.client(token=real) as http:
        assert http.get("/jobs").status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_without_a_token_is_refused_not_measured(gateway: Gateway, chunked: bool) -> None:
    body = json.dumps({**SPEC, "padding": "x" * (2 * BODY_LIMIT)}).encode()
    content: bytes | Iterator[bytes] = body
    if chunked:
        content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    with gateway.client() as http:
        response = http.post("/jobs", content=content, headers={"Content-Type": "application/json"})
        # 401, not 413: who is asking is settled before anything of the body is read.
        refused(response, invalid_token=False)
    assert gateway.jobs.recorder.max_notification_id() in (None, 0)


def test_a_revoked_token_is_refused_and_other_tokens_of_the_client_still_work(
    gateway: Gateway,
) -> None:
    first = gateway.tokens.create("client-a")
    second = gateway.tokens.create("client-a")
    with gateway.client(token=first) as http:
        assert http.get("/jobs").status_code == 200
    assert gateway.tokens.revoke(first.split(".")[0])
    assert not gateway.tokens.revoke(first.split(".")[0])  # already revoked
    with gateway.client(token=first) as http:
        refused(http.get("/jobs"), invalid_token=True)
    with gateway.client(token=second) as http:
        assert http.get("/jobs").status_code == 200


def test_tokens_are_stored_hashed(gateway: Gateway) -> None:
    token = gateway.tokens.create("client-a")
    rows = gateway.db.fetchall("SELECT * FROM {schema}.client_tokens")
    assert len(rows) == 1
    secret = token.split(".")[1]
    assert all(secret not in str(value) for value in rows[0].values())


def test_the_token_command_creates_a_working_token_and_revokes_it(gateway: Gateway) -> None:
    store = gateway.store
    env = {
        **os.environ,
        "TRAINYARD_EVENT_STORE": "postgres",
        "TRAINYARD_POSTGRES_HOST": store.postgres_host,
        "TRAINYARD_POSTGRES_PORT": str(store.postgres_port),
        "TRAINYARD_POSTGRES_DBNAME": store.postgres_dbname,
        "TRAINYARD_POSTGRES_USER": store.postgres_user,
        "TRAINYARD_POSTGRES_PASSWORD": store.postgres_password,
        "TRAINYARD_POSTGRES_SCHEMA": store.postgres_schema,
    }

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "token", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    created = command("create", "client-cli")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    with gateway.client(token=token) as http:
        assert http.post("/jobs", json=SPEC).status_code == 201
    listed = command("list", "client-cli")
    assert token.split(".")[0] in listed.stdout
    assert token.split(".")[1] not in listed.stdout
    assert command("revoke", token.split(".")[0]).returncode == 0
    with gateway.client(token=token) as http:
        refused(http.get("/jobs"), invalid_token=True)
    bad = command("create", "has:colon")
    assert bad.returncode == 2
    assert "client id" in bad.stderr
