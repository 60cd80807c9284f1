"""Submitting, reading and cancelling jobs over HTTP, on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import httpx
import pytest

from domain.application import ProgressReport
from tests.gateway.conftest import BODY_LIMIT, SPEC, Gateway
from trainer.modelstore import model_key


def submit(http: httpx.Client, **extra: object) -> str:
    response = http.post("/jobs", json={**SPEC, **extra})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    assert response.headers["Location"] == f"/jobs/{job_id}"
    return job_id


def test_a_submitted_job_shows_up_on_the_board(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        job_id = submit(http)
        # Before the projection catches up the job is read from the event store.
        early = http.get(f"/jobs/{job_id}")
        assert early.status_code == 200
        assert (early.json()["status"], early.json()["projected"]) == ("queued", False)
        gateway.project()
        response = http.get(f"/jobs/{job_id}")
        assert response.status_code == 200
        job = response.json()
        assert (job["job_id"], job["status"], job["attempt"]) == (job_id, "queued", 1)
        assert job["projected"] is True
        assert job["submitted_at"]
        assert job["position"] > 0
        listed = http.get("/jobs").json()
        assert [j["job_id"] for j in listed["jobs"]] == [job_id]
        assert listed["next_cursor"] is None
    stored = gateway.jobs.get_job(UUID(job_id))
    assert stored.client_id == "client-a"
    assert stored.spec["seed"] == 7


def test_the_list_is_newest_first_filtered_and_paginated(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        ids = [submit(http) for _ in range(5)]
        assert http.post(f"/jobs/{ids[1]}/cancel").status_code == 202
        gateway.project()
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = http.get("/jobs", params=params).json()
            seen += [j["job_id"] for j in page["jobs"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == ids[::-1]
        assert pages == 3
        cancelled = http.get("/jobs", params={"status": "cancelled"}).json()["jobs"]
        assert [j["job_id"] for j in cancelled] == [ids[1]]
        queued = http.get("/jobs", params={"status": "queued"}).json()["jobs"]
        assert len(queued) == 4
        for params, field in [
            ({"status": "done"}, "status"),
            ({"limit": "0"}, "limit"),
            ({"limit": "many"}, "limit"),
            ({"cursor": "garbage!"}, "cursor"),
        ]:
            response = http.get("/jobs", params=params)
            assert response.status_code == 400, params
            assert response.json()["errors"][0]["field"] == field


def test_two_clients_cannot_see_or_touch_each_others_jobs(gateway: Gateway) -> None:
    with gateway.client("client-a") as alice, gateway.client("client-b") as bob:
        job_id = submit(alice)
        gateway.project()
        for path in ["", "/metrics", "/events", "/model"]:
            response = bob.get(f"/jobs/{job_id}{path}")
            assert response.status_code == 404, path
            assert job_id not in response.text
        assert bob.post(f"/jobs/{job_id}/cancel").status_code == 404
        assert bob.get("/jobs").json()["jobs"] == []
        # Bob's attempts changed nothing, and the same answer as for a job that does not exist.
        assert alice.get(f"/jobs/{job_id}").json()["status"] == "queued"
        missing = bob.get(f"/jobs/{uuid4()}")
        assert missing.status_code == 404
        assert missing.json() == bob.get(f"/jobs/{job_id}").json()


def test_a_malformed_job_id_is_not_found(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        job_id = submit(http)
        metrics_stream = gateway.jobs.get_metrics(UUID(job_id)).id
        for bad in ["not-a-uuid", "123", str(metrics_stream)]:
            assert http.get(f"/jobs/{bad}").status_code == 404, bad
            assert http.post(f"/jobs/{bad}/cancel").status_code == 404, bad
            assert http.get(f"/jobs/{bad}/events").status_code == 404, bad


def test_a_bad_spec_is_refused_naming_each_field(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        response = http.post(
            "/jobs",
            json={"config": "behaviors: [", "env": {"builtin": "Reach!"}, "seed": -1, "extra": 1},
        )
        assert response.status_code == 422
        fields = {e["field"] for e in response.json()["errors"]}
        assert {"env.builtin", "seed", "extra"} <= fields
        assert any(f == "config" or f.startswith("config") for f in fields)
        assert all(e["reason"] for e in response.json()["errors"])
        not_object = http.post("/jobs", json=[1, 2])
        assert not_object.status_code == 422
        assert not_object.json()["errors"][0]["field"] == "spec"
        bad_request_id = http.post("/jobs", json={**SPEC, "request_id": 5})
        assert bad_request_id.status_code == 422
        assert bad_request_id.json()["errors"][0]["field"] == "request_id"
    assert gateway.jobs.recorder.max_notification_id() in (None, 0)


def big_body() -> bytes:
    return json.dumps({**SPEC, "padding": "x" * (2 * 1024 * 1024)}).encode()


def test_a_body_over_the_limit_is_refused_when_it_says_its_length(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        response = http.post(
            "/jobs", content=big_body(), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert str(BODY_LIMIT) in response.json()["detail"]


def test_a_chunked_body_is_cut_off_at_the_limit(gateway: Gateway) -> None:
    body = big_body()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    with gateway.client("client-a") as http:
        response = http.post(
            "/jobs", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert "Content-Length" not in response.request.headers
        assert response.status_code == 413
        assert http.get("/jobs").status_code == 200  # the server is fine
    assert gateway.jobs.recorder.max_notification_id() in (None, 0)


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_a_body_that_is_not_json_is_unsupported(gateway: Gateway, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    with gateway.client("client-a") as http:
        response = http.post("/jobs", content=json.dumps(SPEC).encode(), headers=headers)
    assert response.status_code == 415


def test_json_with_a_charset_is_accepted(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        response = http.post(
            "/jobs",
            content=json.dumps(SPEC).encode(),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
    assert response.status_code == 201


@pytest.mark.parametrize("body", [b"{", b'{"config": }', b"\xff\xfe", b""])
def test_malformed_json_is_a_bad_request(gateway: Gateway, body: bytes) -> None:
    with gateway.client("client-a") as http:
        response = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("5", "integer"),
        ("null", "null"),
        ('"a spec"', "string"),
        ("true", "boolean"),
        ("[]", "array"),
    ],
)
def test_json_that_is_not_an_object_is_refused_clearly(
    gateway: Gateway, body: str, kind: str
) -> None:
    with gateway.client("client-a") as http:
        response = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "spec"
    assert "JSON object" in error["reason"]
    assert kind in error["reason"]


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
def test_deeply_nested_json_is_refused(gateway: Gateway, depth: int) -> None:
    # 100,000 levels are far past what Python's JSON parser can hold on its stack.
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    body = json.dumps(SPEC)[:-1] + f', "padding": {nested}}}'
    with gateway.client("client-a") as http:
        response = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == "the body's JSON is nested deeper than 32 levels"
        assert http.get("/jobs").status_code == 200  # the server is fine
    assert gateway.jobs.recorder.max_notification_id() in (None, 0)


def test_json_nested_up_to_the_limit_is_read(gateway: Gateway) -> None:
    nested = "[" * 31 + "]" * 31  # 32 levels with the body's own object
    body = json.dumps(SPEC)[:-1] + f', "padding": {nested}}}'
    with gateway.client("client-a") as http:
        response = http.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    # Read, then refused for what it says: the spec has no such field.
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["padding"]


def test_a_retried_submit_with_the_same_request_id_is_the_same_job(gateway: Gateway) -> None:
    with gateway.client("client-a") as alice, gateway.client("client-b") as bob:
        first = submit(alice, request_id="req-1")
        again = submit(alice, request_id="req-1")
        assert again == first
        assert submit(alice, request_id="req-2") != first
        # Another client's request ids are its own.
        assert submit(bob, request_id="req-1") != first
        conflict = alice.post("/jobs", json={**SPEC, "seed": 8, "request_id": "req-1"})
        assert conflict.status_code == 409
        gateway.project()
        assert len(alice.get("/jobs").json()["jobs"]) == 2


def test_cancelling_a_queued_job_cancels_it(gateway: Gateway) -> None:
    with gateway.client("client-a") as http:
        job_id = submit(http)
        response = http.post(f"/jobs/{job_id}/cancel")
        assert response.status_code == 202
        assert response.json() == {"job_id": job_id, "status": "cancelled"}
        assert http.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # harmless
        gateway.project()
        assert http.get(f"/jobs/{job_id}").json()["status"] == "cancelled"


def complete(gateway: Gateway, job_id: str, tmp_path: Path, model: bytes) -> str:
    """Run the job to completion as a train node would, with a stored model."""
    uuid = UUID(job_id)
    assert gateway.jobs.claim(uuid, 1, "node-1").granted
    gateway.jobs.report_started(uuid, 1, 1, {"mlagents": "1.1.0"}, node_id="node-1")
    gateway.jobs.report_progress_batch(
        uuid, [ProgressReport(1, seq, seq * 100, {"reward": seq / 10}) for seq in range(2, 7)]
    )
    key = model_key(uuid, 1, "Reach.onnx")
    source = tmp_path / "Reach.onnx"
    source.write_bytes(model)
    stored = gateway.models.put_file(key, source)
    gateway.jobs.report_completed(uuid, 1, 7, key, stored.sha256, node_id="node-1")
    return stored.sha256


def test_metrics_events_and_model_of_a_completed_job(gateway: Gateway, tmp_path: Path) -> None:
    model = bytes(range(256)) * 5000  # over one chunk
    with gateway.client("client-a") as http:
        job_id = submit(http)
        not_yet = http.get(f"/jobs/{job_id}/model")
        assert not_yet.status_code == 409
        assert "queued" in not_yet.json()["detail"]
        sha256 = complete(gateway, job_id, tmp_path, model)
        gateway.project()

        job = http.get(f"/jobs/{job_id}").json()
        assert (job["status"], job["model_sha256"]) == ("completed", sha256)
        assert job["latest"]["seq"] == 6

        first = http.get(f"/jobs/{job_id}/metrics", params={"limit": 3}).json()
        rest = http.get(
            f"/jobs/{job_id}/metrics", params={"limit": 3, "cursor": first["next_cursor"]}
        ).json()
        assert [m["seq"] for m in first["metrics"] + rest["metrics"]] == [2, 3, 4, 5, 6]
        assert rest["next_cursor"] is None
        assert first["metrics"][0]["stats"] == {"reward": 0.2}

        events = http.get(f"/jobs/{job_id}/events", params={"limit": 4}).json()
        history = events["events"]
        while events["next_after"] is not None:
            events = http.get(
                f"/jobs/{job_id}/events", params={"limit": 4, "after": events["next_after"]}
            ).json()
            history += events["events"]
        positions = [e["position"] for e in history]
        assert positions == sorted(positions)
        assert len(set(positions)) == len(positions)
        job_events = [e["type"] for e in history if e["stream"] == "job"]
        assert job_events == [
            "Job.Submitted",
            "Job.Queued",
            "Job.Claimed",
            "Job.Started",
            "Job.Completed",
        ]
        reported = [e for e in history if e["type"] == "JobMetrics.Reported"]
        assert [e["data"]["seq"] for e in reported] == [2, 3, 4, 5, 6]
        submitted = history[0]
        assert submitted["data"]["client_id"] == "client-a"
        assert submitted["data"]["spec"]["seed"] == 7
        # The same positions the job board records.
        assert job["position"] == max(e["position"] for e in history if e["stream"] == "job")

        response = http.get(f"/jobs/{job_id}/model")
        assert response.status_code == 200
        assert response.content == model
        assert response.headers["X-Model-SHA256"] == hashlib.sha256(model).hexdigest() == sha256
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert 'filename="Reach.onnx"' in response.headers["Content-Disposition"]

        finished = http.post(f"/jobs/{job_id}/cancel")
        assert finished.status_code == 409
        assert "completed" in finished.json()["detail"]


async def test_concurrent_retries_of_one_submit_make_one_job(gateway: Gateway) -> None:
    token = gateway.tokens.create("client-a")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http:
        responses = await asyncio.gather(
            *(http.post("/jobs", json={**SPEC, "request_id": "same"}) for _ in range(12)),
            *(http.post("/jobs", json=SPEC) for _ in range(4)),
        )
    assert [r.status_code for r in responses] == [201] * 16
    ids = [r.json()["job_id"] for r in responses]
    assert len(set(ids[:12])) == 1
    assert len(set(ids)) == 5
    gateway.project()
    with gateway.client(token=token) as http:
        assert len(http.get("/jobs").json()["jobs"]) == 5


def test_a_corrupted_model_is_never_served_whole(gateway: Gateway, tmp_path: Path) -> None:
    model = b"\x08\x07onnx" * 400_000  # several chunks
    with gateway.client("client-a") as http:
        job_id = submit(http)
        complete(gateway, job_id, tmp_path, model)
        stored = gateway.models.root / model_key(UUID(job_id), 1, "Reach.onnx")
        corrupted = bytearray(stored.read_bytes())
        corrupted[-1] ^= 0xFF  # same size, so only hashing the bytes can tell
        stored.write_bytes(bytes(corrupted))
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(f"/jobs/{job_id}/model")
