"""The web tier hosts the application's own ASGI app (``TIERLINE_WEB_APP``): its routes
beside Tierline's API (moved under a prefix), timed by route template, on connections of
the tier's budgeted pool, with the application's lifespan, and a transactional enqueue."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.jobs_app import TEST_APP
from tests.web_app import ORDERS_TABLE
from tierline.testing.databases import migrate, query
from tierline.testing.processes import Cluster, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

WEB_APP = "tests.web_app:api"


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_application_routes_beside_tierline_api(cluster: Cluster) -> None:
    proc, url = cluster.web(TIERLINE_APP=TEST_APP, TIERLINE_WEB_APP=WEB_APP)
    cluster.wait_ready(url, proc)
    assert httpx.get(f"{url}/hello").json() == {"hello": "world", "state": "lifespan"}
    item = httpx.get(f"{url}/v1/items/7")
    assert item.status_code == 200 and item.json()["id"] == 7
    assert httpx.get(f"{url}/plain/answer").json() == {"answer": 42}
    # Tierline's own API and dashboard under the prefix; probes at the root.
    queues = httpx.get(f"{url}/tierline/v1/queues")
    assert queues.status_code == 200, queues.text
    page = httpx.get(f"{url}/tierline/")
    assert page.status_code == 200 and 'content="/tierline"' in page.text
    assert 'src="/tierline/static/app.js"' in page.text
    assert httpx.get(f"{url}/tierline/static/app.js").status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert httpx.get(f"{url}/nope").status_code == 404  # the application's own 404
    text = httpx.get(f"{url}/metrics").text
    duration = "tierline_http_request_duration_seconds_count"
    assert metric(text, duration, route="/v1/items/{item_id}", method="GET", status="200")
    assert metric(text, duration, route="/hello", method="GET", status="200")
    assert metric(text, duration, route="/v1/queues", method="GET", status="200")
    assert 'route="/v1/items/7"' not in text  # templates, never raw paths


def test_route_holding_a_connection_counts_and_exhausted_pool_answers_503(
    cluster: Cluster, db_url: str
) -> None:
    proc, url = cluster.web(
        TIERLINE_APP=TEST_APP,
        TIERLINE_WEB_APP=WEB_APP,
        TIERLINE_WEB_DB_POOL_MIN=1,
        TIERLINE_WEB_DB_POOL_MAX=2,
        TIERLINE_DB_POOL_TIMEOUT_S=1,
    )
    cluster.wait_ready(url, proc)
    with ThreadPoolExecutor(6) as pool:
        holders = [pool.submit(httpx.get, f"{url}/hold?seconds=10", timeout=30) for _ in range(2)]

        def in_use() -> float | None:
            return metric(
                httpx.get(f"{url}/metrics").text,
                "tierline_db_pool_connections",
                tier="web",
                state="in_use",
            )

        wait_for(lambda: (in_use() or 0) >= 2, 15, "two connections in use")
        waiters = [pool.submit(httpx.get, f"{url}/v1/items/1", timeout=30) for _ in range(3)]
        answers = [w.result() for w in waiters]
        assert all(h.result().status_code == 200 for h in holders)
    assert {a.status_code for a in answers} == {503}, [a.text for a in answers]
    body = answers[0].json()
    assert body["error"]["status"] == 503 and body["error"]["code"] == "pool_timeout", body
    text = httpx.get(f"{url}/metrics").text
    assert (metric(text, "tierline_db_pool_waits_total", tier="web") or 0) >= 3
    assert (metric(text, "tierline_db_pool_timeouts_total", tier="web") or 0) >= 3
    assert httpx.get(f"{url}/readyz").status_code == 200  # saturated, still ready
    # Never more connections than it claimed: the pool's, plus its LISTEN connection.
    claimed = query(db_url, "SELECT claimed AS n FROM tierline.replicas")[0]["n"]
    opened = query(
        db_url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name LIKE 'tierline-web%%'",
    )[0]["n"]
    assert opened <= claimed, (opened, claimed)


def test_transactional_enqueue_from_a_route(cluster: Cluster, db_url: str) -> None:
    migrate(db_url, ORDERS_TABLE)
    proc, url = cluster.web(TIERLINE_APP=TEST_APP, TIERLINE_WEB_APP=WEB_APP)
    cluster.wait_ready(url, proc)
    done = httpx.post(f"{url}/orders", params={"token": "kept"}).json()
    assert done["committed"] is True
    undone = httpx.post(f"{url}/orders", params={"token": "dropped", "fail": "true"}).json()
    assert undone == {"committed": False}
    jobs = query(db_url, "SELECT id, args->>'token' AS token FROM tierline.jobs")
    assert [j["token"] for j in jobs] == ["kept"] and jobs[0]["id"] == done["job"]
    orders = query(db_url, "SELECT token FROM public.orders")
    assert [o["token"] for o in orders] == ["kept"]
    events = query(db_url, "SELECT count(*) AS n FROM tierline.job_stream")[0]["n"]
    assert events == 1  # the kept job's `enqueued`; the rolled-back one left none
    cluster.worker(TIERLINE_APP=TEST_APP)
    wait_for(
        lambda: (
            query(db_url, "SELECT count(*) AS n FROM public.runs WHERE token = 'kept'")[0]["n"] == 1
        ),
        30,
        "the committed job to run",
    )


def test_a_route_conflict_stops_the_replica_naming_both(tmp_path: Path, db_url: str) -> None:
    env = tierline_env(db_url, TIERLINE_APP=TEST_APP, TIERLINE_WEB_APP="tests.web_app:clashing")
    done = subprocess.run(
        [sys.executable, "-m", "tierline", "web"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "/metrics" in done.stderr and "TIERLINE_WEB_APP" in done.stderr, done.stderr


def test_any_asgi_callable_is_served(cluster: Cluster) -> None:
    proc, url = cluster.web(TIERLINE_APP=TEST_APP, TIERLINE_WEB_APP="tests.web_app:raw")
    cluster.wait_ready(url, proc)
    answer = httpx.get(f"{url}/some/path")
    assert answer.status_code == 200 and answer.text == "raw /some/path"
    assert httpx.get(f"{url}/tierline/v1/queues").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    count = metric(text, "tierline_http_request_duration_seconds_count", route="unmatched")
    assert count and count >= 1  # no route templates to read: one low-cardinality label
    assert "the application has no lifespan" in proc.output()
