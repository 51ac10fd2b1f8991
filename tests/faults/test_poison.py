"""A poison job that kills its worker process (``os._exit``) under ``tierline up``.

Each attempt takes a worker down with it; ``tierline up`` restarts the worker; the lease
of the attempt runs out and upkeep rescues the job, until the last attempt, which
becomes ``failed``. The jobs queued behind it keep moving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.faults.support import states
from tests.helpers import report
from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.processes import Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

OTHERS = 300


def _events(proc: Proc, event: str) -> list[dict[str, object]]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _ours(pid: int, marker: str) -> bool:
    """Is ``pid`` still a process of this test (not a reused pid)?"""
    try:
        return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_poison_job_fails_after_its_attempts_and_the_queue_moves_on(
    db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = tierline_env(
        db_url,
        TIERLINE_APP=TEST_APP,
        TIERLINE_WEB_PORT=port,
        TIERLINE_WORKER_METRICS_PORT=0,
        TIERLINE_JOB_LEASE_S=3,
        TIERLINE_DATA_DIR=tmp_path / "data",
        TIERLINE_WORKER_CONCURRENCY=4,
        TIERLINE_WORKER_DB_POOL_MAX=6,
    )
    up = Proc(["up", "--web", "1", "--workers", "2"], env, tmp_path / "up.log")
    url = f"http://127.0.0.1:{port}"
    started: list[int] = []
    try:
        wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
            60,
            "tierline up's web tier",
        )
        with httpx.Client(timeout=30) as client:
            r = client.post(f"{url}/v1/jobs", json={"kind": "poison"})
            assert r.status_code == 202
            poison = r.json()["id"]
            assert r.json()["max_attempts"] == 2
            others = [
                j["id"]
                for j in client.post(
                    f"{url}/v1/jobs/batch",
                    json={
                        "jobs": [
                            {"kind": "record", "args": {"token": f"p{i}"}} for i in range(OTHERS)
                        ]
                    },
                ).json()["jobs"]
            ]

        def poison_failed() -> bool:
            row = query(db_url, "SELECT state FROM tierline.jobs WHERE id = %s", (poison,))
            return bool(row[0]["state"] == "failed")

        wait_for(poison_failed, 120, "the poison job to fail")
        wait_for(
            lambda: states(db_url).get("succeeded", 0) == OTHERS,
            120,
            "the jobs behind the poison to succeed",
        )
        job = query(db_url, "SELECT attempt, error FROM tierline.jobs WHERE id = %s", (poison,))[0]
        assert job["attempt"] == 2
        assert job["error"]["type"] == "LeaseExpired"
        crashes = _events(up, "replica exited unexpectedly; restarting")
        assert len(crashes) >= 2, up.output()[-3000:]
        assert {c["exit_code"] for c in crashes} == {13}
        crashed = {int(str(c["pid"])) for c in crashes}
        runs = query(
            db_url,
            "SELECT job_id, array_agg(pid ORDER BY at) AS pids FROM public.runs "
            "WHERE job_id = ANY(%s) GROUP BY job_id",
            (others,),
        )
        assert len(runs) == OTHERS
        duplicates = [run for run in runs if len(run["pids"]) > 1]
        for run in duplicates:  # a rerun happens only after the poison took the worker down
            assert set(run["pids"][:-1]) <= crashed, run

        # The supervisor replaced the crashed workers: two are running at the end.
        def live_workers() -> int:
            rows = query(
                db_url,
                "SELECT count(*) AS n FROM tierline.replicas WHERE tier = 'worker' AND "
                "stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => lease_s)",
            )
            return int(rows[0]["n"])

        wait_for(lambda: live_workers() == 2, 20, "two live workers (the crashed ones replaced)")
        started = [int(str(e["pid"])) for e in _events(up, "replica started")]
        report(
            "poison",
            poison_attempts=job["attempt"],
            poison_state="failed",
            worker_crashes=len(crashes),
            others=OTHERS,
            others_succeeded=states(db_url).get("succeeded", 0),
            duplicate_runs=len(duplicates),
        )
        assert up.stop(timeout=60) == 0
    finally:
        if up.proc.poll() is None:
            up.signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                up.proc.wait(timeout=40)
        # The supervisor starts replicas in their own sessions: make sure none outlive it.
        for pid in started or [int(str(e["pid"])) for e in _events(up, "replica started")]:
            if _ours(pid, str(tmp_path)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if up.proc.poll() is None:
            up.kill()
        up.log_file.close()
