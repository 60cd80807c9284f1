"""/healthz, and how the gateway answers while a dependency is missing."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import postgres_settings
from tests.gateway.conftest import Gateway, start


def test_healthz_needs_no_token_and_reports_each_dependency(gateway: Gateway) -> None:
    with gateway.client() as http:
        response = http.get("/healthz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"event_store", "job_board", "redis"}
    assert all(check["ok"] for check in body["checks"].values())


def test_before_the_projections_run_the_board_is_unavailable_not_an_error(
    gateway: Gateway,
) -> None:
    gateway.db.execute("DROP TABLE {schema}.jobs")
    with gateway.client("client-a") as http:
        response = http.get("/jobs")
        assert response.status_code == 503
        assert "projections" in response.json()["detail"]
        health = http.get("/healthz")
    assert health.status_code == 503
    assert health.json()["status"] == "degraded"
    assert health.json()["checks"]["job_board"]["ok"] is False
    assert health.json()["checks"]["event_store"]["ok"] is True


def test_healthz_reports_redis_down(pg_schema: str, tmp_path: Path) -> None:
    # Port 9 (discard) has no Redis: the connection is refused at once.
    with start(
        postgres_settings(pg_schema), tmp_path, redis_url="redis://127.0.0.1:9/0"
    ) as gateway:
        with gateway.client() as http:
            response = http.get("/healthz")
            assert response.status_code == 503
            checks = response.json()["checks"]
            assert checks["redis"]["ok"] is False
            assert checks["redis"]["error"]
            assert checks["event_store"]["ok"] is True
        # The API itself does not need Redis.
        with gateway.client("client-a") as http:
            assert http.get("/jobs").status_code == 200
