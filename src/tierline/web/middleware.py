"""Pure ASGI middleware: request body limit and HTTP metrics (cheap on the hot path)."""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierline import metrics
from tierline.web.errors import error_response


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by header or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"request bodies are limited to {self.limit} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(HTTPException):
    """Raised while reading a body without Content-Length. An HTTPException, because
    FastAPI turns any other error raised while it reads a body into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request bodies are limited to {limit} bytes")


class HttpMetrics:
    """Duration by route template (not raw path: low cardinality) and in-flight count."""

    def __init__(self, app: ASGIApp, recorder: Any = None) -> None:
        self.app = app
        self.recorder = recorder  # callable(duration_s, status) for the replica's stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        stream = False
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            took = time.perf_counter() - start
            metrics.HTTP_DURATION.labels(path, scope["method"], str(status)).observe(took)
            if self.recorder is not None and not stream:
                self.recorder(took, status)

        async def sending(message: Message) -> None:
            nonlocal status, stream
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"content-type" and value.startswith(b"text/event-stream"):
                        stream = True
                        metrics.HTTP_IN_FLIGHT.dec()
                        record()  # streams: time to the first byte
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            if not stream:
                metrics.HTTP_IN_FLIGHT.dec()
            record()
