"""OpenTelemetry from request to job: with the SDK configured (the in-memory exporter),
``POST /v1/jobs``'s server span, the job's attempt span and its follow-up job's attempt
span are one trace; without a provider, tracing stays off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tierline import tracing
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def spans_in(folder: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for file in folder.glob("*.json"):
        found += json.loads(file.read_text())
    return found


def test_one_trace_from_post_through_the_job_and_its_follow_up(
    cluster: Cluster, tmp_path: Path
) -> None:
    folder = tmp_path / "spans"
    folder.mkdir()
    env = {"TIERLINE_APP": "tests.otel_app:app", "TIERLINE_TEST_SPANS_DIR": str(folder)}
    web, url = cluster.web(**env)
    worker, _ = cluster.worker(**env)
    cluster.wait_ready(url, web)
    job = httpx.post(f"{url}/v1/jobs", json={"kind": "traced_parent", "args": {"n": 1}}).json()

    def finished(kind: str) -> bool:
        jobs = httpx.get(f"{url}/v1/jobs", params={"kind": kind}).json()["jobs"]
        return bool(jobs) and all(j["state"] == "succeeded" for j in jobs)

    wait_for(lambda: finished("traced_parent") and finished("traced_child"), 30, "both jobs")
    assert web.stop() == 0 and worker.stop() == 0  # at exit, each process writes its spans
    spans = spans_in(folder)
    server = [s for s in spans if s["name"].startswith("POST") and s["parent_id"] is None]
    assert len(server) == 1, [s["name"] for s in spans]
    trace_id = server[0]["trace_id"]
    attempts = {s["attributes"]["tierline.kind"]: s for s in spans if s["name"] == "tierline.job"}
    assert set(attempts) == {"traced_parent", "traced_child"}
    parent, child = attempts["traced_parent"], attempts["traced_child"]
    assert parent["trace_id"] == trace_id and child["trace_id"] == trace_id
    assert child["parent_id"] == parent["span_id"]  # the follow-up is a child of its enqueuer
    assert parent["attributes"]["tierline.job.id"] == job["id"]
    assert parent["attributes"]["tierline.outcome"] == "succeeded"
    assert parent["attributes"]["tierline.queue"] == "default"
    assert parent["attributes"]["tierline.attempt"] == 1
    names = {s["name"] for s in spans}
    assert {"tierline.claim", "tierline.ack"} <= names


def test_tracing_is_off_without_a_configured_provider() -> None:
    # This test process never configures a provider: nothing is captured or recorded.
    assert tracing.setup() is False
    assert tracing.carrier() is None
    with tracing.span("anything") as span:
        assert span is None
