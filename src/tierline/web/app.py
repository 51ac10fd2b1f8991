"""The web tier's ASGI application."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from tierline import __version__
from tierline.web import errors, flow, jobs, ops, streams
from tierline.web.middleware import BodyLimit, HttpMetrics
from tierline.web.runtime import Runtime


def create_app(rt: Runtime) -> FastAPI:
    api = FastAPI(
        title="Tierline",
        version=__version__,
        description="Web tier of Tierline: enqueue and inspect jobs, stream their events, "
        "watch the queues and the replicas.",
        docs_url="/docs",
        redoc_url=None,
    )
    api.state.runtime = rt
    errors.install(api)
    api.include_router(jobs.router)
    api.include_router(streams.router)
    api.include_router(ops.router)
    api.include_router(flow.router)
    api.mount("/static", StaticFiles(packages=[("tierline.web", "static")]), name="static")
    if rt.settings.cors_origins.strip():
        api.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in rt.settings.cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "PATCH"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    api.add_middleware(BodyLimit, limit=rt.settings.max_body_bytes)
    api.add_middleware(HttpMetrics, recorder=rt.load.record)
    return api
