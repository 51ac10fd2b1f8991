"""Operations routes: health, readiness, metrics, queues, cluster, dashboard."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tierline import health, limits
from tierline.stats import read_server
from tierline.web.errors import COMMON
from tierline.web.runtime import Runtime, runtime, scoped

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """Liveness: the process answers (independent of the database)."""
    return health.healthz()


@router.get("/readyz", responses={503: {"description": "Not ready, with the reason."}})
async def readyz(rt: Runtime = Depends(runtime)) -> JSONResponse:
    """Readiness: budget claimed, pool open, schema current, database reachable."""
    return health.readyz(rt.readiness)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics_route(request: Request, rt: Runtime = Depends(runtime)) -> Response:
    """Prometheus metrics of this replica."""
    if rt.settings.protect_metrics:
        rt.keys.check(request, "read")
    await rt.refresh_metrics()
    return health.metrics_response()


@router.get("/v1/recommendations", responses=COMMON)
async def recommendations(rt: Runtime = scoped("read")) -> dict[str, Any]:
    """Recommended replicas per tier (computed at most every 10 s), with the inputs, the
    formula and the limit that bound each: `little's law`, `backlog`, `request rate`,
    `no data`, `min`, `max` or `connection budget`."""
    return (await rt.require_recommender().current()).as_dict()


@router.get("/v1/queues", responses=COMMON)
async def queues(rt: Runtime = scoped("read")) -> dict[str, Any]:
    """Per queue: jobs in each state, oldest due age, throughput over 1, 5 and 15 minutes;
    its settings (paused, max_running, rate_limit, partition_by), the live workers that
    serve it, and `unserved` when jobs wait that no live worker serves."""
    stats = rt.require_stats()
    return await limits.overview(stats.pool, await stats.queues())


@router.get("/v1/cluster", responses=COMMON)
async def cluster(rt: Runtime = scoped("read")) -> dict[str, Any]:
    """The replica registry: replicas (alive, dead, stopped), per-tier totals, budget."""
    stats = rt.require_stats()
    snap = dict(await stats.cluster())
    b = rt.replica.budget
    snap["budget"] = {
        "total": b.total if b else None,
        "source": b.source if b else None,
        "claimed": snap["claimed_connections"],
        "free": (b.total - snap["claimed_connections"]) if b else None,
    }
    if rt.reads is not None and rt.replica.reads is not None:
        snap["read_replica"] = await read_replica(rt, snap["read_claimed_connections"])
    return snap


async def read_replica(rt: Runtime, claimed: int) -> dict[str, Any]:
    """The read replica's side of the cluster: its budget (the read pools' claims), its
    server, and where this replica's reads go now."""
    assert rt.reads is not None and rt.replica.reads is not None
    reads = rt.replica.reads
    b = reads.budget
    server: dict[str, Any] | None = None
    if reads.pool is not None:
        try:
            server = await read_server(reads.pool)
        except Exception:  # the replica is down: the rest of the answer still holds
            server = None
    return {
        "budget": {
            "total": b.total if b else None,
            "source": b.source if b else None,
            "claimed": claimed,
            "free": (b.total - claimed) if b else None,
        },
        "server": server,
        "routing": rt.reads.describe(),
        "pool": reads.describe(),
    }


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The live dashboard. The page is static and holds no data, so it needs no key (a
    browser cannot send one when it navigates); its data comes from the /v1 routes, which
    do, and the page asks for a key when they answer 401."""
    page = resources.files("tierline.web").joinpath("static/index.html").read_text("utf-8")
    # Under TIERLINE_WEB_API_PREFIX (an application hosted beside it) every link and
    # call of the page is relative to that prefix; the page reads it from the meta tag.
    base = request.scope.get("root_path", "")
    page = page.replace('href="/static/', f'href="{base}/static/')
    page = page.replace('src="/static/', f'src="{base}/static/')
    page = page.replace('href="/docs"', f'href="{base}/docs"')
    page = page.replace('content="tierline-base"', f'content="{base}"')
    return HTMLResponse(page, headers=DASHBOARD_HEADERS)


DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
