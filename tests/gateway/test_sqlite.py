"""The same gateway on the embedded SQLite store (local mode) and on PostgreSQL."""

from __future__ import annotations

from tests.gateway.conftest import SPEC, Gateway


def test_submit_list_cancel_and_history(any_gateway: Gateway) -> None:
    gateway = any_gateway
    with gateway.client("client-a") as alice, gateway.client("client-b") as bob:
        ids = [alice.post("/jobs", json=SPEC).json()["job_id"] for _ in range(3)]
        assert alice.post(f"/jobs/{ids[0]}/cancel").json()["status"] == "cancelled"
        gateway.project()
        page = alice.get("/jobs", params={"limit": 2}).json()
        rest = alice.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert [j["job_id"] for j in page["jobs"] + rest["jobs"]] == ids[::-1]
        assert alice.get(f"/jobs/{ids[0]}").json()["status"] == "cancelled"
        assert [j["job_id"] for j in alice.get("/jobs?status=cancelled").json()["jobs"]] == [ids[0]]
        history = alice.get(f"/jobs/{ids[0]}/events").json()["events"]
        assert [(e["stream"], e["type"]) for e in history] == [
            ("job", "Job.Submitted"),
            ("job", "Job.Queued"),
            ("metrics", "JobMetrics.Opened"),
            ("job", "Job.Cancelled"),
        ]
        positions = [e["position"] for e in history]
        assert positions == sorted(set(positions))
        assert bob.get(f"/jobs/{ids[0]}").status_code == 404
        assert bob.get("/jobs").json()["jobs"] == []
        health = alice.get("/healthz").json()
        assert health["status"] == "ok", health
