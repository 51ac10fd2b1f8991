"""Security: API keys and scopes on every /v1 route (SSE included), keys and database
passwords kept out of logs and errors, limits, CORS closed by default, dashboard headers.

Real ``tierline web`` processes over HTTP; one database for the module.
"""

from __future__ import annotations

import hmac
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from tests.jobs_app import RUNS_TABLE, TEST_APP
from tierline.testing.databases import migrate, query
from tierline.testing.postgres import PostgresServer
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for
from tierline.web import auth
from tierline.web.auth import KeyRing
from tierline.web.errors import ApiError

pytestmark = pytest.mark.e2e

FULL = "full-key-4b1d9c7e"
ENQ = "enq-key-93ac21f0"
READ = "read-key-5e7d2a19"
ADMIN = "admin-key-c0ffee42"
ENQ_READ = "enqread-key-77aa31"
WRONG = "wrong-key-0d15ea5e"
KEYS = f"{FULL},{ENQ}:enqueue,{READ}:read,{ADMIN}:admin,{ENQ_READ}:enqueue+read"
SECRETS = (FULL, ENQ, READ, ADMIN, ENQ_READ, WRONG)

# Every /v1 route and the scope it needs; the OpenAPI document must list no other.
ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/v1/jobs"): "enqueue",
    ("POST", "/v1/jobs/batch"): "enqueue",
    ("GET", "/v1/jobs"): "read",
    ("GET", "/v1/jobs/{job_id}"): "read",
    ("POST", "/v1/jobs/{job_id}/cancel"): "admin",
    ("POST", "/v1/jobs/{job_id}/retry"): "admin",
    ("GET", "/v1/jobs/{job_id}/events"): "read",
    ("GET", "/v1/events"): "read",
    ("GET", "/v1/queues"): "read",
    ("PATCH", "/v1/queues/{name}"): "admin",
    ("POST", "/v1/queues/{name}/retry-failed"): "admin",
    ("GET", "/v1/schedules"): "read",
    ("GET", "/v1/cluster"): "read",
    ("GET", "/v1/recommendations"): "read",
}
# A key that lacks the scope (and is not admin, which implies every scope).
LACKING = {"enqueue": READ, "read": ENQ, "admin": ENQ_READ}
HAVING = {"enqueue": ENQ, "read": READ, "admin": ADMIN}

LIMITS = {
    "TIERLINE_MAX_BODY_BYTES": 4096,
    "TIERLINE_MAX_BATCH_SIZE": 5,
    "TIERLINE_MAX_ARGS_BYTES": 256,
    "TIERLINE_MAX_EVENTS_PER_JOB": 10,
}


