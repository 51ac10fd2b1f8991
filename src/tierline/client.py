"""HTTP client of the web tier, sync and async, with event streams that resume.

``follow(job_id)`` yields a job's events until its final one; when the connection drops
it reconnects (to the next base URL, if several are given) with ``Last-Event-ID``, so
every event arrives exactly once, in order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from tierline.errors import TierlineError
from tierline.jobs import FINAL_STATES


class ClientError(TierlineError):
    """The web tier refused the request."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StreamEvent:
    id: str
    type: str
    data: Any

    @property
    def seq(self) -> int:
        return int(self.data.get("seq", 0)) if isinstance(self.data, dict) else 0

    @property
    def at(self) -> str:
        return str(self.data.get("at", "")) if isinstance(self.data, dict) else ""

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.type, "data": self.data}


class SSEParser:
    """Incremental text/event-stream parser (comments and heartbeats are skipped)."""

    def __init__(self) -> None:
        self._id = ""
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            raw = "\n".join(self._data)
            self._data = []
            event, self._event = self._event or "message", ""
            try:
                data: Any = json.loads(raw)
            except ValueError:
                data = raw
            return StreamEvent(self._id, event, data)
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            message = f"{resp.status_code} {err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            message = f"{resp.status_code}: {resp.text[:200]}"
        raise ClientError(message, resp.status_code)


class _Following:
    """Where a ``follow`` stands (shared by both clients): the resume position, the
    events seen, and the reconnect budget with its backoff."""

    def __init__(self, job_id: int, after: int, max_events: int | None, retries: int) -> None:
        self.job_id = job_id
        self.last = str(after) if after else None
        self.max_events = max_events
        self.retries = retries
        self.count = 0
        self.failures = 0
        self.complete = False
        self.parser = SSEParser()

    def headers(self) -> dict[str, str]:
        return {"Last-Event-ID": self.last} if self.last else {}

    def opened(self, resp: httpx.Response) -> bool:
        """A stream answered (its body read if it is an error): raise a refusal; True
        when there is nothing more to follow (204: finished, every event seen)."""
        _check(resp)
        self.parser = SSEParser()
        return resp.status_code == 204

    def feed(self, line: str) -> StreamEvent | None:
        """One line of the stream; the event it completes, recorded, or None."""
        ev = self.parser.feed(line)
        if ev is not None:
            self.failures = 0
            self.last = ev.id or self.last
            self.count += 1
            self.complete = ev.type in FINAL_STATES or bool(
                self.max_events and self.count >= self.max_events
            )
        return ev

    def retryable(self, exc: ClientError) -> None:
        """Re-raise refusals; 502/503/504 are worth another replica."""
        if exc.status not in (502, 503, 504):
            raise exc

    def failed(self) -> float:
        """Count a failed connection; the delay before the next, or give up."""
        self.failures += 1
        if self.failures > self.retries:
            raise ClientError(
                f"gave up following job {self.job_id} after {self.retries} failed reconnects"
            )
        return min(5.0, 0.1 * 2.0 ** min(self.failures, 6))


class _Endpoints:
    """What both clients share: the base URLs they rotate through on reconnect, the auth
    header, the timeouts and the reconnect count."""

    def __init__(
        self,
        url: str | Iterable[str],
        *,
        api_key: str | None,
        timeout: float,
        retries: int,
        stream_timeout: float | None,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("at least one URL is needed")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout)
        self.stream_timeout = httpx.Timeout(timeout, read=stream_timeout)
        self.retries = retries
        self._next = itertools.cycle(self.urls)
        self.url = next(self._next)
        self.reconnects = 0

    def rotate(self) -> None:
        """After a failed stream: the next replica."""
        self.reconnects += 1
        self.url = next(self._next)

    def stream_args(self, state: _Following) -> dict[str, Any]:
        return {
            "method": "GET",
            "url": f"{self.url}/v1/jobs/{state.job_id}/events",
            "headers": state.headers(),
            "timeout": self.stream_timeout,
        }

    def unreachable(self, exc: httpx.HTTPError) -> ClientError:
        return ClientError(f"cannot reach {self.url}: {exc}")


class Client(_Endpoints):
    """Synchronous client. ``url``: one web replica, or several to rotate through on
    reconnect. ``stream_timeout``: seconds without a byte on a stream (heartbeats count)
    before it is taken for dead and resumed; keep it above the server's heartbeat."""

    def __init__(
        self,
        url: str | Iterable[str],
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 20,
        stream_timeout: float | None = 60.0,
    ) -> None:
        super().__init__(
            url, api_key=api_key, timeout=timeout, retries=retries, stream_timeout=stream_timeout
        )
        self.http = httpx.Client(headers=self.headers, timeout=self.timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", "/v1/jobs", json=body).json()
        return result

    def get(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/jobs/{job_id}").json()
        return result

    def change_queue(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """``PATCH /v1/queues/{name}``: limits, ``paused``, or ``reset``."""
        result: dict[str, Any] = self._request("PATCH", f"/v1/queues/{name}", json=changes).json()
        return result

    def schedules(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._request("GET", "/v1/schedules").json()["schedules"]
        return result

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, self.url + path, **kw)
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None
        _check(resp)
        return resp

    def follow(
        self, job_id: int, *, after: int = 0, max_events: int | None = None
    ) -> Iterator[StreamEvent]:
        """A job's events from ``after`` to its final event, resuming on disconnects."""
        state = _Following(job_id, after, max_events, self.retries)
        while True:
            try:
                with self.http.stream(**self.stream_args(state)) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                    if state.opened(resp):
                        return
                    for line in resp.iter_lines():
                        ev = state.feed(line)
                        if ev is not None:
                            yield ev
                            if state.complete:
                                return
            except ClientError as exc:
                state.retryable(exc)
            except (httpx.HTTPError, OSError):
                pass
            delay = state.failed()
            self.rotate()
            time.sleep(delay)


class AsyncClient(_Endpoints):
    """Asynchronous twin of ``Client``."""

    def __init__(
        self,
        url: str | Iterable[str],
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 20,
        stream_timeout: float | None = 60.0,
    ) -> None:
        super().__init__(
            url, api_key=api_key, timeout=timeout, retries=retries, stream_timeout=stream_timeout
        )
        self.http = httpx.AsyncClient(headers=self.headers, timeout=self.timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def enqueue(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = (await self._request("POST", "/v1/jobs", json=body)).json()
        return result

    async def get(self, job_id: int) -> dict[str, Any]:
        result: dict[str, Any] = (await self._request("GET", f"/v1/jobs/{job_id}")).json()
        return result

    async def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = await self.http.request(method, self.url + path, **kw)
        except httpx.HTTPError as exc:
            raise self.unreachable(exc) from None
        _check(resp)
        return resp

    async def follow(
        self, job_id: int, *, after: int = 0, max_events: int | None = None
    ) -> AsyncIterator[StreamEvent]:
        """A job's events from ``after`` to its final event, resuming on disconnects."""
        state = _Following(job_id, after, max_events, self.retries)
        while True:
            try:
                async with self.http.stream(**self.stream_args(state)) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                    if state.opened(resp):
                        return
                    async for line in resp.aiter_lines():
                        ev = state.feed(line)
                        if ev is not None:
                            yield ev
                            if state.complete:
                                return
            except ClientError as exc:
                state.retryable(exc)
            except (httpx.HTTPError, OSError):
                pass
            delay = state.failed()
            self.rotate()
            await asyncio.sleep(delay)
