"""The web tier's HTTP contract against a real process: statuses and the error shape."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

KEYS = "all-access-key-1,enqueue-only-key:enqueue,reader-key-123:read"


@pytest.fixture
def api(cluster: Cluster) -> Any:
    web, url = cluster.web(
        TIERLINE_APP="tests.jobs_app:app",
        TIERLINE_API_KEYS=KEYS,
        TIERLINE_MAX_BODY_BYTES=4096,
        TIERLINE_MAX_BATCH_SIZE=5,
    )
    cluster.wait_ready(url, web)
    with httpx.Client(
        base_url=url, timeout=10, headers={"Authorization": "Bearer all-access-key-1"}
    ) as client:
        yield client


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["status"] == status and body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


def test_enqueue_get_and_repeat_key(api: httpx.Client) -> None:
    r = api.post("/v1/jobs", json={"kind": "add", "args": {"a": 1}, "idempotency_key": "x"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert {
        "id",
        "kind",
        "queue",
        "state",
        "attempt",
        "result",
        "error",
        "created_at",
        "run_at",
        "started_at",
        "finished_at",
    } <= set(job)
    again = api.post("/v1/jobs", json={"kind": "add", "args": {"a": 1}, "idempotency_key": "x"})
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "available"
    batch = api.post(
        "/v1/jobs/batch", json={"jobs": [{"kind": "noop"}, {"kind": "add", "args": {"a": 2}}]}
    )
    assert batch.status_code == 202 and [j["created"] for j in batch.json()["jobs"]] == [True, True]


def test_bad_requests_are_4xx_json(api: httpx.Client) -> None:
    error_of(
        api.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    error_of(api.post("/v1/jobs", json=[1, 2]), 422, "invalid_request")
    error_of(api.post("/v1/jobs", json={"args": {}}), 422, "invalid_request")
    unknown = error_of(api.post("/v1/jobs", json={"kind": "nope"}), 422, "unknown_kind")
    assert "add" in unknown["details"]["known_kinds"] and "known kinds" in unknown["message"]
    error_of(api.post("/v1/jobs", json={"kind": "add", "args": {"a": "one"}}), 422, "invalid_job")
    error_of(
        api.post("/v1/jobs", json={"kind": "add", "args": {"a": 1}, "priority": 10**9}),
        422,
        "invalid_request",
    )
    error_of(
        api.post("/v1/jobs", json={"kind": "noop", "delay_s": 1, "run_at": "2030-01-01T00:00:00Z"}),
        422,
        "invalid_request",
    )
    error_of(
        api.post("/v1/jobs", json={"kind": "noop", "args": {"x": "y" * 5000}}),
        413,
        "payload_too_large",
    )
    error_of(
        api.post("/v1/jobs/batch", json={"jobs": [{"kind": "noop"}] * 6}), 413, "payload_too_large"
    )
    error_of(api.get("/v1/jobs/abc"), 422, "invalid_request")
    error_of(api.get("/v1/jobs/0"), 422, "invalid_request")
    error_of(api.get("/v1/jobs/99999999"), 404, "not_found")
    error_of(api.get("/v1/jobs?state=bogus"), 422, "invalid_request")
    error_of(api.get("/v1/nothing-here"), 404, "not_found")
    error_of(api.delete("/v1/jobs"), 405, "method_not_allowed")
    done = api.post("/v1/jobs", json={"kind": "noop", "delay_s": 60}).json()
    assert api.post(f"/v1/jobs/{done['id']}/cancel").json()["state"] == "cancelled"
    error_of(api.post(f"/v1/jobs/{done['id']}/cancel"), 409, "conflict")


def test_keys_and_scopes(api: httpx.Client) -> None:
    url = str(api.base_url)
    with httpx.Client(base_url=url, timeout=10) as anon:
        error_of(anon.get("/v1/jobs"), 401, "unauthorized")
        error_of(
            anon.get("/v1/jobs", headers={"Authorization": "Bearer wrong-key-xx"}),
            401,
            "unauthorized",
        )
        error_of(anon.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
        enq = {"Authorization": "Bearer enqueue-only-key"}
        assert anon.post("/v1/jobs", json={"kind": "noop"}, headers=enq).status_code == 202
        error_of(anon.get("/v1/jobs", headers=enq), 403, "forbidden")
        read = {"Authorization": "Bearer reader-key-123"}
        assert anon.get("/v1/jobs", headers=read).status_code == 200
        error_of(anon.post("/v1/jobs", json={"kind": "noop"}, headers=read), 403, "forbidden")
        error_of(anon.post("/v1/jobs/1/cancel", headers=read), 403, "forbidden")
        # health endpoints stay open for orchestrators
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/readyz").status_code == 200


def test_openapi_lists_the_routes(api: httpx.Client) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/retry",
        "/v1/jobs/{job_id}/events",
        "/v1/events",
        "/v1/queues",
        "/v1/cluster",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path


def test_readyz_503_until_schema_exists(cluster: Cluster, empty_db_url: str) -> None:
    from tierline.testing.processes import tierline_env

    cluster.db_url = empty_db_url
    web, url = cluster.web()

    def not_ready() -> dict[str, Any] | None:
        r = httpx.get(f"{url}/readyz", timeout=2)
        body = r.json() if r.status_code == 503 else None
        return body if body and "tierline migrate" in body["reason"] else None

    wait_for(not_ready, 30, "/readyz to answer 503, naming `tierline migrate`")
    error_of(httpx.post(f"{url}/v1/jobs", json={"kind": "noop"}), 503, "not_ready")
    import subprocess
    import sys

    from tierline.testing.routing import ROUTE

    # Roles mode (TIERLINE_TEST_ROLES=1): a schema made after start-up needs its grants.
    roles = [f"--{tier}-role={role}" for tier, role in ROUTE.roles.items()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tierline",
            "migrate",
            *(["--create-roles", *roles] if roles else []),
        ],
        env=tierline_env(empty_db_url),
        check=True,
        capture_output=True,
        timeout=60,
    )
    cluster.wait_ready(url, web, timeout=60)


def test_worker_without_listen_falls_back_to_polling(cluster: Cluster, db_url: str) -> None:
    """A broken direct URL costs LISTEN only: jobs still run, found by polling."""
    web, url = cluster.web()
    worker, wurl = cluster.worker(
        TIERLINE_DATABASE_DIRECT_URL="postgresql://postgres@127.0.0.1:1/nowhere",
        TIERLINE_WORKER_POLL_INTERVAL_S=0.3,
    )
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    job = httpx.post(f"{url}/v1/jobs", json={"kind": "echo", "args": {"x": 1}}).json()
    wait_for(
        lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] == "succeeded",
        30,
        "the job to be found by polling",
    )
    assert "LISTEN connection failed" in worker.output()
