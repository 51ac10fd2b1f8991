"""Leases and due times are judged by the database clock, never a replica's.

faketime is not installed, so the skew comes from a ``sitecustomize`` shim put first on
``PYTHONPATH``: in the replicas started with it, ``time.time``, ``time.time_ns`` and
``datetime.now``/``utcnow`` run an hour fast (or slow). Jobs that run longer than their
lease on such workers keep their leases (renewed in SQL with ``now()``), nothing is
rescued wrongly, and a delay given to a skewed web replica counts from the database's
now.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ROOT, report
from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

SKEW_S = 3600.0
LEASE_S = 3.0
JOB_S = 7.0  # longer than two leases: only renewals keep the jobs

SHIM = '''\
"""Test shim: this process's wall clock runs TIERLINE_TEST_CLOCK_SKEW_S seconds off."""
import datetime as _dt
import os
import time

_skew = float(os.environ.get("TIERLINE_TEST_CLOCK_SKEW_S") or 0)
if _skew:
    _real_time, _real_time_ns, _real = time.time, time.time_ns, _dt.datetime
    time.time = lambda: _real_time() + _skew
    time.time_ns = lambda: _real_time_ns() + int(_skew * 1e9)

    class _Meta(type):
        # Real datetimes (made by C code: psycopg, pydantic) still pass isinstance.
        def __instancecheck__(cls, obj):
            return isinstance(obj, _real)

        def __subclasscheck__(cls, sub):
            return issubclass(sub, _real)

    class datetime(_real, metaclass=_Meta):
        @classmethod
        def now(cls, tz=None):
            return _real.now(tz) + _dt.timedelta(seconds=_skew)

        @classmethod
        def utcnow(cls):
            return _real.utcnow() + _dt.timedelta(seconds=_skew)

        @classmethod
        def today(cls):
            return cls.now()

    _dt.datetime = datetime
'''


def skewed(tmp: Path, skew_s: float) -> dict[str, Any]:
    shim = tmp / "clock-shim"
    if not (shim / "sitecustomize.py").exists():
        # Written once, whole: rewriting it while an earlier replica's interpreter starts
        # let that replica import an empty shim and run on the true clock.
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py.tmp").write_text(SHIM)
        (shim / "sitecustomize.py.tmp").rename(shim / "sitecustomize.py")
    return {
        "TIERLINE_TEST_CLOCK_SKEW_S": skew_s,
        "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def log_clock_offset(text: str) -> float:
    """How far the process's log timestamps are from the real time now (seconds)."""
    for line in text.splitlines():
        if line.startswith("{") and '"timestamp"' in line:
            stamp = datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00"))
            return (stamp - datetime.now(UTC)).total_seconds()
    raise AssertionError(f"no JSON log line:\n{text[-2000:]}")


@pytest.mark.timeout(180)
def test_a_skewed_replica_clock_changes_no_lease_and_no_due_time(
    cluster: Cluster, db_url: str, tmp_path: Path
) -> None:
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_JOB_LEASE_S": LEASE_S}
    web, url = cluster.web(**env)
    fast_web, fast_url = cluster.web(**env, **skewed(tmp_path, SKEW_S))
    slow_web, slow_url = cluster.web(**env, **skewed(tmp_path, -SKEW_S))
    fast, fast_metrics = cluster.worker(
        **env, **skewed(tmp_path, SKEW_S), TIERLINE_WORKER_CONCURRENCY=3
    )
    slow, slow_metrics = cluster.worker(
        **env, **skewed(tmp_path, -SKEW_S), TIERLINE_WORKER_CONCURRENCY=3
    )
    for proc, u in ((web, url), (fast_web, fast_url), (slow_web, slow_url)):
        cluster.wait_ready(u, proc)
    for proc, u in ((fast, fast_metrics), (slow, slow_metrics)):
        cluster.wait_ready(u, proc)
    # The shim works: these processes live an hour ahead and an hour behind.
    assert abs(log_clock_offset(fast.output()) - SKEW_S) < 120
    assert abs(log_clock_offset(slow.output()) + SKEW_S) < 120
    assert abs(log_clock_offset(web.output())) < 120

    with httpx.Client(timeout=30) as client:
        ids = [
            client.post(
                f"{url}/v1/jobs", json={"kind": "sleeper", "args": {"seconds": JOB_S}}
            ).json()["id"]
            for _ in range(6)
        ]
        # Leases while the jobs run, seen by the database clock.
        left: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < JOB_S - 1:
            rows = query(
                db_url,
                "SELECT extract(epoch FROM lease_expires_at - now()) AS left_s "
                "FROM tierline.jobs WHERE state = 'running'",
            )
            left += [float(r["left_s"]) for r in rows]
            time.sleep(0.25)
        wait_for(
            lambda: all(
                client.get(f"{url}/v1/jobs/{i}").json()["state"] in ("succeeded", "failed")
                for i in ids
            ),
            60,
            "the long jobs to finish",
        )
        jobs = [client.get(f"{url}/v1/jobs/{i}").json() for i in ids]
        # A delay counts from the database's now, whatever the web replica's clock says.
        delayed = {
            name: client.post(f"{u}/v1/jobs", json={"kind": "noop", "delay_s": 30}).json()
            for name, u in (("fast", fast_url), ("slow", slow_url), ("true", url))
        }
        soon = client.post(f"{fast_url}/v1/jobs", json={"kind": "noop", "delay_s": 1}).json()
        wait_for(
            lambda: client.get(f"{url}/v1/jobs/{soon['id']}").json()["state"] == "succeeded",
            30,
            "a 1 s delay given to a replica an hour ahead to pass",
        )

    assert left, "no running job was seen"
    assert all(0 < s <= LEASE_S + 0.5 for s in left), f"leases off the database clock: {left}"
    assert [j["state"] for j in jobs] == ["succeeded"] * 6, jobs
    assert all(j["attempt"] == 1 and j["error"] is None for j in jobs), jobs
    owners = query(
        db_url,
        "SELECT DISTINCT r.pid FROM tierline.job_events e JOIN tierline.replicas r "
        "ON r.id::text = e.data->>'replica' WHERE e.type = 'started'",
    )
    assert {r["pid"] for r in owners} <= {fast.pid, slow.pid}
    assert len(owners) == 2, "both skewed workers should have run jobs"
    for name, job in delayed.items():
        row = query(
            db_url,
            "SELECT extract(epoch FROM run_at - created_at) AS delay_s FROM tierline.jobs "
            "WHERE id = %s",
            (job["id"],),
        )[0]
        assert 29 < float(row["delay_s"]) < 31, f"{name} clock: run_at {row['delay_s']} s away"
    rescued = "rescued jobs" in fast.output() + slow.output()
    assert not rescued, "a job was rescued although its worker was alive"
    # Both skewed workers count as alive in the registry (heartbeats use now() too).
    alive = query(
        db_url,
        "SELECT count(*) AS n FROM tierline.replicas WHERE pid = ANY(%s) "
        "AND heartbeat_at > now() - make_interval(secs => lease_s)",
        ([fast.pid, slow.pid],),
    )
    assert alive[0]["n"] == 2
    report(
        "clock_skew",
        skew_s=SKEW_S,
        lease_s=LEASE_S,
        job_s=JOB_S,
        jobs=len(jobs),
        lease_samples=len(left),
        lease_left_min_s=round(min(left), 2),
        lease_left_max_s=round(max(left), 2),
        wrongly_rescued=0,
    )
