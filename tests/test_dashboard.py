"""The dashboard at ``GET /``: served with a strict CSP, and working in a real Chromium
(Playwright) against real web and worker processes while jobs run.
"""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ARTIFACTS, CHROMIUM
from tests.jobs_app import TEST_APP
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium not installed (scripts/system-deps)"
)
READER_KEY = "dash-reader-key"
ADMIN_KEY = "dash-admin-key-01"


class Feeder:
    """Enqueues a mix of jobs in the background until stopped (the dashboard's traffic)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.stop = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rnd = random.Random(7)
        with httpx.Client(timeout=10, headers=self.headers) as client:
            while not self.stop.is_set():
                jobs: list[dict[str, Any]] = []
                for _ in range(rnd.randint(3, 12)):
                    r = rnd.random()
                    if r < 0.6:
                        jobs.append({"kind": "sleeper", "args": {"seconds": rnd.random() / 4}})
                    elif r < 0.75:
                        jobs.append({"kind": "add", "args": {"a": 1}})
                    elif r < 0.9:
                        jobs.append({"kind": "flaky", "args": {"succeed_on": 99}})
                    else:
                        jobs.append({"kind": "give_up", "args": {}})
                resp = client.post(f"{self.url}/v1/jobs/batch", json={"jobs": jobs})
                if resp.status_code != 202:
                    self.errors.append(resp.text)
                self.sent += len(jobs)
                self.stop.wait(0.3)

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=15)


def watch_console(page: Any) -> list[str]:
    """Console errors and uncaught exceptions of ``page``, as they happen."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught: {e}"))
    return problems


def wait_js(page: Any, expr: str, timeout: float, what: str) -> Any:
    """Poll a JavaScript expression from here: Playwright's wait_for_function evaluates
    strings inside the page, which the dashboard's CSP (no unsafe-eval) rightly refuses."""
    return wait_for(lambda: page.evaluate(expr), timeout, what, interval=0.2)


def start_tiers(cluster: Cluster, workers: int = 1, **web_env: Any) -> str:
    web, url = cluster.web(TIERLINE_APP=TEST_APP, **web_env)
    started = [cluster.worker(TIERLINE_APP=TEST_APP) for _ in range(workers)]
    cluster.wait_ready(url, web)
    for proc, wurl in started:
        cluster.wait_ready(wurl, proc)
    return url


# -- without a browser --------------------------------------------------------------------------
@pytest.mark.e2e
def test_dashboard_is_served_with_a_strict_csp_and_no_inline_code(cluster: Cluster) -> None:
    url = start_tiers(
        cluster, 0, TIERLINE_API_KEYS=f"{READER_KEY}:read", TIERLINE_PROTECT_METRICS="true"
    )
    with httpx.Client(base_url=url, timeout=10) as client:
        page = client.get("/")  # no key: the page is static, its data needs one
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp
        assert "unsafe-inline" not in csp
        html = page.text
        assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None, "no inline script"
        assert "<style" not in html and " style=" not in html, "no inline style"
        assert re.search(r"\son[a-z]+=", html) is None, "no inline event handlers"
        for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
            assert f'"{asset}"' in html
            r = client.get(asset)
            assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert client.get("/v1/cluster").status_code == 401
        assert client.get("/metrics").status_code == 401
        headers = {"Authorization": f"Bearer {READER_KEY}"}
        assert client.get("/v1/cluster", headers=headers).status_code == 200


# -- in Chromium --------------------------------------------------------------------------------
@needs_chromium
@pytest.mark.browser
@pytest.mark.e2e
def test_dashboard_live_while_jobs_run(cluster: Cluster, browser: Any) -> None:
    url = start_tiers(cluster, workers=2)
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    problems = watch_console(page)
    page.goto(f"{url}/")
    page.wait_for_selector('#replicas tr[data-tier="web"][data-status="alive"]', timeout=20_000)
    assert page.locator('#replicas tr[data-tier="worker"][data-status="alive"]').count() == 2
    page.wait_for_selector("#live.on", timeout=20_000)  # the firehose is connected

    chart = "document.getElementById('chart-throughput')"
    with Feeder(url) as feeder:
        wait_js(page, f"Number({chart}.dataset.sum) > 0", 30, "events on the chart")
        before_sum = page.evaluate(f"{chart}.dataset.sum")
        before_png = page.evaluate(f"{chart}.querySelector('canvas').toDataURL()")
        wait_js(page, f"{chart}.dataset.sum !== {before_sum!r}", 30, "the chart to change")
        after_png = page.evaluate(f"{chart}.querySelector('canvas').toDataURL()")
        assert after_png != before_png, "the throughput chart was redrawn with new data"
        page.wait_for_selector('#queues tr[data-queue="default"]', timeout=20_000)
        # flaky jobs fail after three attempts with backoff: the failures table lists them.
        page.wait_for_selector("#failures td:text-is('flaky')", timeout=40_000)
        wait_js(page, "Number(document.body.dataset.refreshes) >= 2", 20, "periodic refresh")
        succeeded = page.locator('#counts dd[data-type="succeeded"]').inner_text()
        assert int(succeeded.replace(",", "")) > 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert feeder.sent > 0 and not feeder.errors
    assert page.locator("#banner").is_hidden()
    assert problems == []


@needs_chromium
@pytest.mark.browser
@pytest.mark.e2e
def test_dashboard_with_api_keys_asks_for_one_and_keeps_it_out_of_urls(
    cluster: Cluster, browser: Any
) -> None:
    url = start_tiers(cluster, TIERLINE_API_KEYS=f"{READER_KEY}:read,{ADMIN_KEY}")
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    problems = watch_console(page)
    requests: list[tuple[str, dict[str, str]]] = []
    page.on("request", lambda r: requests.append((r.url, r.headers)))
    page.goto(f"{url}/")
    page.wait_for_selector("#keyform", state="visible", timeout=20_000)
    page.fill("#key-input", READER_KEY)
    page.click("#keyform button[type=submit]")
    page.wait_for_selector('#replicas tr[data-tier="worker"]', timeout=20_000)
    page.wait_for_selector("#live.on", timeout=20_000)
    assert page.evaluate("sessionStorage.getItem('tierline.apiKey')") == READER_KEY

    with Feeder(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}):
        wait_js(  # the firehose, read with the key in a header
            page,
            "Number(document.querySelector('#counts dd[data-type=enqueued]')"
            ".textContent.replace(/,/g, '')) > 0",
            30,
            "enqueued events through the firehose",
        )
    assert all(READER_KEY not in u for u, _ in requests), "the key never goes in a URL"
    streams = [h for u, h in requests if u.endswith("/v1/events")]
    assert streams and streams[-1].get("authorization") == f"Bearer {READER_KEY}"
    # Before the key was given, the API answered 401; Chromium logs those loads as errors.
    assert [p for p in problems if "401" not in p] == []
