"""``tierline worker``: one worker replica as a process."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierline import budget, health
from tierline.app import App
from tierline.lifecycle import QuietServer, Shutdown, listen_socket
from tierline.logs import get_logger
from tierline.notifications import Listener
from tierline.queue import Queue
from tierline.recommend import Recommender
from tierline.replica import Replica
from tierline.settings import Settings, env_name
from tierline.stats import Stats
from tierline.worker import Worker

log = get_logger(__name__)


async def run_worker(app: App, settings: Settings) -> int:
    shutdown = Shutdown()
    shutdown.install()
    queues = settings.queues()
    uses_db = any(h.uses_db for h in app.handlers.values() if h.queue in queues)
    holder: dict[str, Any] = {}

    def worker_stats() -> dict[str, Any]:
        w = holder.get("worker")
        return w.stats() if w else {"slots": {"busy": 0, "free": settings.worker_concurrency}}

    replica = Replica(
        settings,
        "worker",
        stats=worker_stats,
        pool_need=budget.worker_pool_need(settings.worker_concurrency, uses_db),
    )

    def readiness() -> tuple[bool, str]:
        if holder.get("draining"):
            return False, "shutting down"
        return replica.ready, replica.reason

    async def metrics_endpoint(_: Request) -> Response:
        stats: Stats | None = holder.get("stats")
        if stats is not None and not replica.pool_saturated():
            try:
                await stats.queues()
                await stats.cluster()
                await holder["recommender"].current()  # tierline_recommended_replicas
            except Exception:  # metrics of the database are best effort
                pass
        worker_stats()
        return health.metrics_response()

    server = QuietServer(
        uvicorn.Config(
            Starlette(
                routes=[
                    Route("/metrics", metrics_endpoint),
                    Route("/healthz", health.healthz),
                    Route("/readyz", lambda _: health.readyz(readiness)),
                ]
            ),
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
    )
    sock = listen_socket(
        settings.worker_metrics_host,
        settings.worker_metrics_port,
        setting=env_name("worker_metrics_port"),
    )
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="metrics-listener")
    host, port = sock.getsockname()[:2]
    log.info(
        "worker starting",
        queues=queues,
        concurrency=settings.worker_concurrency,
        metrics=f"http://{host}:{port}",
    )

    if not await replica.start(shutdown.stop):
        server.should_exit = True
        await server_task
        return 0
    assert replica.pool is not None
    worker = Worker(app, settings, replica.pool, str(replica.id))
    holder["worker"] = worker
    holder["stats"] = Stats(replica.pool)
    holder["recommender"] = Recommender(settings, replica.pool, holder["stats"])
    app.bind(Queue(app, replica.pool, max_args_bytes=settings.max_args_bytes))

    async def caught_up() -> None:
        worker._more = True  # a notification may have been missed while disconnected
        worker._wake.set()

    listener = Listener(
        settings,
        ["tierline_jobs", "tierline_cancel"],
        worker.notify,
        on_connect=caught_up,
        name="worker-listen",
    )
    side = [
        asyncio.create_task(worker.flusher.run(), name="flusher"),
        asyncio.create_task(worker.renew_forever(), name="lease-renewal"),
        asyncio.create_task(worker.maintenance.run(), name="maintenance"),
        asyncio.create_task(replica.heartbeat_forever(), name="heartbeat"),
        asyncio.create_task(listener.run(), name="listener"),
    ]
    claimer = asyncio.create_task(worker.claim_forever(), name="claimer")
    log.info("worker ready", replica=str(replica.id))
    stop_task = asyncio.create_task(shutdown.stop.wait())
    exit_code = 0
    done, _ = await asyncio.wait([stop_task, claimer, *side], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stop_task and not task.cancelled() and task.exception() is not None:
            log.error(
                "a worker task crashed; stopping",
                task=task.get_name(),
                error=repr(task.exception()),
            )
            exit_code = 1
    holder["draining"] = True
    await worker.drain(settings.worker_shutdown_grace_s, claimer)
    for task in [claimer, *side, stop_task]:
        task.cancel()
    await asyncio.gather(claimer, *side, stop_task, return_exceptions=True)
    await replica.close()
    server.should_exit = True
    await server_task
    log.info("worker stopped", completed=worker.completed)
    return exit_code
