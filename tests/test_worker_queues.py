"""A worker that polls a queue no job kind of its application sends to by default says
so: a warning naming the queue and TIERLINE_WORKER_QUEUES, and
``tierline_worker_queue_handlers{queue} 0`` (the other half of unserved queues, which
``tierline_queue_unserved`` shows)."""

from __future__ import annotations

import httpx
import pytest

from tests.jobs_app import TEST_APP
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_worker_names_a_queue_without_handlers(cluster: Cluster) -> None:
    proc, url = cluster.worker(TIERLINE_APP=TEST_APP, TIERLINE_WORKER_QUEUES="default,emials")
    cluster.wait_ready(url, proc)
    text = httpx.get(f"{url}/metrics").text
    assert 'tierline_worker_queue_handlers{queue="emials"} 0.0' in text
    served = [
        line
        for line in text.splitlines()
        if line.startswith('tierline_worker_queue_handlers{queue="default"}')
    ]
    assert served and float(served[0].rsplit(" ", 1)[1]) > 0
    wait_for(lambda: '"queue": "emials"' in proc.output(), 10, "the warning")
    assert "TIERLINE_WORKER_QUEUES" in proc.output()
