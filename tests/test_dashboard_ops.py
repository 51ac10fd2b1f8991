"""The dashboard's operator panels in a real Chromium against real processes: the job
list and a job's page, retry, cancel, pause/resume and a queue's bulk retry, each end to
end, and each refused without the admin scope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.flow_app import FLOW_APP
from tests.helpers import CHROMIUM
from tests.test_dashboard import watch_console
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed"),
    pytest.mark.browser,
    pytest.mark.e2e,
]
READER = "ops-reader-key-1"
ADMIN = "ops-admin-key-01"


def job(client: httpx.Client, job_id: int) -> dict[str, Any]:
    out: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return out


def enqueue(client: httpx.Client, **body: Any) -> int:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id: int = r.json()["id"]
    return job_id


def open_with_key(browser: Any, url: str, key: str) -> Any:
    page = browser.new_page(viewport={"width": 1366, "height": 1000})
    page.goto(f"{url}/")
    page.wait_for_selector("#keyform:not([hidden])", timeout=20_000)
    page.fill("#key-input", key)
    page.click("#keyform button[type=submit]")
    page.wait_for_selector('#queues tr[data-queue="default"]', timeout=20_000)
    return page


def show_job(page: Any, job_id: int) -> None:
    page.click("#jobs-first")
    page.wait_for_selector(f'#jobs tr[data-job="{job_id}"]', timeout=20_000)
    page.click(f'#jobs tr[data-job="{job_id}"]')
    page.wait_for_selector(f'#job:not([hidden]) #job-id:text-is("#{job_id}")', timeout=10_000)


def test_operator_actions_work_with_admin_and_are_refused_without(
    cluster: Cluster, browser: Any
) -> None:
    web, url = cluster.web(TIERLINE_APP=FLOW_APP, TIERLINE_API_KEYS=f"{READER}:read,{ADMIN}")
    worker, wurl = cluster.worker(TIERLINE_APP=FLOW_APP)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    admin = httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {ADMIN}"})
    failed = enqueue(admin, kind="too_slow")
    waiting = enqueue(admin, kind="sleeper", args={"seconds": 1}, delay_s=600)
    wait_for(lambda: job(admin, failed)["state"] == "failed", 20, "the job to fail")

    # Read scope only: every write is refused, nothing changes.
    page = open_with_key(browser, url, READER)
    problems = watch_console(page)
    show_job(page, failed)
    page.wait_for_selector('#job[data-state="failed"]', timeout=10_000)
    assert "TimeoutError" in page.inner_text("#job-error") or page.inner_text("#job-error")
    page.click("#job-retry")
    page.wait_for_selector('#action-msg[data-result="refused"]', timeout=10_000)
    assert "admin" in page.inner_text("#action-msg")
    page.click('#queues tr[data-queue="default"] button[data-action="pause"]')
    page.wait_for_selector('#action-msg:text-matches("pause default: 403")', timeout=10_000)
    assert job(admin, failed)["state"] == "failed"
    queues = admin.get("/v1/queues").json()["queues"]
    assert not next(q for q in queues if q["queue"] == "default")["paused"]
    page.close()

    # Admin: retry, cancel, pause, resume, bulk retry, end to end.
    page = open_with_key(browser, url, ADMIN)
    problems += watch_console(page)
    show_job(page, failed)
    page.click("#job-retry")
    page.wait_for_selector('#action-msg[data-result="done"]', timeout=10_000)
    wait_for(lambda: job(admin, failed)["attempt"] == 2, 20, "the retried attempt")
    page.wait_for_selector('#job-events li[data-type="retrying"]', timeout=10_000)
    show_job(page, waiting)
    page.click("#job-cancel")
    wait_for(lambda: job(admin, waiting)["state"] == "cancelled", 10, "the cancel")
    page.wait_for_selector('#job[data-state="cancelled"]', timeout=10_000)

    page.click('#queues tr[data-queue="default"] button[data-action="pause"]')
    wait_for(
        lambda: next(
            q for q in admin.get("/v1/queues").json()["queues"] if q["queue"] == "default"
        )["paused"],
        10,
        "the pause",
    )
    page.wait_for_selector(
        '#queues tr[data-queue="default"] .badge:text-is("paused")', timeout=10_000
    )
    paused_job = enqueue(admin, kind="add", args={"a": 1})
    page.click('#queues tr[data-queue="default"] button[data-action="resume"]')
    wait_for(lambda: job(admin, paused_job)["state"] == "succeeded", 20, "work after resume")

    wait_for(lambda: job(admin, failed)["state"] == "failed", 20, "the retry to fail again")
    page.wait_for_selector(
        '#queues tr[data-queue="default"] button[data-action="retry-failed"]', timeout=10_000
    )
    page.click('#queues tr[data-queue="default"] button[data-action="retry-failed"]')
    wait_for(lambda: job(admin, failed)["attempt"] == 3, 20, "the bulk retry")

    # Filters and paging: the list narrows to the chosen kind.
    page.fill("#f-kind", "too_slow")
    page.click("#job-filters button[type=submit]")
    wait_for(lambda: page.locator("#jobs tbody tr[data-job]").count() == 1, 10, "the filtered list")
    page.wait_for_selector('#schedules tr[data-schedule="tick"]', timeout=10_000)
    assert problems == [] or all("403" in p for p in problems), problems
