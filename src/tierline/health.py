"""``/metrics``, ``/healthz`` and ``/readyz``, shared by the web tier and the worker's
metrics listener."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tierline import metrics

Readiness = Callable[[], tuple[bool, str]]


def metrics_response(before_scrape: Callable[[], None] | None = None) -> Response:
    if before_scrape is not None:
        before_scrape()
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


def healthz(_: Request | None = None) -> JSONResponse:
    """Liveness: the process answers. It does not depend on the database on purpose:
    restarting a replica does not cure a database outage."""
    return JSONResponse({"status": "ok"})


def readyz(readiness: Readiness) -> JSONResponse:
    ready, reason = readiness()
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
