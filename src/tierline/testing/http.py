"""Talking to started tiers over HTTP: waiting until one is ready, enqueueing jobs
(one at a time or in batches) and reading a job back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from tierline.testing.waiting import wait_for


class Process(Protocol):
    """What ``wait_ready`` needs of a started process (``processes.Proc`` is one)."""

    name: str

    def alive(self) -> bool: ...

    def tail(self, n: int = 3000) -> str: ...


def wait_ready(url: str, proc: Process, timeout: float = 30) -> None:
    """Wait until ``url``/readyz answers 200; fail with the process's log when it exits
    or is not ready within ``timeout`` seconds."""

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout, f"{url}/readyz", interval=0.1, tolerate=())
    except AssertionError as exc:
        if not proc.alive():
            raise
        raise AssertionError(f"{url} not ready ({exc}):\n{proc.tail()}") from None


def enqueue(
    url: str,
    kind: str,
    args: dict[str, Any] | None = None,
    *,
    expect: Sequence[int] = (202,),
    **fields: Any,
) -> int:
    """``POST /v1/jobs`` (``fields``: priority, delay_s, idempotency_key...); the job's
    id. The answer must have one of the ``expect`` statuses (200: an idempotent repeat)."""
    r = httpx.post(f"{url}/v1/jobs", json={"kind": kind, "args": args or {}, **fields}, timeout=10)
    assert r.status_code in expect, r.text
    job_id: int = r.json()["id"]
    return job_id


def enqueue_batch(
    url: str,
    jobs: Sequence[dict[str, Any]],
    *,
    chunk: int = 1000,
    client: httpx.Client | None = None,
    timeout: float = 30,
) -> list[int]:
    """``POST /v1/jobs/batch`` of ``jobs``, ``chunk`` at a time; their ids, in order.
    ``client``: reuse one (its own timeout applies), else a new one with ``timeout``."""
    own = client is None
    http = httpx.Client(timeout=timeout) if client is None else client
    ids: list[int] = []
    try:
        for start in range(0, len(jobs), chunk):
            r = http.post(f"{url}/v1/jobs/batch", json={"jobs": list(jobs[start : start + chunk])})
            assert r.status_code == 202, r.text
            ids += [j["id"] for j in r.json()["jobs"]]
    finally:
        if own:
            http.close()
    return ids


def tokens(kind: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    """``n`` jobs of ``kind`` with distinct ``token`` arguments ``t0``, ``t1``..."""
    return [{"kind": kind, "args": {"token": f"t{i}"}, **fields} for i in range(n)]


def job(url: str, job_id: int) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: the job as the API shows it."""
    r = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found