@pytest.fixture(scope="module")
def secured(module_cluster: Cluster) -> tuple[Proc, str]:
    """A web replica with keys, protected metrics and small limits."""
    proc, url = module_cluster.web(TIERLINE_API_KEYS=KEYS, TIERLINE_PROTECT_METRICS=1, **LIMITS)
    module_cluster.wait_ready(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def open_web(module_cluster: Cluster) -> tuple[Proc, str]:
    """A web replica with the defaults: no keys, no CORS origins."""
    proc, url = module_cluster.web()
    module_cluster.wait_ready(url, proc)
    return proc, url


@pytest.fixture(scope="module")
def job_id(secured: tuple[Proc, str]) -> int:
    """A finished job (so cancel and retry have something to act on)."""
    _, url = secured
    r = httpx.post(
        f"{url}/v1/jobs",
        json={"kind": "noop", "delay_s": 3600},
        headers={"Authorization": f"Bearer {FULL}"},
    )
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def call(
    url: str, method: str, template: str, job_id: int, key: str | None, **kw: Any
) -> httpx.Response:
    """One request; SSE streams are opened, their status and headers read, then closed."""
    path = template.replace("{job_id}", str(job_id)).replace("{name}", "default")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body: Any = None
    if template == "/v1/jobs":
        body = {"kind": "noop"} if method == "POST" else None
    elif template.endswith("/batch"):
        body = {"jobs": [{"kind": "noop"}]}
    elif method == "PATCH":
        body = {"paused": False}
    with (
        httpx.Client(timeout=10) as client,
        client.stream(method, url + path, json=body, headers=headers, **kw) as r,
    ):
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r  # the body never ends by itself: leave now
        r.read()
        return r


def _v1_routes(url: str) -> set[tuple[str, str]]:
    spec = httpx.get(f"{url}/openapi.json", timeout=10).json()
    return {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1")
        for method in ops
    }


def test_every_v1_route_is_in_the_scope_table(open_web: tuple[Proc, str]) -> None:
    routes = _v1_routes(open_web[1])
    unknown = routes - set(ROUTES)
    assert not unknown, f"add these routes (and their scope) to ROUTES: {sorted(unknown)}"
    assert len(routes) >= 10


def test_every_v1_route_requires_a_key_with_its_scope(
    secured: tuple[Proc, str], job_id: int
) -> None:
    _, url = secured
    routes = _v1_routes(url)
    for (method, template), scope in ROUTES.items():
        if (method, template) not in routes:
            continue
        where = f"{method} {template}"
        r = call(url, method, template, job_id, None)
        assert r.status_code == 401, f"{where} without a key: {r.status_code}"
        assert r.headers.get("www-authenticate") == "Bearer", where
        assert r.json()["error"]["code"] == "unauthorized", where
        r = call(url, method, template, job_id, WRONG)
        assert r.status_code == 401, f"{where} with a wrong key: {r.status_code}"
        basic = httpx.BasicAuth(FULL, FULL)  # a valid key in the wrong scheme
        r = call(url, method, template, job_id, None, auth=basic)
        assert r.status_code == 401, f"{where} with Basic auth: {r.status_code}"
        r = call(url, method, template, job_id, LACKING[scope])
        assert r.status_code == 403, f"{where} with a key lacking {scope!r}: {r.status_code}"
        assert r.json()["error"]["code"] == "forbidden", where
        for key in (HAVING[scope], FULL, ADMIN):
            r = call(url, method, template, job_id, key)
            assert r.status_code not in (401, 403, 500), f"{where} with scope: {r.status_code}"
            assert r.status_code in (200, 202, 409), f"{where}: {r.status_code} {r.text}"


def test_streams_open_with_a_read_key(secured: tuple[Proc, str], job_id: int) -> None:
    _, url = secured
    for template in ("/v1/jobs/{job_id}/events", "/v1/events"):
        r = call(url, "GET", template, job_id, READ)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code review of web/auth.py, held by a test: digests of equal length are compared
    with ``hmac.compare_digest`` against every key, with no early exit."""
    ring = KeyRing(KEYS)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # what auth calls

    def request(token: str) -> Request:
        header = f"Bearer {token}".encode()
        return Request({"type": "http", "headers": [(b"authorization", header)]})

    for token in (FULL, ENQ_READ, WRONG, FULL[:-1], "x" * 500):
        calls.clear()
        try:
            ring.check(request(token), "read")
        except ApiError:
            pass
        assert len(calls) == len(ring.keys) == 5, token  # every key, whichever matched
        assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
    source = Path(auth.__file__).read_text()
    assert "compare_digest" in source and "==" not in source.split("def check", 1)[1]


def test_metrics_and_dashboard_can_be_protected(
    secured: tuple[Proc, str], open_web: tuple[Proc, str]
) -> None:
    _, url = secured
    assert httpx.get(url + "/metrics").status_code == 401
    wrong = {"Authorization": f"Bearer {WRONG}"}
    assert httpx.get(url + "/metrics", headers=wrong).status_code == 401
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 200 and "tierline_" in r.text
    for path in ("/healthz", "/readyz"):  # probes stay open: kubelets carry no keys
        assert httpx.get(url + path).status_code == 200
    _, open_url = open_web
    assert httpx.get(open_url + "/metrics").status_code == 200
    # The dashboard page is static and holds no data (a browser navigating to it cannot
    # send a key); everything it shows comes from /v1 routes, which require one.
    protected_page = httpx.get(url + "/")
    assert protected_page.status_code == 200
    assert protected_page.text == httpx.get(open_url + "/").text


def test_dashboard_security_headers(open_web: tuple[Proc, str]) -> None:
    r = httpx.get(open_web[1] + "/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_cors_is_closed_by_default_and_open_only_to_listed_origins(
    module_cluster: Cluster, open_web: tuple[Proc, str]
) -> None:
    foreign = {"Origin": "https://evil.example"}
    preflight = {
        **foreign,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    _, url = open_web
    r = httpx.get(f"{url}/v1/jobs", headers=foreign)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{url}/v1/jobs", headers=preflight)
    assert "access-control-allow-origin" not in r.headers and r.status_code >= 400

    proc, cors_url = module_cluster.web(TIERLINE_CORS_ORIGINS="https://ok.example")
    module_cluster.wait_ready(cors_url, proc)
    r = httpx.get(f"{cors_url}/v1/jobs", headers=foreign)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(f"{cors_url}/v1/jobs", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    ok = {"Origin": "https://ok.example"}
    r = httpx.get(f"{cors_url}/v1/jobs", headers=ok)
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    r = httpx.options(
        f"{cors_url}/v1/jobs", headers={**ok, "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    assert "*" not in r.headers["access-control-allow-origin"]


def test_limits(secured: tuple[Proc, str], module_cluster: Cluster, module_db: str) -> None:
    _, url = secured
    auth_h = {"Authorization": f"Bearer {FULL}"}
    with httpx.Client(headers=auth_h, timeout=10) as c:
        # Body size: by Content-Length, and while reading a chunked body without one.
        big = {"kind": "noop", "args": {}, "pad": "x" * 5000}
        r = c.post(f"{url}/v1/jobs", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post(
            f"{url}/v1/jobs",
            content=iter([b'{"kind": "noop", "pad": "', b"x" * 3000, b"x" * 3000, b'"}']),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413, r.text
        # Batch size.
        r = c.post(f"{url}/v1/jobs/batch", json={"jobs": [{"kind": "noop"}] * 6})
        assert r.status_code == 413 and "at most 5" in r.json()["error"]["message"]
        r = c.post(f"{url}/v1/jobs/batch", json={"jobs": [{"kind": "noop"}] * 5})
        assert r.status_code == 202
        # Args size.
        r = c.post(f"{url}/v1/jobs", json={"kind": "record", "args": {"token": "y" * 300}})
        assert r.status_code == 422 and "256 bytes" in r.json()["error"]["message"]
        # Events per job: 50 progress events against a cap of 10.
        r = c.post(f"{url}/v1/jobs", json={"kind": "progress_sync", "args": {"steps": 50}})
        assert r.status_code == 202
        job = r.json()["id"]
    worker, wurl = module_cluster.worker(**LIMITS)
    module_cluster.wait_ready(wurl, worker)
    wait_for(
        lambda: (
            query(module_db, "SELECT state FROM tierline.jobs WHERE id = %s", (job,))[0]["state"]
            == "succeeded"
        ),
        30,
        "the chatty job to finish",
    )
    events = query(
        module_db, "SELECT seq, type FROM tierline.jobs j JOIN tierline.job_stream e "
        "ON e.job_id = j.id WHERE j.id = %s ORDER BY seq", (job,)
    )  # fmt: skip
    # The cap bounds progress and logs; the final event is always stored.
    assert len(events) <= LIMITS["TIERLINE_MAX_EVENTS_PER_JOB"] + 1, events
    assert events[-1]["type"] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_keys_are_never_logged(
    secured: tuple[Proc, str], module_cluster: Cluster, job_id: int, tmp_path: Path
) -> None:
    """Runs after the requests above (file order): every key, right or wrong, was sent."""
    _, url = secured
    httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {WRONG}"})
    httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {FULL}{WRONG}"})
    out = subprocess.run(
        [sys.executable, "-m", "tierline", "config"],
        env=tierline_env("postgresql://x@127.0.0.1:1/x", TIERLINE_API_KEYS=KEYS),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    texts = {p.log_path.name: p.output() for p in module_cluster.procs}
    texts["tierline config"] = out.stdout + out.stderr
    assert any("unauthorized" in t or "401" in t or "listening" in t for t in texts.values())
    for name, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} appears in {name}"


PASSWORD = "Sup3r-S3cret-pw-81f2"
WRONG_PASSWORD = "Wr0ng-pw-not-this-5c1e"


@pytest.fixture(scope="module")
def pw_server() -> Iterator[PostgresServer]:
    server = PostgresServer(password=PASSWORD).start()
    try:
        migrate(server.url(), RUNS_TABLE)
        yield server
    finally:
        server.close()


def test_database_passwords_are_redacted(pw_server: PostgresServer, tmp_path: Path) -> None:
    good = pw_server.url()
    bad = good.replace(PASSWORD, WRONG_PASSWORD)
    assert PASSWORD in good and WRONG_PASSWORD in bad
    outputs: dict[str, str] = {}

    def cli(name: str, *args: str, url: str, code: int | None = None) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "tierline", *args],
            env=tierline_env(
                url, TIERLINE_DATABASE_DIRECT_URL=url, TIERLINE_DB_CONNECT_TIMEOUT_S=2
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        outputs[name] = out.stdout + out.stderr
        if code is not None:
            assert out.returncode == code, outputs[name]

    cli("config", "config", url=good, code=0)
    assert "TIERLINE_DATABASE_URL" in outputs["config"]
    cli("migrate --check (good)", "migrate", "--check", url=good, code=0)
    cli("migrate (wrong password)", "migrate", url=bad)
    cli("plan (wrong password)", "plan", "--web", "1", "--workers", "1", url=bad)
    assert "password authentication failed" in outputs["migrate (wrong password)"]

    cluster = Cluster(bad, tmp_path, TIERLINE_APP=TEST_APP, TIERLINE_DB_CONNECT_TIMEOUT_S=2)
    try:
        web, url = cluster.web()
        worker, _ = cluster.worker()

        def answered_not_ready() -> bool:
            r = httpx.get(f"{url}/readyz", timeout=5)
            outputs["readyz"] = r.text
            return r.status_code == 503 and "password" in r.text

        wait_for(answered_not_ready, 30, "the web tier to report the failed login")
        r = httpx.post(f"{url}/v1/jobs", json={"kind": "noop"}, timeout=10)
        assert r.status_code == 503
        outputs["POST /v1/jobs"] = r.text
        wait_for(lambda: "password" in worker.output(), 30, "the worker to log the failure")
        ok_web, ok_url = cluster.web(TIERLINE_DATABASE_URL=good, TIERLINE_DATABASE_DIRECT_URL=good)
        cluster.wait_ready(ok_url, ok_web)
        outputs["metrics (good)"] = httpx.get(f"{ok_url}/metrics").text
        outputs["cluster (good)"] = httpx.get(f"{ok_url}/v1/cluster").text
        for p in (web, worker, ok_web):
            p.stop()
        for p in cluster.procs:
            outputs[p.log_path.name] = p.output()
    finally:
        cluster.close()
    assert "password authentication failed" in outputs[web.log_path.name]
    for name, text in outputs.items():
        assert PASSWORD not in text, f"the password appears in {name}:\n{text[-2000:]}"
        assert WRONG_PASSWORD not in text, f"the wrong password appears in {name}"
