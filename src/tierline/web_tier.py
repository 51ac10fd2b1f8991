"""``tierline web``: one web replica as a process: the HTTP API, the SSE streams fed by
the replica's LISTEN connection, ``/metrics`` and the dashboard."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

import uvicorn
from psycopg_pool import AsyncConnectionPool
from starlette.types import ASGIApp

from tierline import tracing
from tierline.app import App
from tierline.database import Conn
from tierline.lifecycle import QuietServer, listen_socket
from tierline.logs import get_logger
from tierline.notifications import EVENTS_CHANNEL
from tierline.read_routing import ReadRouter
from tierline.replica import Replica
from tierline.settings import Settings, env_name
from tierline.streaming import EventHub
from tierline.tier import Tier
from tierline.web.app import create_app
from tierline.web.auth import KeyRing
from tierline.web.host import Host
from tierline.web.runtime import Runtime

log = get_logger(__name__)

# How long open requests and streams may take to finish once the replica stops.
REQUEST_GRACE_S = 15


class WebTier(Tier):
    """A web replica. ``sock``: a listening socket inherited from ``tierline up``;
    ``reuse_port``: share the port with other replicas (SO_REUSEPORT); ``web_app``: the
    application's own ASGI app, served beside Tierline's API (``web/host.py``)."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        web_app: ASGIApp | None = None,
    ) -> None:
        super().__init__(app, settings, Replica(settings, "web", stats=self.web_stats))
        self.sock = sock
        self.reuse_port = reuse_port
        self.keys = KeyRing(settings.api_keys.get_secret_value() if settings.api_keys else None)
        # Reads go to the read replica while it keeps up (TIERLINE_DATABASE_READ_URL).
        self.reads = (
            ReadRouter(settings, lambda: self.replica.pool, self._read_pool)
            if settings.read_dsn()
            else None
        )
        self.hub = EventHub(
            lambda: self.replica.pool, buffer_size=settings.sse_buffer_events, reads=self.reads
        )
        self.rt = Runtime(
            settings=settings,
            app=app,
            replica=self.replica,
            keys=self.keys,
            hub=self.hub,
            refresh_metrics=self.refresh_database_metrics,
            reads=self.reads,
        )
        api = create_app(self.rt)
        self.host = (
            Host(api, web_app, settings.web_api_prefix, self.rt) if web_app is not None else None
        )
        self.server = QuietServer(
            uvicorn.Config(
                self.host or tracing.instrument(api),  # a span per request, when tracing is on
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=10,
                loop="none",
                http="httptools",
                timeout_keep_alive=30,
            )
        )

    def _read_pool(self) -> AsyncConnectionPool[Conn] | None:
        return self.replica.reads.pool if self.replica.reads is not None else None

    def web_stats(self) -> dict[str, Any]:
        """The replica's registry row's stats: request load and open streams."""
        rt = getattr(self, "rt", None)
        if rt is None:
            return {}
        return {"http": rt.load.snapshot(), "sse_streams": self.hub.active}

    async def serve(self) -> bool:
        # Replicas sharing a port (SO_REUSEPORT, or a socket inherited from `tierline up`)
        # get connections as soon as they accept, with no readiness gate in front: such a
        # replica serves only once ready, so scaling the web tier out never sends a
        # request to a replica that would answer 503 "starting".
        shared = self.reuse_port or self.sock is not None
        started = await self.replica.start(self.stop) if shared else None
        sock = self.sock or listen_socket(
            self.settings.web_host,
            self.settings.web_port,
            setting=env_name("web_port"),
            reuse_port=self.reuse_port,
        )
        server_task = self.side.start(self.server.serve(sockets=[sock]), "http")
        host, port = sock.getsockname()[:2]
        log.info(
            "web tier listening",
            url=f"http://{host}:{port}",
            auth="api keys" if self.keys.enabled else "open",
        )
        if started if started is not None else await self.replica.start(self.stop):
            assert self.replica.pool is not None
            self.rt.queue = self.connected(self.replica.pool)
            self.rt.stats, self.rt.recommender = self.stats, self.recommender
            self.start_side_tasks(
                [EVENTS_CHANNEL],
                self.hub.notify,
                self.hub.caught_up,
                (self.hub.run(), "event-hub"),
                *self._read_routing(),
            )
            if self.host is not None:
                await self.host.start()
            await self.stop.wait()
        await self.drain(server_task)
        if self.host is not None:
            await self.host.stop()
        return True

    def _read_routing(self) -> list[tuple[Coroutine[Any, Any, Any], str]]:
        """With a read replica: the queue's and statistics' reads routed, the lag probe."""
        if self.reads is None:
            return []
        assert self.queue is not None and self.stats is not None
        self.queue.reads = self.stats.reads = self.reads
        return [(self.reads.run(), "read-routing")]

    async def drain(self, server_task: asyncio.Task[None]) -> None:
        """Report not-ready, end streams cleanly, let requests finish, leave."""
        self.rt.draining = True
        self.rt.shutdown.set()
        self.hub.close()
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(server_task), timeout=REQUEST_GRACE_S)
        except TimeoutError:
            log.warning("requests still open after the grace period; closing them")

    async def close(self) -> None:
        log.info("web tier stopped")
