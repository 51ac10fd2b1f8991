"""A browser's own ``EventSource`` against the web tier (headless Chromium, Playwright).

Browsers resend ``Last-Event-ID`` by themselves when they reconnect, and stop for good on
a 204: the stream ids and the 204 after the final event must fit that behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import CHROMIUM
from tierline.testing.ports import free_port
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="chromium not installed (scripts/system-deps)"
    ),
]

# Follows one stream, recording every event and every open and error.
FOLLOW = """(path) => {
  const log = {events: [], opens: 0, errors: 0};
  window.follow = log;
  const es = new EventSource(path);
  window.stream = es;
  es.onopen = () => { log.opens += 1; };
  es.onerror = () => { log.errors += 1; };
  for (const type of ["enqueued", "started", "progress", "succeeded", "failed", "cancelled"]) {
    es.addEventListener(type, (e) => {
      log.events.push({id: e.lastEventId, type: e.type, seq: JSON.parse(e.data).seq});
    });
  }
}"""


def web_on(cluster: Cluster, port: int, **env: Any) -> Proc:
    """A web replica on a given port (a replacement takes over the same address)."""
    e = tierline_env(cluster.db_url, TIERLINE_WEB_PORT=port, TIERLINE_SSE_HEARTBEAT_S="0.5", **env)
    proc = Proc(["web"], e, cluster.tmp / f"web-{port}-{len(cluster.procs)}.log")
    cluster.procs.append(proc)
    cluster.wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc


def follow_log(page: Any) -> dict[str, Any]:
    log: dict[str, Any] = page.evaluate("() => window.follow")
    return log


def test_event_source_resumes_on_a_replacement_replica(cluster: Cluster, browser: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = web_on(cluster, port)
    worker, wurl = cluster.worker()
    cluster.wait_ready(wurl, worker)
    r = httpx.post(
        f"{url}/v1/jobs", json={"kind": "progress", "args": {"steps": 40, "delay": 0.1}}, timeout=10
    )
    job = r.json()["id"]

    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{url}/healthz")  # same origin as the stream
    page.evaluate(FOLLOW, f"/v1/jobs/{job}/events")
    wait_for(lambda: len(follow_log(page)["events"]) >= 10, 30, "the first events")

    first.kill()  # the connection breaks; the browser retries on the same address
    wait_for(lambda: follow_log(page)["errors"] >= 1, 10, "the browser to notice")
    web_on(cluster, port)

    # After the final event the server ends the stream; the browser reconnects once with
    # the final id, gets 204, and stops for good (readyState CLOSED).
    wait_for(lambda: page.evaluate("() => window.stream.readyState") == 2, 60, "the stream end")
    log = follow_log(page)
    seqs = [e["seq"] for e in log["events"]]
    assert seqs == list(range(1, 44)), seqs
    assert [e["id"] for e in log["events"]] == [str(s) for s in seqs]
    assert log["events"][-1]["type"] == "succeeded"
    assert log["opens"] >= 2 and log["errors"] >= 2
    assert problems == []


def test_event_source_on_a_finished_job_gets_it_once_and_stops(
    cluster: Cluster, browser: Any
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    web_on(cluster, port)
    worker, wurl = cluster.worker()
    cluster.wait_ready(wurl, worker)
    r = httpx.post(f"{url}/v1/jobs", json={"kind": "progress", "args": {"steps": 3}}, timeout=10)
    job = r.json()["id"]
    wait_for(
        lambda: httpx.get(f"{url}/v1/jobs/{job}", timeout=10).json()["state"] == "succeeded",
        30,
        "the job to finish",
    )
    page = browser.new_page()
    page.goto(f"{url}/healthz")
    page.evaluate(FOLLOW, f"/v1/jobs/{job}/events")
    wait_for(lambda: page.evaluate("() => window.stream.readyState") == 2, 30, "the stream end")
    log = follow_log(page)
    assert [e["seq"] for e in log["events"]] == [1, 2, 3, 4, 5, 6]
    assert log["opens"] == 1  # the reconnect after the end got 204: no second stream
