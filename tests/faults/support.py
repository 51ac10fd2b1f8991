"""What the fault tests share: an HTTP load generator that counts every outcome (and
keeps the idempotency keys it was answered for), and reading those jobs back."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tierline.testing.databases import admin_connect

# What a load balancer retries: refused, reset, or closed before the response.
RETRYABLE_EXC = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)


@dataclass
class Tally:
    """Every outcome of a load generator, by kind; thread-safe."""

    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)  # error codes of 4xx/5xx answers
    errors: Counter[str] = field(default_factory=Counter)
    accepted: dict[str, int] = field(default_factory=dict)  # idempotency key -> job id
    slowest_s: float = 0.0
    slow: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, code: int, took: float, what: str, error_code: str = "") -> None:
        with self.lock:
            self.statuses[code] += 1
            if error_code:
                self.codes[f"{code} {error_code}"] += 1
            self._took(took, what)

    def error(self, exc: BaseException, took: float, what: str) -> None:
        with self.lock:
            self.errors[type(exc).__name__] += 1
            self._took(took, what)

    def _took(self, took: float, what: str) -> None:
        self.slowest_s = max(self.slowest_s, took)
        if took > 3:
            self.slow.append((round(took, 2), what))

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "statuses": dict(sorted(self.statuses.items())),
                "errors": dict(self.errors),
                "error_codes": dict(self.codes),
                "accepted": len(self.accepted),
                "slowest_s": round(self.slowest_s, 2),
            }


class Load:
    """Threads that enqueue ``kind`` jobs (each with an idempotency key, retried until
    accepted, as a careful client does) and read them back, until stopped.

    Every response and transport error is counted; keys whose enqueue was answered 202
    or 200 are in ``tally.accepted``.
    """

    def __init__(
        self,
        base_url: str | Callable[[], str],
        *,
        kind: str = "record",
        threads: int = 4,
        pause_s: float = 0.02,
        timeout_s: float = 15.0,
        retry: bool = True,
        fresh_connections: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url if callable(base_url) else (lambda: str(base_url))
        self.kind = kind
        self.threads = threads
        self.pause_s = pause_s
        self.timeout_s = timeout_s
        self.retry = retry
        self.fresh = fresh_connections
        self.headers = headers or {}
        self.tally = Tally()
        self.stop_event = threading.Event()
        self._counter = itertools.count()
        self._workers: list[threading.Thread] = []
        self.run_id = uuid.uuid4().hex[:6]

    def __enter__(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"load-{i}")
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> None:
        self.stop_event.set()
        for t in self._workers:
            t.join(timeout)

    def _client(self) -> httpx.Client:
        limits = httpx.Limits(max_keepalive_connections=0 if self.fresh else 2)
        return httpx.Client(timeout=self.timeout_s, limits=limits, headers=self.headers)

    def _call(self, client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
        start = time.monotonic()
        what = f"{method} {path}"
        try:
            r = client.request(method, self.base_url() + path, **kw)
        except httpx.HTTPError as exc:
            self.tally.error(exc, time.monotonic() - start, what)
            return exc
        error_code = ""
        if r.status_code >= 400:
            try:
                error_code = str(r.json()["error"]["code"])
            except (ValueError, KeyError, TypeError):
                error_code = "not-json"
        self.tally.status(r.status_code, time.monotonic() - start, what, error_code)
        return r

    def _loop(self, index: int) -> None:
        with self._client() as client:
            while not self.stop_event.is_set():
                key = f"{self.run_id}-{index}-{next(self._counter)}"
                body = {"kind": self.kind, "args": {"token": key}, "idempotency_key": key}
                while True:
                    r = self._call(client, "POST", "/v1/jobs", json=body)
                    if isinstance(r, httpx.Response) and r.status_code in (200, 202):
                        with self.tally.lock:
                            self.tally.accepted[key] = int(r.json()["id"])
                        break
                    if not self.retry or self.stop_event.wait(0.2):
                        break  # unacknowledged: the caller checks it with its key
                if self.tally.accepted and not self.stop_event.is_set():
                    job_id = self.tally.accepted.get(key)
                    if job_id is not None:
                        self._call(client, "GET", f"/v1/jobs/{job_id}")
                self.stop_event.wait(self.pause_s)


def keys_in_db(db_url: str, keys: set[str]) -> dict[str, dict[str, Any]]:
    """The jobs of these idempotency keys: key -> {id, state, attempt}."""
    if not keys:
        return {}
    with admin_connect(db_url) as conn:
        rows = conn.execute(
            "SELECT idempotency_key AS key, id, state, attempt FROM tierline.jobs "
            "WHERE idempotency_key = ANY(%s)",
            (list(keys),),
        ).fetchall()
    return {r["key"]: r for r in rows}


def states(db_url: str) -> dict[str, int]:
    with admin_connect(db_url) as conn:
        rows = conn.execute("SELECT state, count(*) AS n FROM tierline.jobs GROUP BY state")
        return {r["state"]: int(r["n"]) for r in rows.fetchall()}
