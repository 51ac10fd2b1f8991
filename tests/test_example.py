"""The example application (``examples/reports``) on both tiers, as ``make up`` runs it:
its own table migrated beside Tierline's, a route that writes a row and enqueues in one
transaction, a job that writes its result and reports progress, and a page that follows
the job's stream in a browser (headless Chromium)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ARTIFACTS, CHROMIUM, ROOT
from tierline.testing.ports import free_port
from tierline.testing.processes import Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

EXAMPLE = {
    "TIERLINE_APP": "examples.reports.jobs:app",
    "TIERLINE_WEB_APP": "examples.reports.web:api",
}


@pytest.fixture
def example(tmp_path: Path, db_url: str) -> Any:
    """``tierline up`` (1 web, 1 worker) running the example on a test database."""
    port = free_port()
    env = tierline_env(db_url, TIERLINE_WEB_PORT=port, TIERLINE_WORKER_METRICS_PORT=0, **EXAMPLE)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    up = Proc(["up", "--workers", "1"], env, tmp_path / "up.log", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "the web tier")
        yield url
    finally:
        assert up.interrupt() == 0, up.tail()


def test_report_is_written_with_its_job_and_built(example: str) -> None:
    made = httpx.post(f"{example}/reports", json={"title": "Q3", "rows": 5})
    assert made.status_code == 201, made.text
    report = made.json()
    assert report["status"] == "queued" and report["job_id"]
    job = httpx.get(f"{example}/tierline/v1/jobs/{report['job_id']}").json()
    assert job["kind"] == "build_report" and job["args"]["report_id"] == report["id"]
    wait_for(
        lambda: httpx.get(f"{example}/reports/{report['id']}").json()["status"] == "done",
        60,
        "the report to be built",
    )
    built = httpx.get(f"{example}/reports/{report['id']}").json()
    assert isinstance(built["total"], int)
    assert httpx.post(f"{example}/reports", json={"title": ""}).status_code == 422
    # The demo kinds stay available beside the example's.
    demo = httpx.post(f"{example}/tierline/v1/jobs", json={"kind": "echo", "args": {"x": 1}})
    assert demo.status_code == 202, demo.text


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_page_submits_and_follows_progress_to_completion(example: str, browser: Any) -> None:
    page = browser.new_page()
    page.goto(example + "/")
    page.fill("input[name=title]", "From the browser")
    page.fill("input[name=rows]", "10")
    page.click("button[type=submit]")
    page.wait_for_selector("li .status", timeout=10_000)
    # Progress moves while the job runs, then the page shows the stored result.
    page.wait_for_function(
        "() => { const p = document.querySelector('li progress'); return p && p.value > 0; }",
        timeout=30_000,
    )
    page.wait_for_selector("li .status.done", timeout=60_000)
    text = page.inner_text("li .status")
    assert text.startswith("done: total "), text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "example.png"))
