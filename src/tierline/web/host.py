"""The application's own ASGI app in the web tier (``TIERLINE_WEB_APP``).

The web tier then serves three things from one listener: ``/healthz``, ``/readyz`` and
``/metrics`` at the root (probes and scrapers expect them there); Tierline's API and
dashboard under ``TIERLINE_WEB_API_PREFIX``, so that the application's own ``/v1/...``
is never shadowed; and everything else to the application, timed in
``tierline_http_request_duration_seconds`` by its route templates. Its lifespan runs
inside the tier's: started once the replica has its pool, stopped before the replica
releases its budget claim.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from asgi_lifespan import LifespanManager, LifespanNotSupported
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tierline import tracing
from tierline.errors import AppLoadError
from tierline.logs import get_logger
from tierline.settings import env_name
from tierline.web.errors import error_response
from tierline.web.middleware import HttpMetrics

log = get_logger(__name__)

ROOT_PATHS = ("/healthz", "/readyz", "/metrics")
SCOPE_KEY = "tierline.runtime"  # the web tier's Runtime, in every request to the app
LIFESPAN_TIMEOUT_S = 60.0


def load_asgi_app(spec: str) -> ASGIApp:
    """The ASGI application ``module:attr`` names (``TIERLINE_WEB_APP``)."""
    module_name, _, attr = spec.partition(":")
    try:
        app = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise AppLoadError(f"{env_name('web_app')}={spec!r}: cannot load it: {exc}") from None
    if not callable(app):
        raise AppLoadError(f"{env_name('web_app')}={spec!r} is not an ASGI application")
    return app  # type: ignore[no-any-return]


def route_conflicts(app: Any, prefix: str) -> list[str]:
    """The application's routes that Tierline's would shadow or be shadowed by, as
    sentences naming both (only apps that list their routes, as Starlette's do)."""
    found = []
    for path in _paths(getattr(app, "routes", None) or [], ""):
        if path in ROOT_PATHS:
            found.append(f"the application's route {path} and Tierline's {path}")
        elif path == prefix or path.startswith(prefix + "/"):
            found.append(
                f"the application's route {path} and Tierline's API under {prefix} "
                f"({env_name('web_api_prefix')})"
            )
    return found


def _paths(routes: list[Any], base: str) -> Iterator[str]:
    for route in routes:
        path = base + (getattr(route, "path", "") or "")
        inner = getattr(route, "routes", None)
        if inner:
            yield from _paths(list(inner), path)
        elif path:
            yield path


class Host:
    """The web tier's ASGI app when it hosts the application's (see the module doc)."""

    def __init__(self, tierline_api: ASGIApp, app: ASGIApp, prefix: str, runtime: Any) -> None:
        conflicts = route_conflicts(app, prefix)
        if conflicts:
            raise AppLoadError(f"{env_name('web_app')}: route conflict: {conflicts[0]}")
        if isinstance(app, Starlette):
            from tierline.web.connections import PoolBusy

            app.add_exception_handler(PoolBusy, _pool_busy)  # our JSON error shape
        self.tierline_api = tracing.instrument(tierline_api)
        self.prefix = prefix
        self.runtime = runtime
        self.user_app = app
        self.lifespan: LifespanManager | None = None  # made on the event loop, in start()
        self.state: dict[str, Any] = {}  # what the lifespan put in its scope's state
        self.app = HttpMetrics(tracing.instrument(app), recorder=runtime.load.record)
        self.started = False
        self._in_lifespan = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.tierline_api(scope, receive, send)
            return
        path: str = scope["path"]
        if path in ROOT_PATHS:
            await self.tierline_api(scope, receive, send)
        elif path == self.prefix or path.startswith(self.prefix + "/"):
            inner = dict(scope)  # routes match the path after root_path
            inner["root_path"] = scope.get("root_path", "") + self.prefix
            await self.tierline_api(inner, receive, send)
        elif not self.started:
            response = error_response(
                503, "not_ready", "the application is starting", headers={"Retry-After": "2"}
            )
            await response(scope, receive, send)
        else:
            scope[SCOPE_KEY] = self.runtime
            # A copy per request, as servers do: the lifespan's state is shared, what a
            # request adds to ``request.state`` is not.
            scope["state"] = dict(self.state)
            await self.app(scope, receive, send)

    async def _lifespan_scope(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = scope.setdefault("state", {})
        await self.user_app(scope, receive, send)

    async def start(self) -> None:
        """Run the application's lifespan startup (once the replica has its pool)."""
        self.lifespan = LifespanManager(
            self._lifespan_scope, startup_timeout=LIFESPAN_TIMEOUT_S, shutdown_timeout=None
        )
        try:
            await self.lifespan.__aenter__()
            self._in_lifespan = True
        except LifespanNotSupported:
            log.info("the application has no lifespan; serving it without")
        self.started = True

    async def stop(self) -> None:
        """Run the application's lifespan shutdown (after its requests have drained)."""
        self.started = False
        if self._in_lifespan and self.lifespan is not None:
            self._in_lifespan = False
            try:
                await self.lifespan.__aexit__(None, None, None)
            except Exception as exc:  # the replica still releases its claim
                log.warning("the application's shutdown failed", error=repr(exc))


async def _pool_busy(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "pool_timeout", str(exc), headers={"Retry-After": "1"})
