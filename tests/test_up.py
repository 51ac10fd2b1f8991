"""`tierline up` supervises its replicas: a crashed one is restarted, Ctrl+C stops all."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tierline.testing.ports import free_port
from tierline.testing.processes import Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def alive_workers(url: str) -> list[dict[str, Any]]:
    reps = httpx.get(f"{url}/v1/cluster", timeout=5).json()["replicas"]
    return [r for r in reps if r["tier"] == "worker" and r["alive"]]


def test_crashed_worker_is_restarted(tmp_path: Path, db_url: str) -> None:
    port = free_port()
    env = tierline_env(db_url, TIERLINE_WEB_PORT=port, TIERLINE_WORKER_METRICS_PORT=0)
    up = Proc(["up", "--workers", "1"], env, tmp_path / "up.log", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        first = wait_for(lambda: alive_workers(url), 60, "a live worker")[0]
        os.kill(first["pid"], signal.SIGKILL)
        replaced = wait_for(
            lambda: [w for w in alive_workers(url) if w["pid"] != first["pid"]],
            60,
            "the supervisor to restart the worker",
        )
        assert replaced[0]["pid"] != first["pid"]
        job = httpx.post(f"{url}/v1/jobs", json={"kind": "echo", "args": {"n": 1}}).json()
        wait_for(
            lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["state"] == "succeeded",
            30,
            "a job on the restarted worker",
        )
    finally:
        code = up.interrupt()
    text = up.output()
    assert "replica exited unexpectedly; restarting" in text
    assert code == 0, text[-2000:]
