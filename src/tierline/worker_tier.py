"""``tierline worker``: one worker replica as a process. Its HTTP listener serves only
``/metrics``, ``/healthz`` and ``/readyz``; the work is ``Worker.run``."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierline import budget, health
from tierline.app import App
from tierline.lifecycle import QuietServer, listen_socket
from tierline.logs import get_logger
from tierline.notifications import CANCEL_CHANNEL, JOBS_CHANNEL
from tierline.replica import Replica
from tierline.settings import Settings, env_name
from tierline.tier import Tier
from tierline.worker import Worker

log = get_logger(__name__)


class WorkerTier(Tier):
    """A worker replica: the metrics listener, then the replica, then the worker."""

    def __init__(self, app: App, settings: Settings) -> None:
        queues = settings.queues()
        uses_db = any(h.uses_db for h in app.handlers.values() if h.queue in queues)
        replica = Replica(
            settings,
            "worker",
            stats=self.worker_stats,
            pool_need=budget.worker_pool_need(settings.worker_concurrency, uses_db),
        )
        super().__init__(app, settings, replica)
        self.worker: Worker | None = None
        self.metrics_server = QuietServer(
            uvicorn.Config(
                Starlette(
                    routes=[
                        Route("/metrics", self.metrics),
                        Route("/healthz", health.healthz),
                        Route("/readyz", lambda _: health.readyz(self.readiness)),
                    ]
                ),
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        self._metrics_task: asyncio.Task[None] | None = None

    def worker_stats(self) -> dict[str, Any]:
        """The replica's registry row's stats (and the slot gauges)."""
        if self.worker is None:
            return {"slots": {"busy": 0, "free": self.settings.worker_concurrency}}
        return self.worker.stats()

    async def metrics(self, _: Request) -> Response:
        await self.refresh_database_metrics()
        self.worker_stats()
        return health.metrics_response()

    async def serve(self) -> bool:
        sock = listen_socket(
            self.settings.worker_metrics_host,
            self.settings.worker_metrics_port,
            setting=env_name("worker_metrics_port"),
        )
        self._metrics_task = asyncio.create_task(
            self.metrics_server.serve(sockets=[sock]), name="metrics-listener"
        )
        host, port = sock.getsockname()[:2]
        log.info(
            "worker starting",
            queues=self.settings.queues(),
            concurrency=self.settings.worker_concurrency,
            metrics=f"http://{host}:{port}",
        )
        if not await self.replica.start(self.stop):
            return True
        assert self.replica.pool is not None
        worker = self.worker = Worker(
            self.app, self.settings, self.replica.pool, str(self.replica.id)
        )
        self.connected(self.replica.pool)
        self.start_side_tasks(
            [JOBS_CHANNEL, CANCEL_CHANNEL], worker.notify, worker.listen_connected
        )
        log.info("worker ready", replica=str(self.replica.id))
        return await worker.run(self.stop)

    async def run(self) -> int:
        code = await super().run()
        overruns = sorted(self.worker.executors.threads.overruns) if self.worker else []
        if overruns:
            # Python cannot stop these threads, and the interpreter would wait for them at
            # exit (concurrent.futures joins its threads), maybe forever. Their attempts
            # are recorded and the budget claim released: leave without them.
            log.warning("exiting without waiting for threads that cannot be stopped", jobs=overruns)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    async def close(self) -> None:
        self.metrics_server.should_exit = True
        if self._metrics_task is not None:
            await self._metrics_task
        log.info("worker stopped", completed=self.worker.completed if self.worker else 0)
